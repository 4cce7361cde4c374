"""Storage chaos and cancel latency against real processes (PostgreSQL, Redis, Celery worker, an S3
server of this test's own):

- the object store goes away for 90 s in the middle of a job: checkpoint uploads fail and are
  skipped, the final model upload waits for the store, and the job succeeds once it is back;
- a cancel sent while the trainer is still building a slow model (before step 0) takes effect in
  seconds, not after the model is built.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import boto3
import httpx
import pytest
from botocore.config import Config

from tests.integration.conftest import job_body
from tests.integration.helpers import (
    TINY_CONFIG,
    Proc,
    free_port,
    make_images,
    start_worker,
    trainer_pids,
    wait_for,
    wait_job,
    write_images,
)

pytestmark = pytest.mark.integration


class OwnS3:
    """``rclone serve s3`` on a fixed port and folder, so it can be stopped and started again."""

    def __init__(self, s3: dict[str, Any], data: Path, log_dir: Path) -> None:
        self.s3, self.data, self.log_dir = s3, data, log_dir
        self.port = free_port()
        self.endpoint = f"http://127.0.0.1:{self.port}"
        self.proc: Proc | None = None
        (data / s3["bucket"]).mkdir(parents=True, exist_ok=True)

    def start(self) -> None:
        args = [self.s3["rclone"], "serve", "s3", "--addr", f"127.0.0.1:{self.port}"]
        args += ["--auth-key", f"{self.s3['key']},{self.s3['secret']}", str(self.data)]
        self.proc = Proc(f"s3-{self.port}", args, {}, self.log_dir)
        client = self.client()

        def up() -> bool:
            try:
                client.list_buckets()
                return True
            except Exception:
                return False

        wait_for(up, 30, what="own S3 server")

    def stop(self) -> None:
        if self.proc is not None:
            self.proc.kill()

    def client(self) -> Any:
        return boto3.client(
            "s3",
            endpoint_url=self.endpoint,
            aws_access_key_id=self.s3["key"],
            aws_secret_access_key=self.s3["secret"],
            region_name="us-east-1",
            config=Config(s3={"addressing_style": "path"}, retries={"max_attempts": 1}),
        )


def test_storage_down_90s_mid_job_then_the_job_succeeds(
    service_env: dict[str, str],
    log_dir: Path,
    client_a: httpx.Client,
    datasets_root: Path,
    s3: dict[str, Any],
    tmp_path: Path,
    stamp: str,
) -> None:
    store = OwnS3(s3, tmp_path / "s3", log_dir)
    store.start()
    data = write_images(datasets_root / f"outage-{stamp}", make_images(4, ["red", "green", "blue"]))
    config = datasets_root / f"outage-{stamp}.json"
    config.write_bytes(TINY_CONFIG.read_bytes())
    body = job_body(f"file://{data}", f"file://{config}", min_steps=150)
    env = {**service_env, "MUST_STORAGE__ENDPOINT_URL": store.endpoint}
    worker = start_worker(env, log_dir, "w-outage")
    try:
        jid = client_a.post("/v1/jobs", json=body).json()["id"]
        wait_for(
            lambda: (client_a.get(f"/v1/jobs/{jid}").json()["checkpoint_step"] or 0) >= 10,
            120,
            what="a stored checkpoint",
        )
        store.stop()  # the object store is gone
        down_at = time.monotonic()
        time.sleep(90)
        assert client_a.get(f"/v1/jobs/{jid}").json()["status"] == "running"  # waiting, not failed
        store.start()
        job = wait_job(client_a, jid, {"succeeded", "failed", "cancelled"}, 120)
        back_after = time.monotonic() - down_at - 90
    finally:
        worker.stop()
        store.stop()
    assert job["status"] == "succeeded", (job, worker.log()[-3000:])
    assert job["attempt"] == 1  # no retry of the whole job was needed
    assert "storage unavailable" in worker.log()
    assert back_after < 60
    keys = store.data / s3["bucket"] / "jobs" / jid / "model"
    assert (keys / "model.safetensors").is_file()


def test_cancel_before_step_zero_takes_effect_in_seconds(
    service_env: dict[str, str],
    log_dir: Path,
    client_a: httpx.Client,
    datasets_root: Path,
    stamp: str,
) -> None:
    data = write_images(datasets_root / f"slow-{stamp}", make_images(4, ["red", "green", "blue"]))
    body = {
        "dataset_uri": f"file://{data}",
        "class_names": ["red", "green", "blue"],
        # A random-weight ViT-B-16 and 300 prompts: ~20 s of model build and prompt encoding on one
        # CPU thread before the first step, where the old trainer could not see a cancel.
        "base_model": {"arch": "ViT-B-16", "allow_random_init": True},
        "templates": [f"a photo of a {{}}, take {i}." for i in range(100)],
        "params": {"epochs": 1, "batch_size": 4},
    }
    worker = start_worker(service_env, log_dir, "w-cancel")
    try:
        jid = client_a.post("/v1/jobs", json=body).json()["id"]
        wait_for(lambda: trainer_pids(jid), 60, 0.1, what="the trainer process")
        time.sleep(1.0)  # inside the model build
        assert client_a.get(f"/v1/jobs/{jid}").json()["progress"].get("step", 0) == 0
        t0 = time.monotonic()
        assert client_a.post(f"/v1/jobs/{jid}/cancel").status_code in (200, 202)
        job = wait_job(client_a, jid, {"cancelled", "succeeded", "failed"}, 60)
        latency = time.monotonic() - t0
    finally:
        worker.stop()
    assert job["status"] == "cancelled", job
    assert latency < 5.0, latency  # heartbeat (1 s here) + killing the trainer
    wait_for(lambda: not trainer_pids(jid), 10, what="no trainer left")
    assert json.dumps(job).count("internal_error") == 0
