"""The shift benchmark's full-MUST run, once through the CLI and once through the service (REST API).

    python -m benchmarks.shift.service_run          # seed 0, 2 threads; needs the cache of run.py

1. ``must adapt`` (the CLI, a subprocess) on the unlabeled target split with the default config.
2. ``must serve`` in embedded mode (SQLite, local-disk store, Celery worker on the embedded broker),
   a job submitted with ``POST /v1/jobs`` for the same images, base model, templates and seed, polled
   until it finishes; its evaluation metrics are read from ``GET /v1/jobs/{id}``.
3. The labelled test images are then sent to ``POST /v1/models/{id}/classify`` (adapted model) and to
   ``POST /v1/classify`` (zero-shot base model), so the accuracy is also measured as a client sees it.

Writes ``docs/benchmarks/shift_service.json``; ``benchmarks.shift.report`` puts it in docs/benchmarks.md.
The two runs use the same engine code path (``must_core.ml.train.adapt``), seed and thread count, so
their accuracies agree up to floating-point summation order.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import httpx

from benchmarks.shift.data import CLASSES, TEMPLATES, write_target
from benchmarks.shift.run import DATA_SEED, N_ADAPT, N_TEST, N_VAL

REPO = Path(__file__).resolve().parents[2]


def _log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _env(threads: int) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("MUST_")}
    env.update(
        {
            "PYTHONPATH": str(REPO),
            "OMP_NUM_THREADS": str(threads),
            "MUST_WORKER__NUM_THREADS": str(threads),
            "MUST_WORKER__DEVICE": "cpu",
            "MUST_API__NUM_THREADS": "1",
        }
    )
    return env


def run_cli(
    model_dir: Path, splits: Any, out: Path, seed: int, threads: int, work: Path
) -> dict[str, Any]:
    tmpl = work / "templates.txt"
    tmpl.write_text("\n".join(TEMPLATES) + "\n")
    cmd = [
        sys.executable,
        "-m",
        "must_core.cli",
        "adapt",
        str(splits.adapt_dir),
        "--class-names",
        ",".join(CLASSES),
        "--templates",
        str(tmpl),
        "--output",
        str(out),
        "--model",
        f"local-dir:{model_dir}",
        "--eval-dir",
        str(splits.test_dir),
        "--seed",
        str(seed),
        "--threads",
        str(threads),
        "--device",
        "cpu",
        "--no-resume",
        "--quiet",
    ]
    _log("CLI: " + " ".join(cmd[2:]))
    t0 = time.monotonic()
    subprocess.run(cmd, check=True, env=_env(threads), cwd=REPO)
    seconds = time.monotonic() - t0
    metrics = json.loads((out / "metrics.json").read_text())["metrics"]
    return {"seconds": round(seconds, 1), "metrics": metrics}


def _accuracy_via_classify(
    c: httpx.Client, path: str, items: list[tuple[Path, int]], fields: dict[str, str], chunk: int
) -> dict[str, Any]:
    correct = 0
    per_class = [[0, 0] for _ in CLASSES]
    t0 = time.monotonic()
    for i in range(0, len(items), chunk):
        part = items[i : i + chunk]
        files = [("images", (p.name, p.read_bytes(), "image/png")) for p, _ in part]
        r = c.post(path, files=files, data={**fields, "top_k": "1"})
        r.raise_for_status()
        results = r.json()["results"]
        assert len(results) == len(part)
        for (_, label), res in zip(part, results, strict=True):
            hit = res["label"] == CLASSES[label]
            correct += hit
            per_class[label][0] += hit
            per_class[label][1] += 1
    seconds = time.monotonic() - t0
    return {
        "top1": round(100.0 * correct / len(items), 2),
        "mean_per_class": round(100.0 * sum(h / n for h, n in per_class if n) / len(CLASSES), 2),
        "images": len(items),
        "seconds": round(seconds, 1),
    }


def run_service(
    model_dir: Path, splits: Any, seed: int, threads: int, work: Path, timeout_s: float
) -> dict[str, Any]:
    from must_core.ml.data import scan_labelled

    data_dir = work / "service-data"
    port = _free_port()
    cmd = [
        sys.executable,
        "-m",
        "must_core.cli.service",
        "serve",
        "--data-dir",
        str(data_dir),
        "--port",
        str(port),
        "--allow-root",
        str(splits.adapt_dir.parent.resolve()),
        "--allow-root",
        str(model_dir.resolve()),
    ]
    log_path = work / "serve.log"
    _log(f"service: must serve --data-dir {data_dir} --port {port} (log: {log_path})")
    with log_path.open("wb") as log:
        proc = subprocess.Popen(cmd, env=_env(threads), cwd=REPO, stdout=log, stderr=log)
    base = f"http://127.0.0.1:{port}"
    try:
        with httpx.Client(base_url=base, timeout=120) as c:
            deadline = time.monotonic() + 180
            while True:
                if proc.poll() is not None:
                    raise RuntimeError(f"must serve exited: {log_path.read_text()[-3000:]}")
                try:
                    if c.get("/readyz", timeout=2).status_code == 200:
                        break
                except httpx.HTTPError:
                    pass
                if time.monotonic() > deadline:
                    raise TimeoutError("must serve did not become ready")
                time.sleep(0.5)
            base_model = {
                "arch": "shift-tiny-clip",
                "config_uri": f"file://{model_dir / 'open_clip_config.json'}",
                "checkpoint_uri": f"file://{model_dir / 'open_clip_model.safetensors'}",
            }
            body = {
                "dataset_uri": f"file://{splits.adapt_dir.resolve()}",
                "eval_dataset_uri": f"file://{splits.test_dir.resolve()}",
                "class_names": list(CLASSES),
                "templates": list(TEMPLATES),
                "base_model": base_model,
                "params": {"seed": seed},
            }
            t0 = time.monotonic()
            r = c.post("/v1/jobs", json=body)
            if r.status_code != 202:
                raise RuntimeError(f"POST /v1/jobs -> {r.status_code}: {r.text}")
            job_id = r.json()["id"]
            _log(f"service: job {job_id} submitted")
            last = -1
            while True:
                job = c.get(f"/v1/jobs/{job_id}").json()
                step = job["progress"]["step"]
                if step // 100 != last // 100:
                    _log(
                        f"service: job {job['status']} step {step}/{job['progress']['total_steps']}"
                    )
                    last = step
                if job["status"] in ("succeeded", "failed", "cancelled"):
                    break
                if time.monotonic() - t0 > timeout_s:
                    raise TimeoutError(f"job {job_id} not finished after {timeout_s:.0f}s")
                time.sleep(1.0)
            seconds = time.monotonic() - t0
            if job["status"] != "succeeded":
                raise RuntimeError(f"job {job_id} {job['status']}: {job.get('error')}")
            items, _ = scan_labelled(splits.test_dir, list(CLASSES))
            adapted = _accuracy_via_classify(
                c, f"/v1/models/{job['model_id']}/classify", items, {}, chunk=64
            )
            zero_shot = _accuracy_via_classify(
                c,
                "/v1/classify",
                items,
                {
                    "base_model": json.dumps(base_model),
                    "class_names": json.dumps(list(CLASSES)),
                    "templates": json.dumps(list(TEMPLATES)),
                },
                chunk=64,
            )
            return {
                "job_id": job_id,
                "model_id": job["model_id"],
                "seconds": round(seconds, 1),
                "steps": job["progress"]["step"],
                "job_metrics": job["metrics"]["eval"],
                "classify_adapted": adapted,
                "classify_zero_shot": zero_shot,
            }
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            proc.kill()


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--cache", type=Path, default=Path(".cache/shift"))
    ap.add_argument("--out", type=Path, default=Path("docs/benchmarks"))
    ap.add_argument("--timeout", type=float, default=1800, help="seconds to wait for the job")
    ap.add_argument("--no-write", action="store_true")
    args = ap.parse_args(argv)

    from benchmarks.shift.pretrain import pretrain

    cache = args.cache.resolve()
    splits = write_target(cache / "data" / "target", N_ADAPT, N_VAL, N_TEST, DATA_SEED)
    info = pretrain(cache / "model", log=_log)
    model_dir = Path(info["path"]).resolve()
    work = Path(tempfile.mkdtemp(prefix="service_run_", dir=cache))
    try:
        cli = run_cli(model_dir, splits, work / "cli", args.seed, args.threads, work)
        m = cli["metrics"]
        _log(
            f"CLI: top1 {m['adapted']['top1']:.2f} (ema {m['adapted_ema']['top1']:.2f}, "
            f"zero-shot {m['zero_shot']['top1']:.2f}) in {cli['seconds']:.0f}s"
        )
        svc = run_service(model_dir, splits, args.seed, args.threads, work, args.timeout)
        jm = svc["job_metrics"]
        _log(
            f"service job: top1 {jm['adapted']['top1']:.2f} (ema {jm['adapted_ema']['top1']:.2f}, "
            f"zero-shot {jm['zero_shot']['top1']:.2f}) in {svc['seconds']:.0f}s; via /classify: "
            f"adapted {svc['classify_adapted']['top1']:.2f}, "
            f"zero-shot {svc['classify_zero_shot']['top1']:.2f}"
        )
    finally:
        shutil.rmtree(work, ignore_errors=True)
    result = {
        "seed": args.seed,
        "threads": args.threads,
        "cli": {
            "seconds": cli["seconds"],
            "zero_shot_top1": m["zero_shot"]["top1"],
            "top1": m["adapted"]["top1"],
            "ema_top1": m["adapted_ema"]["top1"],
            "mean_per_class": m["adapted"]["mean_per_class"],
        },
        "service": {
            "seconds": svc["seconds"],
            "steps": svc["steps"],
            "zero_shot_top1": jm["zero_shot"]["top1"],
            "top1": jm["adapted"]["top1"],
            "ema_top1": jm["adapted_ema"]["top1"],
            "mean_per_class": jm["adapted"]["mean_per_class"],
            "classify_adapted": svc["classify_adapted"],
            "classify_zero_shot": svc["classify_zero_shot"],
        },
    }
    result["top1_difference"] = round(result["service"]["top1"] - result["cli"]["top1"], 2)
    print(json.dumps(result, indent=1))
    if not args.no_write:
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / "shift_service.json").write_text(json.dumps(result, indent=1) + "\n")
        _log(f"wrote {args.out / 'shift_service.json'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
