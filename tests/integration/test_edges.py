"""Edges of the HTTP server, on a real uvicorn: request read deadlines (slowloris, trickled bodies)
and failed-authentication rate limiting."""

from __future__ import annotations

import socket
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from tests.integration.helpers import free_port, start_api

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def edge_api(service_env: dict[str, str], log_dir: Path) -> Iterator[str]:
    env = {
        **service_env,
        "MUST_DATA_DIR": service_env["MUST_DATA_DIR"] + "-edges",
        "MUST_API__HEADER_TIMEOUT_S": "1.5",
        "MUST_API__BODY_TIMEOUT_S": "2",
        "MUST_API__AUTH_FAILURES_LIMIT": "10",
    }
    proc, url = start_api(env, log_dir, free_port())
    yield url
    proc.stop()


def _closed_after(url: str, payload: bytes, limit: float = 8.0) -> float:
    """Send ``payload`` and wait: seconds until the server closes the connection."""
    host, port = url.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port)), timeout=limit) as sock:
        t0 = time.monotonic()
        sock.sendall(payload)
        try:
            while sock.recv(4096):
                pass
        except TimeoutError:
            return float("inf")
        return time.monotonic() - t0


def test_slow_headers_and_bodies_are_cut_off(edge_api: str) -> None:
    half_header = b"GET /healthz HTTP/1.1\r\nHost: x\r\nX-Slow: "
    assert _closed_after(edge_api, half_header) < 4
    trickled = b"POST /v1/jobs HTTP/1.1\r\nHost: x\r\nContent-Length: 100\r\n\r\n0123456789"
    assert _closed_after(edge_api, trickled) < 5
    with httpx.Client(base_url=edge_api) as c:  # normal keep-alive traffic is unaffected
        for _ in range(3):
            assert c.get("/healthz").status_code == 200
            time.sleep(0.6)


def test_failed_auth_is_rate_limited(edge_api: str) -> None:
    bad = {"Authorization": "Bearer must_wrong"}
    statuses = [httpx.get(f"{edge_api}/v1/jobs", headers=bad).status_code for _ in range(30)]
    assert statuses == [401] * 10 + [429] * 20
    limited = httpx.get(f"{edge_api}/v1/jobs", headers=bad)
    assert limited.json()["code"] == "too_many_requests"
    assert 1 <= int(limited.headers["retry-after"]) <= 60
