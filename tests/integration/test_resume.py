"""SIGKILL the worker mid-run; a new worker's sweeper re-queues the job, which resumes from the
checkpoint in S3 (EMA, optimizer and schedule restored) instead of step 0, and succeeds."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.integration.conftest import job_body
from tests.integration.helpers import make_images, start_worker, wait_for, wait_job

pytestmark = pytest.mark.integration


def test_killed_worker_job_resumes_from_checkpoint(
    service_env: dict[str, str],
    log_dir: Path,
    client_a: httpx.Client,
    upload: Any,
    tiny_config_uri: str,
    s3: dict[str, Any],
    stamp: str,
) -> None:
    dataset = upload(f"resume-{stamp}", make_images(4, ["red", "green", "blue"], seed=4))
    total = 300
    first = start_worker(service_env, log_dir, name="worker-1")
    try:
        r = client_a.post("/v1/jobs", json=job_body(dataset, tiny_config_uri, min_steps=total))
        jid = r.json()["id"]

        def checkpointed() -> int:
            job = client_a.get(f"/v1/jobs/{jid}").json()
            assert job["status"] in ("queued", "running"), job
            return int(job["checkpoint_step"] or 0) >= 10

        wait_for(checkpointed, 180, 0.2, what="a checkpoint at step >= 10")
    finally:
        first.kill()  # SIGKILL: no cleanup, no ack, heartbeat stops
    before = client_a.get(f"/v1/jobs/{jid}").json()
    assert before["status"] == "running" and before["progress"]["step"] < total, before
    ckpt_step = before["checkpoint_step"]
    keys = [
        o["Key"]
        for o in s3["client"]
        .list_objects_v2(Bucket=s3["bucket"], Prefix=f"jobs/{jid}/checkpoints/")
        .get("Contents", [])
    ]
    assert keys == [f"jobs/{jid}/checkpoints/last.pt"]

    second = start_worker(service_env, log_dir, name="worker-2")
    try:
        job = wait_job(client_a, jid, {"succeeded", "failed", "cancelled"}, 240)
    finally:
        second.stop()
    assert job["status"] == "succeeded", (job, second.log()[-4000:])
    assert job["attempt"] == 2
    assert job["resumed_from_step"] is not None and job["resumed_from_step"] >= ckpt_step >= 5
    assert job["progress"]["step"] == total
    assert "re-queued to resume" in second.log()
    assert "resuming from the stored checkpoint" in second.log()
