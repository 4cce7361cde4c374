"""The GPU evidence for distributed training, as one prepared run (about 10 minutes on one H100/H200):

1. ViT-B-16 bf16 MUST step through the training loop's own step (``benchmarks.scale``): batch 64, and a
   global batch of 256 as 4 accumulated micro-batches of 64 beside 256 in one pass (images/s, peak
   memory);
2. a full job through the real service on CUDA: ``must serve`` (embedded: SQLite, local store, Celery
   prefork worker), loader workers > 0, 2,048 generated JPEGs, random-weight ViT-B-16 (no download), one
   epoch at batch 64. Reports the job's status, its images/s and the wall time;
3. the loader feeding the GPU (``adapt()`` on CUDA, ViT-B-16 bf16, batch 64, 15 loader workers) from
   raw JPEGs and from the prepared form, 4,096 generated 500×375 JPEGs: images/s after warm-up, and
   the GPU's idle fraction estimated as 1 − (loader-fed images/s ÷ the bare step's images/s of 1.).

    python -m benchmarks.gpu_check [--out DIR]        # writes DIR/gpu_check.json (default benchmarks/results)
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import httpx
import numpy as np
from PIL import Image

REPO = Path(__file__).resolve().parents[1]


def _step_rows(out: Path, batch: int, micro: int) -> dict[str, Any]:
    path = out / f"scale-b{batch}.json"
    cmd = [
        sys.executable,
        "-m",
        "benchmarks.scale",
        "--model",
        "vit-b-16",
        "--device",
        "cuda",
        "--batch",
        str(batch),
        "--nproc",
        "1",
        "--threads",
        "4",
        "--steps",
        "10",
        "--skip",
        "checkpoint",
        "--out",
        str(path),
    ]
    if micro:
        cmd += ["--micro", str(micro)]
    subprocess.run(cmd, cwd=REPO, check=True, timeout=300)
    return dict(json.loads(path.read_text()))


def _images(folder: Path, n: int, shape: tuple[int, int] = (320, 400)) -> None:
    folder.mkdir(parents=True)
    rng = np.random.default_rng(0)
    for i in range(n):
        arr = rng.integers(0, 255, (*shape, 3), dtype=np.uint8)
        Image.fromarray(arr).save(folder / f"{i:05d}.jpg", quality=90)


_FED = r"""
import json, sys, time
from pathlib import Path
from must_core.ml.config import BaseModelSpec, make_config
from must_core.ml.train import adapt
images, out, cache = Path(sys.argv[1]), Path(sys.argv[2]), sys.argv[3]
rates = []
cfg = make_config(batch_size=64, epochs=1, device="cuda", num_workers=15, num_threads=4,
                  progress_every_steps=5, export_ema=False, prepare_workers=15)
adapt(cfg, images_dir=images, class_names=[f"c{i}" for i in range(10)], output_dir=out,
      base_model=BaseModelSpec(arch="ViT-B-16", allow_random_init=True), resume=False,
      on_progress=lambda ev: rates.append(ev.images_per_second),
      prepared_cache=Path(cache) if cache != "-" else None)
print(json.dumps({"images_per_second": sum(rates[2:]) / max(1, len(rates[2:]))}))
"""


def _loader_fed(work: Path, bare_images_per_s: float) -> dict[str, Any]:
    images = work / "fed-jpegs"
    _images(images, 4096, (375, 500))
    cache = work / "fed-cache"
    rows: dict[str, Any] = {}
    for label, arg in (("prepare", str(cache)), ("prepared", str(cache)), ("raw", "-")):
        cmd = [sys.executable, "-c", _FED, str(images), str(work / f"fed-{label}"), arg]
        t0 = time.monotonic()
        res = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=400)
        if res.returncode:
            rows[label] = {"error": res.stderr[-2000:]}
            continue
        rate = float(json.loads(res.stdout.strip().splitlines()[-1])["images_per_second"])
        rows[label] = {
            "images_per_second": rate,
            "wall_s": time.monotonic() - t0,
            "gpu_idle_fraction": max(0.0, 1 - rate / bare_images_per_s),
        }
    return (
        rows  # "prepare": the first run, which prepares while it trains; "prepared": from the cache
    )


def _port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _job(work: Path, timeout_s: float) -> dict[str, Any]:
    data = work / "images"
    _images(data, 2048)
    port = _port()
    env = {
        **os.environ,
        "MUST_WORKER__DEVICE": "cuda",
        "MUST_WORKER__NUM_WORKERS": str(min(8, (os.cpu_count() or 2) - 2)),
        "MUST_WORKER__PROGRESS_EVERY_STEPS": "5",
    }
    cmd = [
        sys.executable,
        "-m",
        "must_core.cli.service",
        "serve",
        "--data-dir",
        str(work / "svc"),
        "--port",
        str(port),
        "--allow-root",
        str(work),
    ]
    log_path = work / "serve.log"
    with log_path.open("wb") as log:
        proc = subprocess.Popen(cmd, env=env, cwd=REPO, stdout=log, stderr=log)
    try:
        with httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=60) as c:
            deadline = time.monotonic() + 180
            while True:
                try:
                    if c.get("/readyz", timeout=2).status_code == 200:
                        break
                except httpx.HTTPError:
                    pass
                if proc.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError(log_path.read_text()[-3000:])
                time.sleep(0.5)
            body = {
                "dataset_uri": f"file://{data}",
                "class_names": [f"class {i}" for i in range(100)],
                "base_model": {"arch": "ViT-B-16", "allow_random_init": True},
                "params": {"epochs": 1, "batch_size": 64},
            }
            t0 = time.monotonic()
            r = c.post("/v1/jobs", json=body)
            r.raise_for_status()
            jid = r.json()["id"]
            while True:
                job = c.get(f"/v1/jobs/{jid}").json()
                if job["status"] in ("succeeded", "failed", "cancelled"):
                    break
                if time.monotonic() - t0 > timeout_s:
                    break
                time.sleep(2)
            return {
                "status": job["status"],
                "error": job.get("error"),
                "steps": job["progress"].get("step"),
                "images_per_second": job["progress"].get("images_per_second"),
                "wall_s": round(time.monotonic() - t0, 1),
                "log_tail": log_path.read_text()[-2000:],
            }
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            proc.kill()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--out", type=Path, default=Path(os.environ.get("OUT", "benchmarks/results")))
    ap.add_argument("--job-timeout", type=float, default=420)
    args = ap.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    report: dict[str, Any] = {}
    report["step_b64"] = _step_rows(args.out, 64, 0)
    report["step_b256_accum"] = _step_rows(args.out, 256, 64)
    with tempfile.TemporaryDirectory() as tmp:
        report["job"] = _job(Path(tmp), args.job_timeout)
    bare = max(float(row["images_per_s"]) for row in report["step_b64"]["step"])
    with tempfile.TemporaryDirectory() as tmp:
        report["loader_fed"] = _loader_fed(Path(tmp), bare)
    (args.out / "gpu_check.json").write_text(json.dumps(report, indent=2))
    print(json.dumps({k: v for k, v in report["job"].items() if k != "log_tail"}, indent=2))
    print(json.dumps(report["loader_fed"], indent=2))


if __name__ == "__main__":
    main()
