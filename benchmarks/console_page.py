"""Weight and load time of the console's job page for a big finished job, in headless Chromium.

Seeds an embedded-mode data dir (SQLite + local store) with one succeeded job that has
``--points`` training-curve points, ``--classes`` classes (eval per class, histograms, a sample
gallery of 8 thumbnails per class) and ``--log-lines`` log lines, starts the API on loopback and
opens ``/ui/#/job/ID`` in a fresh browser context (empty cache) ``--repeats`` times. Load time:
navigation start until the loss curve holds every point, the gallery shows its images and the logs
are in. Weight: bytes of every response the page received by then (HTML, JS, CSS, API JSON).

    python -m benchmarks.console_page                        # 1,000 points, 10 and 1,000 classes
    python -m benchmarks.console_page --classes 10 --repeats 5
"""

from __future__ import annotations

import argparse
import base64
import io
import json
import os
import random
import statistics
import subprocess
import sys
import tempfile
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from benchmarks.classify import start_server

ROOT = Path(__file__).resolve().parents[1]
CHROMIUM = os.environ.get("MUST_CHROMIUM", "/usr/bin/chromium")


def _thumbnail(seed: int) -> str:
    from PIL import Image

    rng = random.Random(seed)
    img = Image.new("RGB", (96, 96), tuple(rng.randrange(256) for _ in range(3)))
    for _ in range(200):
        xy = (rng.randrange(96), rng.randrange(96))
        img.putpixel(xy, tuple(rng.randrange(256) for _ in range(3)))
    buf = io.BytesIO()
    img.save(buf, format="JPEG", quality=80)
    return "data:image/jpeg;base64," + base64.b64encode(buf.getvalue()).decode()


def _point(step: int, total: int) -> dict[str, Any]:
    decay = 2.0 * (1 - step / total) + 0.3
    return {
        "type": "progress",
        "step": step,
        "total_steps": total,
        "epoch": step // 100,
        "fraction": step / total,
        "losses": {"loss": decay + 0.5, "st": decay, "fair": 0.2, "mim": 0.3, "align": 0.05},
        "conf_ratio": min(1.0, 0.3 + 0.6 * step / total),
        "lr": 1e-4,
        "ema_decay": 0.999,
        "images_per_second": 120.0,
        "eta_seconds": 0.0,
        "phase": "train",
    }


def seed(env: dict[str, str], points: int, classes: int, log_lines: int) -> str:
    """One succeeded job of the default tenant with everything the job page shows; its id."""
    subprocess.run(
        [sys.executable, "-m", "must_core.cli", "migrate"], cwd=ROOT, env=env, check=True
    )
    os.environ.update(env)
    from must_core.db.models import AdaptedModel
    from must_core.db.session import make_engine, make_sessionmaker, session_scope
    from must_core.jobs import history, queries
    from must_core.settings import Settings

    settings = Settings()
    names = [f"class {k:04d}" for k in range(classes)]
    counts = {n: 1 + k % 17 for k, n in enumerate(names)}
    evals = {
        key: {"top1": 50.0, "mean_per_class": 50.0, "num_images": 10 * classes,
              "per_class": {n: float(k % 101) for k, n in enumerate(names)}}
        for key in ("zero_shot", "adapted", "adapted_ema")
    }  # fmt: skip
    metrics = {
        **evals,
        "predicted_classes": {"num_images": sum(counts.values()), "zero_shot": counts,
                              "adapted": counts, "adapted_ema": counts},
        "train": {"loss": 0.8, "conf_ratio": 0.9},
    }  # fmt: skip
    thumbs = [_thumbnail(i) for i in range(16)]
    sessions = make_sessionmaker(make_engine(settings.database_url))
    with session_scope(sessions) as db:
        tenant = queries.get_or_create_tenant(db, queries.DEFAULT_TENANT)
        spec = {"dataset_uri": "s3://bench/images/", "class_names": names,
                "base_model": {"arch": "ViT-B-16", "pretrained": "openai"}, "params": {}}  # fmt: skip
        job = queries.create_job(db, tenant.id, spec)
        now = datetime.now(UTC)
        job.status, job.attempt, job.started_at, job.finished_at = "succeeded", 1, now, now
        job.progress = {"step": points, "total_steps": points, "fraction": 1.0, "phase": "done"}
        job.metrics = metrics
        model = AdaptedModel(tenant_id=tenant.id, job_id=job.id, class_names=names,
                             base_model=spec["base_model"], metrics=metrics,
                             artifact_key="unused", size_bytes=1)  # fmt: skip
        db.add(model)
        db.flush()
        job.model_id = model.id
        history.record_events(db, job.id, 1, [_point(s, points) for s in range(1, points + 1)])
        lines = [
            history.log_line(1, now, "info", "worker.training", f"[trainer] line {i}")
            for i in range(log_lines)
        ]
        history.record_logs(db, job.id, lines)
        gallery = {n: [{"path": f"{n}/{i}.jpg", "score": 0.9 - i / 100,
                        "thumbnail": thumbs[(k + i) % 16]} for i in range(8)]
                   for k, n in enumerate(names)}  # fmt: skip
        db.add_all(history.sample_rows(model.id, gallery))
        return str(job.id)


def measure(base: str, job_id: str, points: int, repeats: int) -> list[dict[str, float]]:
    from playwright.sync_api import sync_playwright

    ready = (
        "() => { const l = document.querySelector('#chart-loss polyline[data-series=loss]');"
        f" return l && l.getAttribute('points').split(' ').length === {points}"
        " && document.querySelectorAll('#gallery img').length > 0"
        " && document.querySelector('#logs').textContent.length > 0; }"
    )
    runs = []
    with sync_playwright() as pw:
        browser = pw.chromium.launch(
            executable_path=CHROMIUM,
            args=["--no-sandbox", "--disable-gpu", "--disable-background-networking"],
        )
        for _ in range(repeats):
            context = browser.new_context(viewport={"width": 1280, "height": 900})
            page = context.new_page()
            responses: list[Any] = []
            page.on("response", lambda r, got=responses: got.append(r))
            t0 = time.perf_counter()
            page.goto(f"{base}/ui/#/job/{job_id}")
            page.wait_for_function(ready, timeout=120_000, polling=20)
            seconds = time.perf_counter() - t0
            got = list(responses)  # the page polls on: count what it had when it was ready
            kbs = {r.url.split("?")[0].replace(base, ""): len(r.body()) / 1024 for r in got}
            kb = sum(kbs.values())
            runs.append(
                {"load_ms": 1000 * seconds, "kb": kb, "requests": len(got), "kb_by_url": kbs}
            )
            context.close()
        browser.close()
    return runs


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--points", type=int, default=1000)
    ap.add_argument("--classes", type=int, nargs="+", default=[10, 1000])
    ap.add_argument("--log-lines", type=int, default=500)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--port", type=int, default=8791)
    ap.add_argument("--out", type=Path, default=ROOT / "docs" / "benchmarks" / "console_page.json")
    args = ap.parse_args()
    results = []
    for k in args.classes:
        with tempfile.TemporaryDirectory() as tmp:
            env = {
                **{a: b for a, b in os.environ.items() if not a.startswith("MUST_")},
                "MUST_DATA_DIR": str(Path(tmp) / "data"),
                "MUST_API__AUTH": "none",
                "MUST_API__NUM_THREADS": "1",
                "MUST_LOG_LEVEL": "WARNING",
                "OMP_NUM_THREADS": "1",
            }
            job_id = seed(env, args.points, k, args.log_lines)
            server = start_server(env, args.port, Path(tmp) / "api.log")
            try:
                runs = measure(f"http://127.0.0.1:{args.port}", job_id, args.points, args.repeats)
            finally:
                server.terminate()
                server.wait(timeout=30)
        row = {
            "points": args.points,
            "classes": k,
            "log_lines": args.log_lines,
            "load_ms_median": statistics.median(r["load_ms"] for r in runs),
            "kb_median": statistics.median(r["kb"] for r in runs),
            "requests": runs[0]["requests"],
            "runs": runs,
        }
        results.append(row)
        print(
            f"{args.points} points, {k:5d} classes: {row['kb_median']:8.1f} KB in "
            f"{row['requests']} responses, loaded in {row['load_ms_median']:7.0f} ms (median of "
            f"{args.repeats})"
        )
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"job_page": results}, indent=2) + "\n")


if __name__ == "__main__":
    main()
