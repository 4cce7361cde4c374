"""The deployed execution model against real Celery prefork workers, PostgreSQL, Redis and S3:
training runs in a child process group (loader workers and DDP ranks are allowed there, unlike in the
daemonic pool child), multi-process jobs are routed to workers that can run them, and a SIGKILL during a
checkpoint upload neither leaves an orphan trainer nor publishes a partial checkpoint."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.integration.conftest import job_body
from tests.integration.helpers import (
    make_images,
    start_worker,
    trainer_pids,
    wait_for,
    wait_job,
)

pytestmark = pytest.mark.integration


def test_job_with_loader_workers_in_a_prefork_worker(
    service_env: dict[str, str],
    log_dir: Path,
    client_a: httpx.Client,
    upload: Any,
    tiny_config_uri: str,
    stamp: str,
) -> None:
    # Today's main failed here at the first batch: "daemonic processes are not allowed to have children".
    dataset = upload(f"loaders-{stamp}", make_images(4, ["red", "green", "blue"], seed=7))
    worker = start_worker({**service_env, "MUST_WORKER__NUM_WORKERS": "2"}, log_dir, "w-loaders")
    try:
        r = client_a.post("/v1/jobs", json=job_body(dataset, tiny_config_uri, min_steps=6))
        assert r.status_code == 202, r.text
        job = wait_job(client_a, r.json()["id"], {"succeeded", "failed", "cancelled"}, 180)
    finally:
        worker.stop()
    assert job["status"] == "succeeded", (job, worker.log()[-4000:])
    assert job["progress"]["step"] == 6
    assert "training process" in worker.log() and "1 rank(s)" in worker.log()


def test_two_process_job_is_routed_to_a_worker_that_runs_it_on_torchrun(
    service_env: dict[str, str],
    log_dir: Path,
    client_a: httpx.Client,
    upload: Any,
    tiny_config_uri: str,
    stamp: str,
) -> None:
    dataset = upload(f"ddp-{stamp}", make_images(4, ["red", "green", "blue"], seed=8))
    env = {
        **service_env,
        "MUST_WORKER__MAX_PROCESSES_PER_JOB": "2",
        "MUST_WORKER__NUM_WORKERS": "1",
    }
    worker = start_worker(env, log_dir, "w-ddp")
    try:
        body = job_body(dataset, tiny_config_uri, min_steps=4, num_processes=2)
        r = client_a.post("/v1/jobs", json=body)
        assert r.status_code == 202, r.text
        job = wait_job(client_a, r.json()["id"], {"succeeded", "failed", "cancelled"}, 240)
    finally:
        worker.stop()
    log = worker.log()
    assert job["status"] == "succeeded", (job, log[-4000:])
    assert job["progress"]["step"] == 4
    assert "test-gpu.x2" in log and "2 rank(s)" in log
    assert re.search(r"rank1 ", log), "the second rank's output reaches the worker log"


# A wider tiny CLIP: its checkpoint (student, EMA, Adam moments) is ~60 MB, so an upload to the S3
# server takes long enough (~1 s) for the test to kill the worker while one is in flight.
WIDE_CLIP = {
    "embed_dim": 64,
    "vision_cfg": {"image_size": 32, "layers": 1, "width": 576, "patch_size": 8, "head_width": 64},
    "text_cfg": {"context_length": 32, "vocab_size": 49408, "width": 64, "heads": 2, "layers": 1},
}


def _stored_checkpoint(s3: dict[str, Any], jid: str) -> dict[str, Any]:
    from must_core.ml.checkpoint import load_training_checkpoint

    body = s3["client"].get_object(Bucket=s3["bucket"], Key=f"jobs/{jid}/checkpoints/last.pt")
    path = Path(f"/tmp/ckpt-{jid}.pt")
    path.write_bytes(body["Body"].read())
    try:
        return load_training_checkpoint(path)
    finally:
        path.unlink()


def test_sigkill_mid_upload_publishes_no_partial_checkpoint_and_leaves_no_trainer(
    service_env: dict[str, str],
    log_dir: Path,
    client_a: httpx.Client,
    upload: Any,
    tiny_config_uri: str,
    s3: dict[str, Any],
    stamp: str,
) -> None:
    dataset = upload(f"midupload-{stamp}", make_images(4, ["red", "green", "blue"], seed=9))
    config_uri = upload(f"wide-{stamp}", {"must-wide.json": json.dumps(WIDE_CLIP).encode()})
    body = job_body(dataset, config_uri + "must-wide.json", min_steps=(total := 200))
    body["base_model"]["arch"] = "must-wide"
    first = start_worker(service_env, log_dir, "w-upload")
    try:
        r = client_a.post("/v1/jobs", json=body)
        jid = r.json()["id"]

        def upload_in_flight_after_a_complete_one() -> int | None:
            log = first.log()
            done = [int(s) for s in re.findall(r"uploaded checkpoint step (\d+)", log)]
            started = [int(s) for s in re.findall(r"uploading checkpoint step (\d+)", log)]
            if done and started and started[-1] > done[-1]:
                return done[-1]
            return None

        last_complete = wait_for(
            upload_in_flight_after_a_complete_one,
            180,
            0.05,
            what="an upload in flight after a completed one",
        )
        assert trainer_pids(jid), "the trainer runs in its own processes"
    finally:
        first.kill()  # SIGKILL the worker's process group; the trainer is in a session of its own
    # The trainer dies with its parent (PR_SET_PDEATHSIG), loader workers with it: nothing holds a GPU.
    wait_for(lambda: not trainer_pids(jid), 15, 0.2, what="the trainer processes to exit")
    job = client_a.get(f"/v1/jobs/{jid}").json()
    assert job["status"] == "running" and job["checkpoint_step"] == last_complete, job
    # Complete and loadable: an interrupted PUT never lands. (If the kill came just after the PUT
    # finished, the newer checkpoint is stored, complete, and the row still says the older step.)
    stored = _stored_checkpoint(s3, jid)
    assert stored["step"] >= last_complete

    second = start_worker(service_env, log_dir, "w-resume")
    try:
        job = wait_job(client_a, jid, {"succeeded", "failed", "cancelled"}, 300)
    finally:
        second.stop()
    assert job["status"] == "succeeded", (job, second.log()[-4000:])
    assert job["resumed_from_step"] == stored["step"] and job["progress"]["step"] == total
    assert "resumed from" in second.log()


def test_second_job_on_the_same_data_reuses_the_prepared_dataset(
    service_env: dict[str, str],
    log_dir: Path,
    client_a: httpx.Client,
    upload: Any,
    tiny_config_uri: str,
    s3: dict[str, Any],
    stamp: str,
) -> None:
    files = make_images(4, ["red", "green", "blue"], seed=10)
    files["broken.png"] = b"not an image"
    dataset = upload(f"prepared-{stamp}", files)
    worker = start_worker(service_env, log_dir, "w-prepared")
    try:
        jobs = []
        for _ in range(2):
            r = client_a.post("/v1/jobs", json=job_body(dataset, tiny_config_uri, min_steps=3))
            assert r.status_code == 202, r.text
            jobs.append(wait_job(client_a, r.json()["id"], {"succeeded", "failed"}, 180))
    finally:
        worker.stop()
    assert [j["status"] for j in jobs] == ["succeeded", "succeeded"], worker.log()[-3000:]
    first, second = (j["metrics"]["dataset_cache"] for j in jobs)
    assert first["prepared"] and not first["reused"]
    assert second["reused"] and second["key"] == first["key"]
    assert worker.log().count("preparing the dataset") == 1  # the second job did not prepare again
    assert jobs[1]["dataset"]["num_skipped"] == 1 and jobs[1]["dataset"]["num_images"] == 12
    listed = s3["client"].list_objects_v2(Bucket=s3["bucket"], Prefix="prepared/")["Contents"]
    keys = {o["Key"].rsplit("/", 1)[-1] for o in listed if first["key"] in o["Key"]}
    assert {"plan.json", "chunk-0.json", "pixels-0.u8", "meta.json"} <= keys
