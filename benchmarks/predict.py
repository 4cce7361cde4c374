"""Batch-prediction throughput: ``predict_files`` over a folder of JPEGs vs the bare forward pass.

Builds a random-weight adapted classifier (default ViT-B-16, 10 classes; ``--arch must-tiny --config
tests/assets/tiny_clip.json`` for a quick run), writes N seeded JPEGs at 256×256 and measures, side by
side in one process:

- ``bare_forward``: the model on pre-built input tensors only (no decode, no transform);
- ``predict_files`` with ``num_workers`` 0 (decode in this process) and each value of ``--workers``
  (DataLoader decode processes), end to end from files to top-k results.

Prints a table and writes JSON (images/s, and each as a fraction of the bare forward).

    python -m benchmarks.predict --arch must-tiny --config tests/assets/tiny_clip.json --images 512
    python -m benchmarks.predict --images 256 --batch-size 32 --workers 2   # ViT-B-16
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]


def _write_images(folder: Path, n: int) -> list[Path]:
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(0)
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for i in range(n):
        arr = rng.integers(0, 255, (256, 256, 3), dtype=np.uint8)
        p = folder / f"{i:05d}.jpg"
        Image.fromarray(arr).save(p, quality=90)
        paths.append(p)
    return paths


def _bare(model: Any, n: int, batch: int) -> float:
    import torch

    size = model.preprocess.image_size
    x = torch.randn(batch, 3, size, size)
    with torch.inference_mode():
        model(x)  # warm-up
        t0 = time.perf_counter()
        done = 0
        while done < n:
            model(x[: min(batch, n - done)])
            done += batch
    return n / (time.perf_counter() - t0)


def _predict(model: Any, paths: list[Path], batch: int, workers: int) -> float:
    from must_core.ml.predict import predict_files

    list(predict_files(model, paths[: batch * 2], batch_size=batch, num_workers=workers))  # warm-up
    t0 = time.perf_counter()
    count = sum(1 for _ in predict_files(model, paths, batch_size=batch, num_workers=workers))
    elapsed = time.perf_counter() - t0
    assert count == len(paths)
    return len(paths) / elapsed


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.predict")
    p.add_argument("--arch", default="ViT-B-16")
    p.add_argument("--config", default=None, help="open_clip model-config JSON (tiny configs)")
    p.add_argument("--classes", type=int, default=10)
    p.add_argument("--images", type=int, default=256)
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--workers", type=int, nargs="*", default=[2])
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "predict.json")
    args = p.parse_args(argv)

    import torch

    from benchmarks.classify import make_model
    from must_core.ml.inference import AdaptedClassifier

    if args.threads:
        torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory() as tmp:
        model_path = Path(tmp) / "model.safetensors"
        make_model(model_path, args.arch, args.config, args.classes)
        model = AdaptedClassifier.load(model_path)
        paths = _write_images(Path(tmp) / "images", args.images)
        bare = _bare(model, args.images, args.batch_size)
        rows = [{"mode": "bare_forward", "workers": None, "images_per_s": bare}]
        for workers in [0, *args.workers]:
            ips = _predict(model, paths, args.batch_size, workers)
            rows.append({"mode": "predict_files", "workers": workers, "images_per_s": ips})
    for row in rows:
        row["vs_bare"] = row["images_per_s"] / bare
    result = {
        "arch": args.arch,
        "images": args.images,
        "batch_size": args.batch_size,
        "threads": torch.get_num_threads(),
        "rows": rows,
    }
    sys.stdout.write(f"{'mode':<16}{'workers':>8}{'images/s':>12}{'vs bare':>9}\n")
    for row in rows:
        w = "-" if row["workers"] is None else str(row["workers"])
        sys.stdout.write(
            f"{row['mode']:<16}{w:>8}{row['images_per_s']:>12.1f}{row['vs_bare']:>9.2f}\n"
        )
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2))
    sys.stdout.write(f"wrote {args.out}\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
