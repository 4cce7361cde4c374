"""Webhooks against the real services: a job's callback_url and a registered endpoint both receive a
signed event when the job ends; a receiver that fails twice gets the event on the third attempt with
the same delivery id; the deliveries are recorded."""

from __future__ import annotations

import json
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import httpx
import pytest

from must_core.webhooks.signing import verify
from tests.integration.conftest import job_body
from tests.integration.helpers import Proc, make_images, start_worker, wait_for, wait_job

pytestmark = pytest.mark.integration


class Receiver:
    """A real HTTP server on 127.0.0.1 recording every POST; fails the first ``fail_first``."""

    def __init__(self, fail_first: int = 0) -> None:
        self.calls: list[dict[str, Any]] = []
        self.fail_first = fail_first
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers["Content-Length"]))
                receiver.calls.append({"headers": dict(self.headers), "body": body})
                ok = len(receiver.calls) > receiver.fail_first
                self.send_response(204 if ok else 500)
                self.end_headers()

            def log_message(self, *_: Any) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/hook"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def close(self) -> None:
        self.server.shutdown()


@pytest.fixture(scope="module")
def worker(service_env: dict[str, str], log_dir: Path) -> Iterator[Proc]:
    proc = start_worker(service_env, log_dir, name="worker-webhooks")
    yield proc
    proc.stop()


def _check_signed(call: dict[str, Any], secret: str) -> dict[str, Any]:
    h = {k.lower(): v for k, v in call["headers"].items()}
    assert verify(secret, call["body"], h["must-timestamp"], h["must-signature"])
    assert not verify("whsec_wrong", call["body"], h["must-timestamp"], h["must-signature"])
    assert not verify(secret, call["body"] + b" ", h["must-timestamp"], h["must-signature"])
    event: dict[str, Any] = json.loads(call["body"])
    assert h["must-event"] == event["type"] and h["must-delivery"] == event["id"]
    return event


def test_callback_and_endpoint_signed_with_retry(
    worker: Proc, client_a: httpx.Client, upload: Any, tiny_config_uri: str, stamp: str
) -> None:
    callback = Receiver(fail_first=2)
    endpoint = Receiver()
    try:
        r = client_a.post(
            "/v1/webhooks/endpoints", json={"url": endpoint.url, "events": ["job.succeeded"]}
        )
        assert r.status_code == 201, r.text
        hook = r.json()
        assert hook["secret"].startswith("whsec_")
        listed = client_a.get("/v1/webhooks/endpoints").json()["items"]
        assert hook["id"] in [h["id"] for h in listed] and all(h["secret"] is None for h in listed)
        tenant_secret = client_a.get("/v1/webhooks/secret").json()["secret"]

        dataset = upload(f"hooks-{stamp}", make_images(2, ["red", "green", "blue"], seed=31))
        body = {**job_body(dataset, tiny_config_uri, min_steps=3), "callback_url": callback.url}
        jid = client_a.post("/v1/jobs", json=body).json()["id"]
        job = wait_job(client_a, jid, {"succeeded", "failed"}, 240)
        assert job["status"] == "succeeded", (job, worker.log()[-3000:])

        wait_for(lambda: len(callback.calls) >= 3, 60, what="three callback attempts")
        wait_for(lambda: len(endpoint.calls) >= 1, 60, what="the endpoint delivery")
        events = [_check_signed(c, tenant_secret) for c in callback.calls]
        assert len({e["id"] for e in events}) == 1  # one delivery, retried
        assert events[-1]["type"] == "job.succeeded" and events[-1]["data"]["id"] == jid
        assert events[-1]["data"]["model_id"] == job["model_id"]
        ev = _check_signed(endpoint.calls[0], hook["secret"])
        assert ev["type"] == "job.succeeded" and ev["data"]["id"] == jid

        def recorded() -> list[dict[str, Any]] | None:
            items = client_a.get("/v1/webhooks/deliveries", params={"job_id": jid}).json()["items"]
            return items if all(d["status"] == "delivered" for d in items) else None

        items = wait_for(recorded, 30, what="deliveries recorded as delivered")
        by_url = {d["url"]: d for d in items}
        assert (
            by_url[callback.url]["attempts"] == 3
            and by_url[callback.url]["last_status_code"] == 204
        )
        assert by_url[endpoint.url]["attempts"] == 1
        assert client_a.delete(f"/v1/webhooks/endpoints/{hook['id']}").status_code == 204
        assert client_a.delete(f"/v1/webhooks/endpoints/{hook['id']}").status_code == 404
    finally:
        callback.close()
        endpoint.close()


def test_webhook_inputs_are_clear_4xx(client_a: httpx.Client) -> None:
    for url in ("ftp://example.com/x", "http://user:pw@example.com/x", "not a url"):
        r = client_a.post("/v1/webhooks/endpoints", json={"url": url})
        assert r.status_code == 422 and r.json()["code"] == "validation_error", r.text
    r = client_a.post(
        "/v1/webhooks/endpoints", json={"url": "https://example.com/x", "events": ["nope"]}
    )
    assert r.status_code == 422 and r.json()["code"] == "validation_error"
