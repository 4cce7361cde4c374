"""Results out, against the real services (PostgreSQL, Redis, rclone S3, a Celery worker):

- a named job with ``params.predict_dataset``: download (bytes and digest equal the stored object),
  the ONNX export checked with ONNX Runtime against torch, the dataset's predictions;
- a predictions job over an S3 prefix: one row per decodable image, labels equal /classify's;
- names: ``name``, ``name:latest``, ``name:VERSION``, ``name:TAG`` for download and /classify;
- resume: a cancelled job continues at its checkpoint step, not 0;
- bad inputs: clear 4xx problem+json.
"""

from __future__ import annotations

import base64
import csv
import hashlib
import io
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest

from tests.integration.conftest import job_body
from tests.integration.helpers import Proc, make_images, start_worker, wait_for, wait_job

pytestmark = pytest.mark.integration
CLASSES = ["red", "green", "blue"]


@pytest.fixture(scope="module")
def worker(service_env: dict[str, str], log_dir: Path) -> Iterator[Proc]:
    proc = start_worker(service_env, log_dir, name="worker-results")
    yield proc
    proc.stop()


def _stored(s3: dict[str, Any], key: str) -> bytes:
    body: bytes = s3["client"].get_object(Bucket=s3["bucket"], Key=key)["Body"].read()
    return body


def _named_job(client: httpx.Client, dataset: str, config: str, name: str, **extra: Any) -> str:
    body = job_body(dataset, config, min_steps=6, predict_dataset=True)
    body.update(name=name, **extra)
    r = client.post("/v1/jobs", json=body)
    assert r.status_code == 202, r.text
    return str(r.json()["id"])


def _classify(client: httpx.Client, ref: str, images: list[bytes]) -> dict[str, Any]:
    r = client.post(
        f"/v1/models/{ref}/classify",
        files=[("images", (f"{i}.png", b, "image/png")) for i, b in enumerate(images)],
        data={"top_k": "3"},
    )
    assert r.status_code == 200, r.text
    body: dict[str, Any] = r.json()
    return body


def test_named_model_download_onnx_and_dataset_predictions(
    worker: Proc,
    client_a: httpx.Client,
    client_b: httpx.Client,
    upload: Any,
    tiny_config_uri: str,
    s3: dict[str, Any],
    stamp: str,
    tmp_path: Path,
) -> None:
    files = make_images(3, CLASSES, seed=7)
    files["junk/bad.png"] = b"not an image"
    dataset = upload(f"results-{stamp}/train", files)
    name = f"shelf-{stamp}"
    first = _named_job(client_a, dataset, tiny_config_uri, name, tags=["candidate"])
    job1 = wait_job(client_a, first, {"succeeded", "failed"}, 240)
    assert job1["status"] == "succeeded", (job1, worker.log()[-3000:])
    second = _named_job(client_a, dataset, tiny_config_uri, name)
    job2 = wait_job(client_a, second, {"succeeded", "failed"}, 240)
    assert job2["status"] == "succeeded", (job2, worker.log()[-3000:])
    m1 = client_a.get(f"/v1/models/{job1['model_id']}").json()
    m2 = client_a.get(f"/v1/models/{job2['model_id']}").json()
    assert (m1["name"], m1["version"], m1["tags"]) == (name, 1, ["candidate"])
    assert (m2["name"], m2["version"], m2["tags"]) == (name, 2, [])
    assert set(m2["formats"]) == {"safetensors", "onnx", "safetensors_ema"}

    # Download: streamed bytes equal the stored object; the digest header is its SHA-256.
    r = client_a.get(f"/v1/models/{m2['id']}/download")
    assert r.status_code == 200, r.text
    stored = _stored(s3, m2["artifact_key"])
    assert r.content == stored and int(r.headers["content-length"]) == len(stored)
    b64 = base64.b64encode(hashlib.sha256(stored).digest()).decode()
    assert r.headers["repr-digest"] == f"sha-256=:{b64}:"
    assert (
        r.headers["etag"] == f'"{m2["sha256"]}"'
        and m2["sha256"] == hashlib.sha256(stored).hexdigest()
    )
    assert client_b.get(f"/v1/models/{m2['id']}/download").status_code == 404  # tenant-checked

    # Names: name and name:latest → v2; name:1 and name:candidate → v1.
    for ref, want in (
        (name, m2),
        (f"{name}:latest", m2),
        (f"{name}:1", m1),
        (f"{name}:candidate", m1),
    ):
        got = client_a.get(f"/v1/models/{ref}/download")
        assert got.status_code == 200 and got.content == _stored(s3, want["artifact_key"]), ref
    assert client_b.get(f"/v1/models/{name}/download").status_code == 404
    assert _classify(client_a, f"{name}:1", [files["red/000.png"]])["model_id"] == m1["id"]
    assert _classify(client_a, name, [files["red/000.png"]])["model_id"] == m2["id"]
    # A tag moves: set on v2, it leaves v1.
    r = client_a.patch(f"/v1/models/{m2['id']}", json={"tags": ["candidate", "prod"]})
    assert r.status_code == 200 and r.json()["tags"] == ["candidate", "prod"]
    assert client_a.get(f"/v1/models/{m1['id']}").json()["tags"] == []
    assert _classify(client_a, f"{name}:candidate", [files["red/000.png"]])["model_id"] == m2["id"]

    # ONNX: ONNX Runtime on the downloaded export vs torch on the downloaded safetensors.
    ort = pytest.importorskip("onnxruntime")
    import torch

    from must_core.ml.inference import AdaptedClassifier

    onnx_resp = client_a.get(f"/v1/models/{m2['id']}/download", params={"format": "onnx"})
    assert onnx_resp.status_code == 200, onnx_resp.text
    (tmp_path / "m.onnx").write_bytes(onnx_resp.content)
    (tmp_path / "m.safetensors").write_bytes(stored)
    model = AdaptedClassifier.load(tmp_path / "m.safetensors")
    from PIL import Image

    x = model.preprocess_images(
        [Image.open(io.BytesIO(b)) for k, b in files.items() if "junk" not in k]
    )
    with torch.inference_mode():
        ref = model(x).numpy()
    sess = ort.InferenceSession(str(tmp_path / "m.onnx"), providers=["CPUExecutionProvider"])
    got = sess.run(["logits"], {"images": x.numpy()})[0]
    delta = float(np.abs(got - ref).max())
    assert delta < 1e-3, f"max |Δlogit| {delta}"

    # params.predict_dataset: the job's own dataset, one row per decodable image.
    preds = job2["metrics"]["predictions"]
    assert preds["num_images"] == 10 and preds["num_predicted"] == 9 and preds["num_skipped"] == 1
    r = client_a.get(f"/v1/jobs/{second}/predictions")
    assert r.status_code == 200 and r.headers["content-type"].startswith("application/x-ndjson")
    rows = [json.loads(line) for line in r.text.splitlines()]
    assert sorted(row["path"] for row in rows) == sorted(k for k in files if "junk" not in k)


def test_predictions_job_over_s3_prefix_matches_classify(
    worker: Proc,
    client_a: httpx.Client,
    client_b: httpx.Client,
    upload: Any,
    tiny_config_uri: str,
    stamp: str,
) -> None:
    train = upload(f"predjob-{stamp}/train", make_images(3, CLASSES, seed=11))
    r = client_a.post("/v1/jobs", json=job_body(train, tiny_config_uri, min_steps=4))
    job = wait_job(client_a, r.json()["id"], {"succeeded", "failed"}, 240)
    assert job["status"] == "succeeded", (job, worker.log()[-3000:])
    mid = job["model_id"]
    files = make_images(4, CLASSES, seed=12)
    files["nested/deeper/x.png"] = make_images(1, ["green"], seed=13)["green/000.png"]
    files["broken.jpg"] = b"\xff\xd8\xff broken"
    target = upload(f"predjob-{stamp}/unlabeled", files)

    assert (
        client_b.post(f"/v1/models/{mid}/predictions", json={"dataset_uri": target}).status_code
        == 404
    )
    r = client_a.post(f"/v1/models/{mid}/predictions", json={"dataset_uri": target, "top_k": 2})
    assert r.status_code == 202, r.text
    pj = r.json()
    assert pj["kind"] == "predict" and pj["status"] == "queued" and pj["class_names"] == CLASSES
    done = wait_job(client_a, pj["id"], {"succeeded", "failed"}, 180)
    assert done["status"] == "succeeded", (done, worker.log()[-3000:])
    assert done["progress"]["step"] == done["progress"]["total_steps"] == 14
    assert done["dataset"]["num_skipped"] == 1

    rows = [
        json.loads(x) for x in client_a.get(f"/v1/jobs/{pj['id']}/predictions").text.splitlines()
    ]
    good = sorted(k for k in files if k != "broken.jpg")
    assert sorted(row["path"] for row in rows) == good  # row count = decodable images
    by_path = {row["path"]: row for row in rows}
    served = _classify(client_a, mid, [files[k] for k in good])["results"]
    for key, res in zip(good, served, strict=True):
        assert by_path[key]["label"] == res["label"], key
        assert by_path[key]["score"] == pytest.approx(res["score"], abs=1e-4)
        assert len(by_path[key]["top_k"]) == 2
    r = client_a.get(f"/v1/jobs/{pj['id']}/predictions", params={"format": "csv"})
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/csv")
    table = list(csv.DictReader(io.StringIO(r.text)))
    assert [t["path"] for t in table] == good and table[0]["label"] == by_path[good[0]]["label"]


def test_resume_cancelled_job_continues_at_checkpoint(
    worker: Proc, client_a: httpx.Client, upload: Any, tiny_config_uri: str, stamp: str
) -> None:
    dataset = upload(f"resume-cancel-{stamp}", make_images(4, CLASSES, seed=21))
    total = 300  # long enough that the cancel lands before the end on a quiet machine
    r = client_a.post("/v1/jobs", json=job_body(dataset, tiny_config_uri, min_steps=total))
    jid = r.json()["id"]
    assert client_a.post(f"/v1/jobs/{jid}/resume").json()["code"] == "job_not_resumable"

    def checkpointed() -> bool:
        job = client_a.get(f"/v1/jobs/{jid}").json()
        assert job["status"] in ("queued", "running"), job
        return int(job["checkpoint_step"] or 0) >= 5

    wait_for(checkpointed, 180, 0.2, what="a checkpoint")
    client_a.post(f"/v1/jobs/{jid}/cancel")
    cancelled = wait_job(client_a, jid, {"cancelled", "succeeded", "failed"}, 90)
    assert cancelled["status"] == "cancelled", cancelled
    ckpt = cancelled["checkpoint_step"]
    assert ckpt and 0 < ckpt < total

    r = client_a.post(f"/v1/jobs/{jid}/resume")
    assert r.status_code == 202, r.text
    assert r.json()["status"] == "queued" and r.json()["error"] is None
    job = wait_job(client_a, jid, {"succeeded", "failed", "cancelled"}, 240)
    assert job["status"] == "succeeded", (job, worker.log()[-3000:])
    assert job["resumed_from_step"] is not None and job["resumed_from_step"] >= ckpt > 0
    assert job["progress"]["step"] == total and job["attempt"] == 2
    assert client_a.post(f"/v1/jobs/{jid}/resume").status_code == 409  # succeeded: not resumable


def test_bad_inputs_are_clear_4xx(
    client_a: httpx.Client, upload: Any, tiny_config_uri: str, stamp: str
) -> None:
    dataset = upload(f"bad-{stamp}", make_images(1, CLASSES))

    def problem(r: httpx.Response, status: int, code: str) -> None:
        assert r.status_code == status, r.text
        assert r.headers["content-type"].startswith("application/problem+json")
        assert r.json()["code"] == code, r.json()

    body = job_body(dataset, tiny_config_uri)
    for bad in (
        {"name": "has:colon"},
        {"name": "0b7e5a4e-0000-4000-8000-000000000000"},
        {"name": "ok", "tags": ["latest"]},
        {"name": "ok", "tags": ["12"]},
    ):
        problem(client_a.post("/v1/jobs", json={**body, **bad}), 422, "validation_error")
    problem(client_a.get("/v1/models/no-such-name/download"), 404, "not_found")
    problem(client_a.get("/v1/models/no-such-name:3/download"), 404, "not_found")
    problem(
        client_a.post("/v1/models/no-such-name/predictions", json={"dataset_uri": dataset}),
        404,
        "not_found",
    )
    problem(
        client_a.get(f"/v1/jobs/{'0' * 8}-0000-4000-8000-{'0' * 12}/predictions"), 404, "not_found"
    )
    problem(client_a.post(f"/v1/jobs/{'0' * 8}-0000-4000-8000-{'0' * 12}/resume"), 404, "not_found")


def test_python_client_end_to_end(
    worker: Proc,
    api: str,
    keys: dict[str, str],
    upload: Any,
    tiny_config_uri: str,
    s3: dict[str, Any],
    stamp: str,
    tmp_path: Path,
) -> None:
    """The public client: submit, wait with a progress callback, classify by name, a digest-checked
    download, a predictions job and its CSV, and the problem code of a refused request."""
    from must_core.client import ClientError, MustClient

    files = make_images(2, CLASSES, seed=41)
    dataset = upload(f"client-{stamp}", files)
    seen: list[int] = []
    with MustClient(api, keys["tenant-a"]) as must:
        job = must.submit(
            dataset,
            CLASSES,
            base_model={
                "arch": "must-tiny",
                "config_uri": tiny_config_uri,
                "allow_random_init": True,
            },
            params={"epochs": 1, "batch_size": 4, "min_steps": 4},
            name=f"client-{stamp}",
        )
        job = must.wait(job.id, on_progress=lambda j: seen.append(j.progress.step), interval=0.3)
        assert job.status == "succeeded" and seen and seen[-1] == 4
        res = must.classify(f"client-{stamp}:latest", [files["red/000.png"]], top_k=2)
        assert len(res) == 1 and len(res[0]["top_k"]) == 2
        path = must.download(f"client-{stamp}", tmp_path / "m.safetensors")
        model = must.model(str(job.model_id))
        assert path.read_bytes() == _stored(s3, model.artifact_key) and model.version == 1
        preds = must.wait(must.predict(f"client-{stamp}", dataset, top_k=1).id, interval=0.3)
        assert preds.kind == "predict" and preds.status == "succeeded"
        out = must.download_predictions(preds.id, tmp_path / "p.csv", format="csv")
        assert len(out.read_text().splitlines()) == 1 + len(files)
        with pytest.raises(ClientError) as err:
            must.resume(job.id)
        assert err.value.code == "job_not_resumable"
