"""/classify load benchmark: closed-loop clients at several concurrencies, batching off and on.

By default it builds a ViT-B-16 classifier with random weights (10 classes), registers it in an
embedded-mode data dir (SQLite + local store), starts one API server per batching mode on loopback
and drives each with N client threads, each sending one image per request and waiting for the answer.
It also times the bare model forward in-process at the same batch sizes, so the serving overhead shows
as a ratio. Prints a table and writes JSON.

    python -m benchmarks.classify                             # CPU, ViT-B-16, concurrency 1/8/32
    python -m benchmarks.classify --arch must-tiny --config tests/assets/tiny_clip.json --seconds 5
    python -m benchmarks.classify --url http://host:8000 --model-id ID --api-key KEY   # existing server
"""

from __future__ import annotations

import argparse
import io
import json
import os
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]


def _percentile(xs: list[float], q: float) -> float:
    xs = sorted(xs)
    if not xs:
        return float("nan")
    k = (len(xs) - 1) * q
    lo, hi = int(k), min(int(k) + 1, len(xs) - 1)
    return xs[lo] + (xs[hi] - xs[lo]) * (k - lo)


def make_model(path: Path, arch: str, config: str | None, classes: int) -> None:
    """An adapted-classifier export with random weights (what /classify serves)."""
    import open_clip
    import torch
    import torch.nn.functional as F

    from must_core.ml.checkpoint import export_classifier
    from must_core.ml.model import MustModel, Preprocess, build_visual_from_cfg

    if config:
        cfg = json.loads(Path(config).read_text())
    else:
        cfg = open_clip.get_model_config(arch)
    torch.manual_seed(0)
    visual = build_visual_from_cfg(cfg)
    d = int(cfg["embed_dim"])
    model = MustModel(visual, F.normalize(torch.randn(d, classes), dim=0))
    size = int(cfg["vision_cfg"]["image_size"])
    pp = Preprocess(size, open_clip.OPENAI_DATASET_MEAN, open_clip.OPENAI_DATASET_STD)
    export_classifier(
        path,
        model.state_dict(),
        class_names=[f"class {i}" for i in range(classes)],
        preprocess=pp.to_dict(),
        model_cfg=cfg,
        logit_scale=100.0,
    )


def register(data_dir: Path, model_path: Path, env: dict[str, str]) -> str:
    """Migrate the embedded DB and register the model for the default tenant; returns its id."""
    subprocess.run(
        [sys.executable, "-m", "must_core.cli", "migrate"],
        cwd=ROOT,
        env=env,
        check=True,
        capture_output=True,
    )
    code = f"""
import sys
from pathlib import Path
from must_core.settings import get_settings
from must_core.db.models import AdaptedModel
from must_core.db.session import make_engine, make_sessionmaker, session_scope
from must_core.jobs import queries
from must_core.storage import make_store
from must_core.storage.keys import model_key
s = get_settings()
sessions = make_sessionmaker(make_engine(s.database_url))
with session_scope(sessions) as db:
    tenant = queries.get_or_create_tenant(db, queries.DEFAULT_TENANT)
    job = queries.create_job(db, tenant.id, {{"benchmark": True}})
    job.status = "succeeded"
    key = model_key(job.id)
    make_store(s).put_file(Path({str(model_path)!r}), key)
    m = AdaptedModel(tenant_id=tenant.id, job_id=job.id, class_names=["x"], base_model={{}},
                     metrics={{}}, artifact_key=key, size_bytes=Path({str(model_path)!r}).stat().st_size)
    db.add(m)
    db.flush()
    job.model_id = m.id
    print(m.id)
"""
    out = subprocess.run(
        [sys.executable, "-c", code], cwd=ROOT, env=env, check=True, capture_output=True, text=True
    )
    return out.stdout.strip().splitlines()[-1]


def start_server(env: dict[str, str], port: int, log: Path) -> subprocess.Popen[bytes]:
    import httpx

    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "uvicorn",
            "api.main:create_app",
            "--factory",
            "--host",
            "127.0.0.1",
            "--port",
            str(port),
            "--no-access-log",
        ],
        cwd=ROOT,
        env=env,
        stdout=log.open("wb"),
        stderr=subprocess.STDOUT,
    )
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"server exited: {log.read_text()[-2000:]}")
        try:
            if httpx.get(f"http://127.0.0.1:{port}/healthz", timeout=2).status_code == 200:
                return proc
        except httpx.HTTPError:
            time.sleep(0.3)
    proc.kill()
    raise RuntimeError("server did not start")


def probe_image(size: int = 256) -> bytes:
    import numpy as np
    from PIL import Image

    arr = np.random.default_rng(0).integers(0, 255, (size, size, 3), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="JPEG", quality=90)
    return buf.getvalue()


def load(
    url: str,
    model_id: str,
    api_key: str | None,
    concurrency: int,
    seconds: float,
    image: bytes,
    warmup: int = 2,
) -> dict[str, Any]:
    """Closed loop: each of `concurrency` clients sends one image, waits, repeats."""
    import httpx

    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    endpoint = f"{url}/v1/models/{model_id}/classify"
    files = [("images", ("probe.jpg", image, "image/jpeg"))]
    with httpx.Client(headers=headers, timeout=600) as c:
        for _ in range(warmup):
            c.post(endpoint, files=files).raise_for_status()
    latencies: list[float] = []
    errors = [0]
    lock = threading.Lock()
    stop_at = time.monotonic() + seconds

    def client() -> None:
        with httpx.Client(headers=headers, timeout=600) as c:
            while time.monotonic() < stop_at:
                t0 = time.perf_counter()
                r = c.post(endpoint, files=files)
                dt = time.perf_counter() - t0
                with lock:
                    if r.status_code == 200:
                        latencies.append(dt)
                    else:
                        errors[0] += 1

    t0 = time.monotonic()
    threads = [threading.Thread(target=client) for _ in range(concurrency)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.monotonic() - t0
    return {
        "concurrency": concurrency,
        "requests": len(latencies),
        "errors": errors[0],
        "images_per_s": len(latencies) / wall,
        "wall_s": wall,
        "p50_ms": 1000 * _percentile(latencies, 0.5),
        "p95_ms": 1000 * _percentile(latencies, 0.95),
        "p99_ms": 1000 * _percentile(latencies, 0.99),
    }


def bare_forward(
    model_path: Path, batches: list[int], threads: int, repeats: int
) -> dict[int, float]:
    """Median seconds of the bare model forward (inference mode, fp32) per batch size."""
    import torch

    from must_core.ml.inference import AdaptedClassifier

    torch.set_num_threads(threads)
    clf = AdaptedClassifier.load(model_path)
    size = clf.preprocess.image_size
    out = {}
    for b in batches:
        x = torch.randn(b, 3, size, size)
        with torch.inference_mode():
            clf(x)
            times = []
            for _ in range(repeats):
                t0 = time.perf_counter()
                clf(x)
                times.append(time.perf_counter() - t0)
        out[b] = statistics.median(times)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--arch", default="ViT-B-16")
    ap.add_argument("--config", default=None, help="custom open_clip model-config JSON")
    ap.add_argument("--classes", type=int, default=10)
    ap.add_argument("--concurrency", type=int, nargs="+", default=[1, 8, 32])
    ap.add_argument("--seconds", type=float, default=20.0, help="load duration per level")
    ap.add_argument("--threads", type=int, default=2, help="torch threads of the server / bare run")
    ap.add_argument("--max-batch", type=int, default=32)
    ap.add_argument("--max-wait-ms", type=float, default=5.0)
    ap.add_argument("--repeats", type=int, default=5, help="bare-forward repeats per batch size")
    ap.add_argument("--url", default=None, help="benchmark an existing server instead")
    ap.add_argument("--model-id", default=None)
    ap.add_argument("--api-key", default=os.environ.get("MUST_API_KEY"))
    ap.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "classify.json")
    args = ap.parse_args()
    image = probe_image()
    result: dict[str, Any] = {
        "arch": args.arch,
        "threads": args.threads,
        "seconds": args.seconds,
        "runs": [],
    }
    if args.url:
        if not args.model_id:
            ap.error("--model-id is required with --url")
        for c in args.concurrency:
            row = {
                "batching": "server",
                **load(args.url, args.model_id, args.api_key, c, args.seconds, image),
            }
            result["runs"].append(row)
            print(row)
    else:
        with tempfile.TemporaryDirectory(prefix="must-bench-") as tmp:
            tmpd = Path(tmp)
            model_path = tmpd / "model.safetensors"
            make_model(model_path, args.arch, args.config, args.classes)
            base_env = {k: v for k, v in os.environ.items() if not k.startswith("MUST_")}
            base_env.update(
                {
                    "PYTHONPATH": str(ROOT),
                    "OMP_NUM_THREADS": str(args.threads),
                    "MUST_DATA_DIR": str(tmpd / "data"),
                    "MUST_API__AUTH": "none",
                    "MUST_API__NUM_THREADS": str(args.threads),
                    "MUST_LOG_LEVEL": "WARNING",
                    "MUST_CLASSIFY__MAX_BATCH": str(args.max_batch),
                    "MUST_CLASSIFY__MAX_WAIT_MS": str(args.max_wait_ms),
                }
            )
            model_id = register(tmpd / "data", model_path, base_env)
            for batching in (False, True):
                env = {**base_env, "MUST_CLASSIFY__BATCHING": str(batching).lower()}
                port = 18000 + (1 if batching else 0) + os.getpid() % 500 * 2
                proc = start_server(env, port, tmpd / f"server-{batching}.log")
                try:
                    for c in args.concurrency:
                        row = {
                            "batching": "on" if batching else "off",
                            **load(
                                f"http://127.0.0.1:{port}", model_id, None, c, args.seconds, image
                            ),
                        }
                        result["runs"].append(row)
                        print(
                            f"batching {row['batching']:>3}  c={c:<3} {row['images_per_s']:8.2f} img/s"
                            f"  p50 {row['p50_ms']:8.1f} ms  p95 {row['p95_ms']:8.1f} ms"
                            f"  p99 {row['p99_ms']:8.1f} ms  ({row['requests']} req, {row['errors']} err)",
                            flush=True,
                        )
                finally:
                    proc.terminate()
                    proc.wait(timeout=30)
            sizes = sorted(set(args.concurrency) | {1})
            bare = bare_forward(model_path, sizes, args.threads, args.repeats)
            result["bare_forward_s"] = {str(b): t for b, t in bare.items()}
            for b, t in bare.items():
                print(f"bare forward  batch {b:<3} {1000 * t:8.1f} ms  {b / t:8.2f} img/s")
    runs = {(r["batching"], r["concurrency"]): r for r in result["runs"]}
    summary: dict[str, Any] = {}
    top = max(args.concurrency)
    if ("on", top) in runs and ("off", top) in runs:
        summary[f"batching_speedup_c{top}"] = (
            runs[("on", top)]["images_per_s"] / runs[("off", top)]["images_per_s"]
        )
    if "bare_forward_s" in result and ("on", 1) in runs:
        summary["p50_c1_over_bare_b1"] = (
            runs[("on", 1)]["p50_ms"] / 1000 / result["bare_forward_s"]["1"]
        )
    result["summary"] = summary
    print(json.dumps(summary))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
