"""End to end with a real Celery worker: S3 datasets → running with progress → succeeded → model
listed → checkpoint and model objects in the bucket; corrupt images skipped; empty dataset fails;
cancel while running."""

from __future__ import annotations

import io
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.integration.conftest import job_body
from tests.integration.helpers import Proc, make_images, start_worker, wait_for, wait_job

pytestmark = pytest.mark.integration
CLASSES = ["red", "green", "blue"]


@pytest.fixture(scope="module")
def worker(service_env: dict[str, str], log_dir: Path) -> Iterator[Proc]:
    proc = start_worker(service_env, log_dir)
    yield proc
    proc.stop()


def test_full_flow_s3(
    worker: Proc,
    client_a: httpx.Client,
    client_b: httpx.Client,
    upload: Any,
    tiny_config_uri: str,
    s3: dict[str, Any],
    stamp: str,
) -> None:
    files = make_images(6, CLASSES, seed=1)
    files["junk/corrupt.png"] = b"not an image at all"
    files["junk/truncated.jpg"] = b"\xff\xd8\xff\xe0" + b"\x00" * 50
    dataset = upload(f"flow-{stamp}/train", files)
    eval_set = upload(f"flow-{stamp}/eval", make_images(2, CLASSES, seed=2))
    body = job_body(dataset, tiny_config_uri, min_steps=48)
    body["eval_dataset_uri"] = eval_set
    r = client_a.post("/v1/jobs", json=body)
    assert r.status_code == 202, r.text
    jid = r.json()["id"]
    assert r.json()["status"] == "queued"

    seen: dict[str, Any] = {}

    def running_with_progress() -> bool:
        job = client_a.get(f"/v1/jobs/{jid}").json()
        if job["status"] == "running" and job["progress"]["step"] > 0:
            seen.update(job)
            return True
        assert job["status"] in ("queued", "running"), job
        return False

    wait_for(running_with_progress, 120, 0.1, what="running with progress")
    assert seen["progress"]["total_steps"] == 48 and 0 < seen["progress"]["fraction"] <= 1
    assert seen["metrics"]["train"]["loss"] > 0 and "conf_ratio" in seen["metrics"]["train"]
    assert seen["heartbeat_at"] and seen["started_at"] and seen["attempt"] == 1

    job = wait_job(client_a, jid, {"succeeded", "failed"}, 180)
    assert job["status"] == "succeeded", (job, worker.log()[-3000:])
    assert job["progress"]["step"] == 48 and job["progress"]["fraction"] == 1.0
    assert job["dataset"]["num_images"] == 18 and job["dataset"]["num_skipped"] == 2
    assert {e["path"].split("/")[-1] for e in job["dataset"]["skipped_examples"]} == {
        "corrupt.png",
        "truncated.jpg",
    }
    evals = job["metrics"]["eval"]
    assert {"zero_shot", "adapted", "adapted_ema"} <= evals.keys()
    assert 0 <= evals["adapted"]["top1"] <= 100  # percent
    assert job["error"] is None and job["finished_at"]
    model_id = job["model_id"]
    assert model_id

    listed = client_a.get("/v1/models").json()
    assert model_id in [m["id"] for m in listed["items"]]
    model = client_a.get(f"/v1/models/{model_id}").json()
    assert model["job_id"] == jid and model["class_names"] == CLASSES and model["size_bytes"] > 0
    assert model["base_model"]["arch"] == "must-tiny"
    assert client_b.get(f"/v1/models/{model_id}").status_code == 404
    assert model_id not in [m["id"] for m in client_b.get("/v1/models").json()["items"]]

    bucket, client = s3["bucket"], s3["client"]
    keys = {
        o["Key"] for o in client.list_objects_v2(Bucket=bucket, Prefix=f"jobs/{jid}/")["Contents"]
    }
    assert {
        f"jobs/{jid}/checkpoints/last.pt",
        f"jobs/{jid}/model/model.safetensors",
        f"jobs/{jid}/metrics.json",
    } <= keys

    # The stored model loads and predicts without the text tower.
    from PIL import Image

    from must_core.ml.inference import AdaptedClassifier

    tmp = Path(worker.log_path).parent / f"{jid}.safetensors"
    client.download_file(bucket, f"jobs/{jid}/model/model.safetensors", str(tmp))
    clf = AdaptedClassifier.load(tmp)
    img = Image.open(io.BytesIO(files["red/000.png"]))
    pred = clf.predict([img], top_k=2)[0]
    assert pred.label in CLASSES and len(pred.top_k) == 2

    # Delete: row and weights go, the job stays.
    assert client_b.delete(f"/v1/models/{model_id}").status_code == 404
    assert client_a.delete(f"/v1/models/{model_id}").status_code == 204
    assert client_a.get(f"/v1/models/{model_id}").status_code == 404
    left = client.list_objects_v2(Bucket=bucket, Prefix=f"jobs/{jid}/model/").get("Contents", [])
    assert left == []
    assert client_a.get(f"/v1/jobs/{jid}").json()["status"] == "succeeded"


def test_empty_dataset_fails_with_code(
    worker: Proc, client_a: httpx.Client, upload: Any, tiny_config_uri: str, stamp: str
) -> None:
    dataset = upload(f"empty-{stamp}", {"a.png": b"broken", "b.jpg": b"also broken"})
    r = client_a.post("/v1/jobs", json=job_body(dataset, tiny_config_uri))
    assert r.status_code == 202, r.text
    job = wait_job(client_a, r.json()["id"], {"succeeded", "failed"}, 120)
    assert job["status"] == "failed"
    assert job["error"]["code"] == "dataset_empty", job["error"]
    assert job["error"]["message"]
    assert job["model_id"] is None


def test_cancel_while_running(
    worker: Proc, client_a: httpx.Client, upload: Any, tiny_config_uri: str, stamp: str
) -> None:
    dataset = upload(f"cancel-{stamp}", make_images(4, CLASSES, seed=3))
    r = client_a.post("/v1/jobs", json=job_body(dataset, tiny_config_uri, min_steps=100_000))
    jid = r.json()["id"]
    wait_for(
        lambda: client_a.get(f"/v1/jobs/{jid}").json()["progress"]["step"] >= 3,
        120,
        what="training steps",
    )
    c = client_a.post(f"/v1/jobs/{jid}/cancel")
    assert c.status_code == 200 and c.json()["cancel_requested"] is True
    job = wait_job(client_a, jid, {"cancelled", "succeeded", "failed"}, 60)
    assert job["status"] == "cancelled", job
    assert 0 < job["progress"]["step"] < 100_000
    assert job["finished_at"] and job["model_id"] is None
    assert client_a.post(f"/v1/jobs/{jid}/cancel").json()["status"] == "cancelled"  # idempotent
