"""Broker chaos against real processes: a Redis of this test's own (``redis-server`` on a free port,
no persistence) that is stalled (SIGSTOP) and restarted (SIGKILL + start: every message is lost),
with a real API and Celery worker on PostgreSQL and the S3 server.

- a stalled broker: ``/readyz`` says 503 within its timeout and ``POST /v1/jobs`` still answers 202
  at once; the job waits in the outbox (``enqueued_at`` unset) and the relay sends it;
- Redis restarted while a job is queued: its message is gone; the relay sees it is in no queue and
  re-sends it;
- Redis restarted while a job runs: the job keeps running and succeeds.
"""

from __future__ import annotations

import logging
import os
import signal
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.integration.conftest import job_body
from tests.integration.helpers import (
    Proc,
    free_port,
    make_images,
    start_api,
    start_worker,
    wait_for,
    wait_job,
)

pytestmark = pytest.mark.integration
_logger = logging.getLogger(__name__)


class OwnRedis:
    def __init__(self, port: int, log_dir: Path) -> None:
        self.port, self.log_dir = port, log_dir
        self.proc: Proc | None = None

    def start(self) -> None:
        args = ["redis-server", "--port", str(self.port), "--bind", "127.0.0.1"]
        args += ["--save", "", "--appendonly", "no", "--dir", str(self.log_dir)]
        self.proc = Proc(f"redis-{self.port}", args, dict(os.environ), self.log_dir)
        wait_for(self._up, 20, what="own redis-server")

    def _up(self) -> bool:
        out = subprocess.run(
            ["redis-cli", "-p", str(self.port), "ping"], capture_output=True, text=True
        )
        return out.stdout.strip() == "PONG"

    def signal(self, sig: signal.Signals) -> None:
        assert self.proc is not None
        os.kill(self.proc.proc.pid, sig)

    def restart(self) -> None:
        assert self.proc is not None
        self.proc.kill()
        self.start()

    def stop(self) -> None:
        if self.proc is not None:
            self.signal(signal.SIGCONT)
            self.proc.stop()


@pytest.fixture(scope="module")
def chaos(service_env: dict[str, str], log_dir: Path) -> Iterator[dict[str, Any]]:
    redis = OwnRedis(free_port(), log_dir)
    redis.start()
    env = {
        **service_env,
        "MUST_DATA_DIR": service_env["MUST_DATA_DIR"] + "-chaos",
        "MUST_BROKER__URL": f"redis://127.0.0.1:{redis.port}/0",
        "MUST_BROKER__CLIENT_TIMEOUT_S": "2",
        "MUST_API__READINESS_TIMEOUT_S": "3",
        "MUST_WORKER__QUEUE": "chaos-gpu",
        "MUST_WORKER__RELAY_INTERVAL_S": "1",
        "MUST_WORKER__RELAY_GRACE_S": "2",
        "MUST_WORKER__LOST_MESSAGE_AFTER_S": "4",
    }
    api, url = start_api(env, log_dir, free_port())
    yield {"redis": redis, "env": env, "url": url}
    api.stop()
    redis.stop()


def test_stalled_and_restarted_redis_lose_no_job(
    chaos: dict[str, Any],
    keys: dict[str, str],
    upload: Any,
    tiny_config_uri: str,
    stamp: str,
    s3: dict[str, Any],
) -> None:
    redis, url = chaos["redis"], chaos["url"]
    client = httpx.Client(
        base_url=url, headers={"Authorization": f"Bearer {keys['tenant-a']}"}, timeout=30
    )
    dataset = upload(f"chaos-{stamp}", make_images(2, ["red", "green", "blue"], seed=9))
    body = job_body(dataset, tiny_config_uri, min_steps=30)

    redis.signal(signal.SIGSTOP)  # stalled: accepts connections, never answers
    try:
        t = time.monotonic()
        ready = httpx.get(f"{url}/readyz", timeout=30)
        assert ready.status_code == 503 and time.monotonic() - t < 6, ready.text
        assert ready.json()["checks"]["broker"].startswith("error")
        t = time.monotonic()
        stalled = client.post("/v1/jobs", json=body)
        assert stalled.status_code == 202 and time.monotonic() - t < 6, stalled.text
    finally:
        redis.signal(signal.SIGCONT)
    queued = client.post("/v1/jobs", json=body)  # sent: its message waits in Redis
    assert queued.status_code == 202, queued.text
    redis.restart()  # without persistence: the queued job's message is gone
    back = time.monotonic()
    worker = start_worker(chaos["env"], chaos["redis"].log_dir, name="chaos-worker")
    try:
        first = _wait_running(client, [stalled.json()["id"], queued.json()["id"]])
        to_running = time.monotonic() - back
        redis.restart()  # while a job runs
        done = [
            wait_job(client, jid, {"succeeded", "failed", "cancelled"}, 150)
            for jid in (stalled.json()["id"], queued.json()["id"])
        ]
        all_done = time.monotonic() - back
    finally:
        worker.stop()
    _logger.warning(
        "Redis back -> first stranded job running %.1f s, both succeeded %.1f s "
        "(incl. worker start; one worker runs them one after the other)",
        to_running,
        all_done,
    )
    assert [j["status"] for j in done] == ["succeeded", "succeeded"], (done, worker.log()[-3000:])
    assert to_running < 60, first
    assert all_done < 60
    assert "its message is not in the broker (lost); re-sending" in worker.log()
    _delete_finished(client, s3, done)


def _delete_finished(client: httpx.Client, s3: dict[str, Any], jobs: list[dict[str, Any]]) -> None:
    """DELETE /v1/jobs/{id}: the row, the model and every object under jobs/{id}/ go."""
    for job in jobs:
        prefix = f"jobs/{job['id']}/"
        listed = s3["client"].list_objects_v2(Bucket=s3["bucket"], Prefix=prefix)
        assert listed.get("KeyCount", 0) > 0  # checkpoint, model, metrics
        assert client.delete(f"/v1/jobs/{job['id']}").status_code == 204
        assert client.get(f"/v1/jobs/{job['id']}").status_code == 404
        assert client.get(f"/v1/models/{job['model_id']}").status_code == 404
        listed = s3["client"].list_objects_v2(Bucket=s3["bucket"], Prefix=prefix)
        assert listed.get("KeyCount", 0) == 0


def _wait_running(client: httpx.Client, ids: list[str]) -> str:
    def running() -> str | None:
        for jid in ids:
            if client.get(f"/v1/jobs/{jid}").json()["status"] in ("running", "succeeded"):
                return jid
        return None

    found: str = wait_for(running, 60, 0.2, what="a stranded job running")
    return found
