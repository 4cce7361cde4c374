"""Data pipeline, start-up and step throughput, each measured side by side in one run.

1. ``pipeline``: training samples (decode + weak view + strong view + mask) per CPU-second, one process,
   one thread, 224 px, from 500×375 JPEGs:
   - ``baseline``: the reference's recipe written out here (full decode, resize + random crop, timm
     RandomResizedCrop + flip + ``rand-m9-mstd0.5-inc1``, float conversion and normalisation per view);
   - ``before``: this engine's loader before the prepared dataset (``weak_transform``/``strong_transform``);
   - ``raw``: today's loader from the raw JPEGs (uint8 views, normalised later on the device);
   - ``prepared``: today's loader from the prepared form (decoded once, 258 px shorter side).
2. ``startup_s``: process start to the end of the first optimizer step on N generated JPEGs (tiny
   model, 32 px), ``before`` = the engine at commit 86ad811 (a git worktree, run in a subprocess) and
   ``after`` = today with an empty prepared-dataset cache (the service's dataset key included; the
   first step runs as soon as the first chunk is prepared, the pass goes on in the background);
   ``after_cached`` = today when the cache holds the dataset.
3. ``step_s``: one MUST step eager vs ``torch.compile``'d, per model (compile time reported apart).

    python -m benchmarks.throughput [--sizes 10000 100000] [--before-tree DIR]

Writes docs/benchmarks/throughput.json (``--out``).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

REPO = Path(__file__).resolve().parents[1]
MEAN, STD = (0.48145466, 0.4578275, 0.40821073), (0.26862954, 0.26130258, 0.27577711)


def _photo(seed: int, size: tuple[int, int] = (500, 375)) -> Image.Image:
    """A photo-like image: smooth random colour fields with some texture (JPEG-compressible)."""
    rng = np.random.default_rng(seed)
    w, h = size
    low = rng.integers(0, 255, (h // 25 + 1, w // 25 + 1, 3), dtype=np.uint8)
    img = Image.fromarray(low).resize((w, h), Image.Resampling.BICUBIC)
    noise = rng.normal(0, 12, (h, w, 3))
    return Image.fromarray(np.clip(np.asarray(img) + noise, 0, 255).astype(np.uint8))


def _write_jpegs(args: tuple[Path, int, int]) -> None:
    folder, start, stop = args
    for i in range(start, stop):
        _photo(i).save(folder / f"{i:07d}.jpg", quality=90)


UNIQUE = 5_000  # distinct generated photos; larger sets repeat them as copies of their own


def make_dataset(folder: Path, n: int, workers: int) -> Path:
    """``n`` JPEGs: up to ``UNIQUE`` generated ones, the rest byte copies under their own names (every
    file still costs a full decode; generating 100k distinct photos takes longer than the benchmark)."""
    if folder.is_dir() and len(list(folder.glob("*.jpg"))) == n:
        return folder
    shutil.rmtree(folder, ignore_errors=True)
    folder.mkdir(parents=True)
    unique = min(n, UNIQUE)
    step = max(1, unique // (workers * 8))
    tasks = [(folder, s, min(unique, s + step)) for s in range(0, unique, step)]
    with ProcessPoolExecutor(workers) as pool:
        list(pool.map(_write_jpegs, tasks))
    for i in range(unique, n):
        shutil.copyfile(folder / f"{i % unique:07d}.jpg", folder / f"{i:07d}.jpg")
    return folder


# ---- 1. pipeline ---------------------------------------------------------------------------------
def _baseline_sample(path: Path) -> Any:
    from timm.data import create_transform
    from torchvision import transforms as T

    if not hasattr(_baseline_sample, "tf"):
        weak = T.Compose(
            [
                T.Resize(224, interpolation=T.InterpolationMode.BICUBIC),
                T.RandomCrop(224),
                T.ToTensor(),
                T.Normalize(MEAN, STD),
            ]
        )
        strong = create_transform(
            224,
            is_training=True,
            scale=(0.3, 1.0),
            hflip=0.5,
            color_jitter=0.0,
            auto_augment="rand-m9-mstd0.5-inc1",
            interpolation="bicubic",
            mean=MEAN,
            std=STD,
            re_prob=0.0,
        )
        from must_core.ml.masking import MaskGenerator  # the mask generator is the reference's

        for t in strong.transforms:  # the reference crashes on posterize at magnitude 10 (§10)
            for op in getattr(t, "ops", []):
                if getattr(op, "name", "") == "PosterizeIncreasing":
                    op.magnitude_max = 9.99

        _baseline_sample.tf = (weak, strong, MaskGenerator(224, 32, 16, 0.1))  # type: ignore[attr-defined]
    weak, strong, masks = _baseline_sample.tf  # type: ignore[attr-defined]
    with Image.open(path) as im:
        img = im.convert("RGB")
    return weak(img), strong(img), masks(np.random.default_rng(0))


def _rate(fn: Any, n: int) -> float:
    fn(0)  # warm-up (imports, first allocations)
    t0 = time.process_time()
    for i in range(n):
        fn(i)
    return n / (time.process_time() - t0)


def pipeline(root: Path, n: int) -> dict[str, float]:
    from must_core.ml.data import (
        MustTrainDataset,
        RawImages,
        StrongView,
        WeakView,
        load_image,
        strong_transform,
        weak_transform,
    )
    from must_core.ml.masking import MaskGenerator
    from must_core.ml.model import Preprocess
    from must_core.ml.prepared import prepare_folder, short_side_for

    pp = Preprocess(
        image_size=224, mean=MEAN, std=STD, interpolation="bicubic", resize_mode="shortest"
    )
    files = sorted(root.glob("*.jpg"))
    masks = MaskGenerator(224, 32, 16, 0.1)
    prepared = prepare_folder(root, root.parent / "prepared-224", short_side_for(224), 2)
    weak, strong = WeakView(224), StrongView(pp, (0.8, 1.0))
    raw_ds = MustTrainDataset(RawImages(files, draft_size=448), weak, strong, masks, seed=0)
    prep_ds = MustTrainDataset(prepared, weak, strong, masks, seed=0)
    old_weak, old_strong = weak_transform(pp), strong_transform(pp, (0.8, 1.0))
    rng = np.random.default_rng(0)

    def before(i: int) -> Any:
        img = load_image(files[i % len(files)], draft_size=448)
        return old_weak(img), old_strong(img), masks(rng)

    return {
        "baseline": _rate(lambda i: _baseline_sample(files[i % len(files)]), n),
        "before": _rate(before, n),
        "raw": _rate(lambda i: raw_ds[0, i % len(files)], n),
        "prepared": _rate(lambda i: prep_ds[0, i % len(files)], n),
    }


# ---- 2. start-up ---------------------------------------------------------------------------------
_STARTUP = r"""
import json, sys, time
from pathlib import Path
t0 = time.monotonic()
from must_core.ml.config import BaseModelSpec, make_config
from must_core.ml.train import adapt
images, out, config, cache = sys.argv[1], sys.argv[2], sys.argv[3], sys.argv[4]
kw = {}
if cache != "-":  # the service names the dataset for its cache before it starts the trainer
    from must_core.ml.prepared import dataset_key
    dataset_key(Path(images))
    kw = {"prepared_cache": Path(cache)}
polls = []
def stop():  # polled before every step: the second poll comes when the first step is done
    polls.append(time.monotonic())
    return len(polls) > 1
adapt(make_config(batch_size=64, epochs=1, num_workers=0, num_threads=1, export_ema=False),
      images_dir=Path(images), class_names=["a", "b", "c"], output_dir=Path(out),
      base_model=BaseModelSpec(arch="must-tiny", config=config, allow_random_init=True), resume=False, should_stop=stop, **kw)
print(json.dumps({"startup_s": polls[1] - t0}))
"""


def _startup(tree: Path, images: Path, work: Path, cache: Path | None) -> float:
    out = work / f"out-{time.monotonic_ns()}"
    env = {**os.environ, "PYTHONPATH": str(tree), "OMP_NUM_THREADS": "1"}
    cmd = [
        sys.executable,
        "-c",
        _STARTUP,
        str(images),
        str(out),
        str(REPO / "tests/assets/tiny_clip.json"),
        str(cache) if cache else "-",
    ]
    res = subprocess.run(cmd, env=env, cwd=tree, capture_output=True, text=True, check=True)
    shutil.rmtree(out, ignore_errors=True)
    return float(json.loads(res.stdout.strip().splitlines()[-1])["startup_s"])


BEFORE = "86ad811"  # the engine before the prepared dataset and the execution-model change


def _before_tree() -> Path:
    tree = Path(tempfile.gettempdir()) / f"must-before-{BEFORE}"
    if not tree.exists():
        subprocess.run(
            ["git", "-C", str(REPO), "worktree", "add", "--detach", str(tree), BEFORE], check=True
        )
    return tree


def startup(sizes: list[int], before_tree: Path, work: Path) -> dict[str, dict[str, float]]:
    from must_core.ml.prepared import prepare_folder, prepared_dir, short_side_for

    rows = {}
    for n in sizes:
        images = make_dataset(work / f"jpegs-{n}", n, os.cpu_count() or 1)
        cache = work / f"cache-{n}"
        shutil.rmtree(cache, ignore_errors=True)
        before = _startup(before_tree, images, work, None)
        after = _startup(REPO, images, work, cache)  # stops after step 1: the pass is cut short
        side = short_side_for(32)  # complete the pass (32 px tiny model), as a job training on does
        prepare_folder(images, prepared_dir(cache, side), side, os.cpu_count() or 1)
        cached = _startup(REPO, images, work, cache)
        label = f"{n // 1000}k"
        rows[label] = {"before": before, "after": after, "after_cached": cached}
        print(
            f"start-up {label}: before {before:.1f}s, after {after:.1f}s, cached {cached:.1f}s",
            flush=True,
        )
    return rows


# ---- 3. step -------------------------------------------------------------------------------------
def step_times(models: list[str], steps: int) -> dict[str, dict[str, float]]:
    from benchmarks.scale import _model
    from must_core.ml.config import batch_layout
    from must_core.ml.distributed import DistContext
    from must_core.ml.ema import make_teacher
    from must_core.ml.losses import LossWeights
    from must_core.ml.masking import MaskGenerator
    from must_core.ml.model import default_mask_patch_size
    from must_core.ml.step import CompiledOrEager, GlobalStep

    out = {}
    for name in models:
        batch = 32 if name == "tiny" else 8
        model = _model(name, torch.device("cpu"), 100)
        teacher = make_teacher(model)
        size, p = model.image_size, model.patch_size
        gen = MaskGenerator(size, default_mask_patch_size(size, p), p, 0.1)
        rng = np.random.default_rng(0)
        mb = [
            (
                torch.randn(batch, 3, size, size),
                torch.randn(batch, 3, size, size),
                torch.stack([torch.from_numpy(gen(rng)) for _ in range(batch)]),
            )
        ]
        row: dict[str, float] = {"batch": batch}
        for mode in ("eager", "compiled"):
            extra = (
                {
                    "student_forward": CompiledOrEager(model),
                    "teacher_forward": CompiledOrEager(teacher),
                }
                if mode == "compiled"
                else {}
            )
            step = GlobalStep(
                student=model,
                model=model,
                teacher=teacher,
                layout=batch_layout(batch, 1, None),
                dist=DistContext(),
                conf_threshold=0.5,
                weights=LossWeights(4.0, 1.0, 0.2),
                moving_average_fairness=False,
                autocast=__import__("contextlib").nullcontext,
                **extra,
            )
            t0 = time.perf_counter()
            step(mb, None)  # first call: compiles
            row[f"{mode}_first_call_s"] = time.perf_counter() - t0
            ts = []
            for _ in range(steps):
                model.zero_grad(set_to_none=True)
                t0 = time.perf_counter()
                step(mb, None)
                ts.append(time.perf_counter() - t0)
            row[mode] = statistics.median(ts)
        row["speedup"] = row["eager"] / row["compiled"]
        out[name] = row
        print(
            f"step {name}: eager {row['eager']:.3f}s compiled {row['compiled']:.3f}s "
            f"(x{row['speedup']:.2f}; compile {row['compiled_first_call_s']:.0f}s)",
            flush=True,
        )
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--sizes", type=int, nargs="*", default=[10_000, 100_000])
    ap.add_argument("--before-tree", type=Path, default=None, help="default: a worktree at BEFORE")
    ap.add_argument("--work", type=Path, default=Path(tempfile.gettempdir()) / "must-throughput")
    ap.add_argument("--pipeline-samples", type=int, default=300)
    ap.add_argument("--models", nargs="*", default=["tiny", "vit-b-16"])
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--skip", nargs="*", default=[], choices=["pipeline", "startup", "step"])
    ap.add_argument("--out", type=Path, default=REPO / "docs/benchmarks/throughput.json")
    args = ap.parse_args()
    torch.set_num_threads(1)
    report: dict[str, Any] = json.loads(args.out.read_text()) if args.out.exists() else {}
    args.work.mkdir(parents=True, exist_ok=True)
    if "pipeline" not in args.skip:
        root = make_dataset(args.work / "pipeline-jpegs", 200, os.cpu_count() or 1)
        rates = pipeline(root, args.pipeline_samples)
        report["pipeline"] = {
            "samples_per_cpu_s": rates,
            "image_size": 224,
            "source": "500x375 JPEG",
            "prepared_vs_baseline": rates["prepared"] / rates["baseline"],
            "raw_vs_before": rates["raw"] / rates["before"],
        }
        print("pipeline samples/CPU-s:", {k: round(v, 1) for k, v in rates.items()}, flush=True)
    if "startup" not in args.skip:
        tree = args.before_tree or _before_tree()
        report["startup_s"] = startup(args.sizes, tree, args.work)
    if "step" not in args.skip:
        torch.set_num_threads(2)
        report["step_s"] = step_times(args.models, args.steps)
    report["meta"] = {"torch": torch.__version__, "cpus": os.cpu_count()}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
