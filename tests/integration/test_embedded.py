"""`must serve` embedded mode: SQLite, local-disk store and kombu's filesystem broker under a data
directory; no Redis, PostgreSQL or S3. Anonymous access only because it is bound to 127.0.0.1.
Also runs an http(s) zip-archive dataset end to end (loopback allowed explicitly for the test)."""

from __future__ import annotations

import functools
import http.server
import io
import os
import sys
import threading
import zipfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

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


@pytest.fixture
def archive_url(tmp_path: Path) -> Iterator[str]:
    www = tmp_path / "www"
    www.mkdir()
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as zf:
        for rel, data in make_images(3, ["red", "green"], seed=6).items():
            zf.writestr(f"photos/{rel}", data)
    (www / "photos.zip").write_bytes(buf.getvalue())
    handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=str(www))
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{server.server_address[1]}/photos.zip"
    server.shutdown()


def test_must_serve_embedded_flow(tmp_path: Path, archive_url: str) -> None:
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
            # the archive server of this test is on loopback; production keeps the SSRF guard on
            "MUST_DATASETS__ALLOW_PRIVATE_HOSTS": "true",
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
        wait_for(lambda: "accepts connections" in serve.log(), 10, what="must serve logs ready")
        with httpx.Client(base_url=base, timeout=30) as c:
            r = c.post(
                "/v1/jobs",
                json={
                    "dataset_uri": f"file://{user_images}",
                    "class_names": ["red", "green"],
                    "base_model": {
                        "arch": "must-tiny",
                        "config_uri": f"file://{tmp_path / 'tiny_clip.json'}",
                        "allow_random_init": True,
                    },
                    "params": {"epochs": 1, "batch_size": 4, "min_steps": 10},
                },
            )
            assert r.status_code == 202, r.text
            jid = r.json()["id"]

            def finished(job_id: str) -> dict[str, Any] | None:
                job: dict[str, Any] = c.get(f"/v1/jobs/{job_id}").json()
                return job if job["status"] in ("succeeded", "failed") else None

            job = wait_for(lambda: finished(jid), 180, 0.3, what="embedded job finished")
            assert job["status"] == "succeeded", (job, serve.log()[-4000:])
            assert job["dataset"]["num_skipped"] == 1
            models = c.get("/v1/models").json()["items"]
            assert [m["id"] for m in models] == [job["model_id"]]
            # an http(s) zip archive, downloaded and extracted safely by the worker
            r2 = c.post(
                "/v1/jobs",
                json={
                    "dataset_uri": archive_url,
                    "class_names": ["red", "green"],
                    "base_model": {
                        "arch": "must-tiny",
                        "config_uri": f"file://{tmp_path / 'tiny_clip.json'}",
                        "allow_random_init": True,
                    },
                    "params": {"epochs": 1, "batch_size": 2, "min_steps": 4},
                },
            )
            assert r2.status_code == 202, r2.text
            jid2 = r2.json()["id"]
            job2 = wait_for(lambda: finished(jid2), 180, 0.3, what="archive job finished")
            assert job2["status"] == "succeeded", (job2, serve.log()[-4000:])
            assert job2["dataset"]["num_images"] == 6
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
