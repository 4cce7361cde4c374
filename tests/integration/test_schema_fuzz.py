"""Schema fuzzing: schemathesis generates requests from the API's own /openapi.json and runs its
default checks (no server errors, status codes / content types / bodies as documented, …) against a
real API on PostgreSQL, Redis and the S3 server. Bounded in examples per operation and wall time.

The fuzzed API sends to a queue no worker consumes, and every job it created is cancelled afterwards,
so later tests' workers and sweepers never run fuzzed jobs.
"""

from __future__ import annotations

import logging
import re
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.integration.helpers import free_port, start_api

pytestmark = pytest.mark.integration
_logger = logging.getLogger(__name__)
MAX_EXAMPLES = 40  # per operation and phase
MAX_TIME_S = 120


@pytest.fixture(scope="module")
def fuzz_api(service_env: dict[str, str], log_dir: Path) -> Iterator[str]:
    env = {
        **service_env,
        "MUST_DATA_DIR": service_env["MUST_DATA_DIR"] + "-fuzz",
        "MUST_WORKER__QUEUE": "fuzz-nobody",
        # zero-shot builds any base model a request names; random ones are refused as 415/422
        "MUST_CLASSIFY__ALLOW_ZERO_SHOT": "false",
        # the ignored-auth checks send many unauthenticated requests from one address
        "MUST_API__AUTH_FAILURES_LIMIT": "1000000",
    }
    proc, url = start_api(env, log_dir, free_port())
    yield url
    proc.stop()


def _cancel_all(url: str, headers: dict[str, str]) -> None:
    while True:
        page = httpx.get(f"{url}/v1/jobs", params={"status": "queued"}, headers=headers).json()
        if not page["items"]:
            return
        for job in page["items"]:
            httpx.post(f"{url}/v1/jobs/{job['id']}/cancel", headers=headers)


def test_schema_fuzz_finds_no_server_error_or_schema_violation(
    fuzz_api: str, cli: Any, tmp_path: Path
) -> None:
    key = cli("keys", "create", "--tenant", "tenant-fuzz").stdout.strip()
    headers = {"Authorization": f"Bearer {key}"}
    exe = str(Path(sys.executable).parent / "schemathesis")
    cmd = [
        exe, "--config-file", str(Path(__file__).with_name("schemathesis.toml")),
        "run", f"{fuzz_api}/openapi.json",
        "-H", f"Authorization: Bearer {key}",
        "--max-examples", str(MAX_EXAMPLES),
        "--max-time", str(MAX_TIME_S),
        "--seed", "16",
        "--workers", "1",
        "--request-timeout", "60",
        "--no-color",
    ]  # fmt: skip
    try:
        run = subprocess.run(
            cmd, capture_output=True, text=True, timeout=MAX_TIME_S + 120, cwd=tmp_path
        )
    finally:
        _cancel_all(fuzz_api, headers)
    out = run.stdout + run.stderr
    counts = re.findall(r"(\d+) generated, (\d+) passed", out)
    _logger.warning("schemathesis summary:\n%s", out[-2500:])
    assert run.returncode == 0, out[-6000:]
    assert counts and counts[0][0] == counts[0][1], out[-2000:]
    assert int(counts[0][0]) > 500  # the run really fuzzed
