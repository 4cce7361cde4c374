"""`must serve` embedded mode: SQLite, local-disk store and kombu's filesystem broker under a data
directory; no Redis, PostgreSQL or S3. Anonymous access only because it is bound to 127.0.0.1."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import httpx
import pytest

from tests.integration.helpers import (
    REPO,
    TINY_CONFIG,
    Proc,
    free_port,
    make_images,
    wait_for,
    write_images,
)

pytestmark = pytest.mark.integration


def test_must_serve_embedded_flow(tmp_path: Path) -> None:
    data = tmp_path / "must-data"
    user_images = tmp_path / "my-photos"
    files = make_images(4, ["red", "green"], seed=5)
    files["broken.png"] = b"nope"
    write_images(user_images, files)
    (tmp_path / "tiny_clip.json").write_bytes(TINY_CONFIG.read_bytes())
    env = {k: v for k, v in os.environ.items() if not k.startswith("MUST_")}
    env.update(
        {
            "PYTHONPATH": str(REPO),
            "OMP_NUM_THREADS": "1",
            "MUST_WORKER__NUM_THREADS": "1",
            "MUST_WORKER__DEVICE": "cpu",
            "MUST_WORKER__CHECKPOINT_EVERY_STEPS": "4",
        }
    )
    port = free_port()
    serve = Proc(
        "serve",
        [
            sys.executable,
            "-m",
            "must_core.cli.service",
            "serve",
            "--data-dir",
            str(data),
            "--port",
            str(port),
            "--allow-root",
            str(tmp_path),
        ],
        env,
        tmp_path,
    )
    base = f"http://127.0.0.1:{port}"
    try:

        def ready() -> bool:
            assert serve.alive(), serve.log()[-3000:]
            try:
                return httpx.get(f"{base}/readyz", timeout=2).status_code == 200
            except httpx.HTTPError:
                return False

        wait_for(ready, 120, 0.5, what="must serve ready")
        wait_for(lambda: "ready." in serve.log(), 60, what="embedded worker ready")
        with httpx.Client(base_url=base, timeout=30) as c:
            r = c.post(
                "/v1/jobs",
                json={
                    "dataset_uri": f"file://{user_images}",
                    "class_names": ["red", "green"],
                    "base_model": {
                        "arch": "must-tiny",
                        "config_uri": f"file://{tmp_path / 'tiny_clip.json'}",
                    },
                    "params": {"epochs": 1, "batch_size": 4, "min_steps": 10},
                },
            )
            assert r.status_code == 202, r.text
            jid = r.json()["id"]

            def done() -> dict[str, object] | None:
                job: dict[str, object] = c.get(f"/v1/jobs/{jid}").json()
                return job if job["status"] in ("succeeded", "failed") else None

            job = wait_for(done, 180, 0.3, what="embedded job finished")
            assert job["status"] == "succeeded", (job, serve.log()[-4000:])
            assert job["dataset"]["num_skipped"] == 1
            models = c.get("/v1/models").json()["items"]
            assert [m["id"] for m in models] == [job["model_id"]]
            # outside the allowed roots → refused at submission
            bad = c.post("/v1/jobs", json={"dataset_uri": "file:///etc", "class_names": ["a", "b"]})
            assert bad.status_code == 403
        assert (data / "must.db").is_file()
        artifacts = data / "artifacts" / "jobs" / jid
        assert (artifacts / "model" / "model.safetensors").is_file()
        assert (artifacts / "checkpoints" / "last.pt").is_file()
        assert (artifacts / "metrics.json").is_file()
        assert (data / "broker").is_dir()
        assert "API keys are NOT required" in serve.log()
    finally:
        serve.stop(timeout=40)
    assert not serve.alive()
