"""The shift *suite*: the engine's defaults against zero-shot on several target domains at once.

    python -m benchmarks.shift.suite --cache .cache/shift   # seeds 0 1 2, the default variants, --jobs = cores

Six target domains, all rendered offline (benchmarks/shift/data.py) and classified by a tiny CLIP
pretrained on source icons (benchmarks/shift/pretrain.py, cached; the first five share one):

- ``shapes10``: the shift benchmark's target (10 balanced shape classes on cluttered prints);
- ``shapes10_imbalanced``: the same renderer with a 10:1 class prior (frequency ∝ 10^(−i/9));
- ``where80``: 80 classes "<size> <shape> in the <top|bottom> <left|right>": a mirror flip changes
  the class (left ↔ right), so a flip augmentation teaches the student the wrong label.
- ``shapes10_small``: shapes10's renderer, each image shrunk to 20 px and enlarged back (bicubic),
  like the small, blurry crops of traffic-sign or character datasets;
- ``place40``: the same without the size word (40 classes "<shape> in the <position>"), so that the
  zero-shot model sees position better than on where80 and a wrong flip has something to destroy.
- ``side20_small``: 20 classes "<shape> on the <left|right>", shrunk to 24 px and enlarged back (small
  images whose class a mirror flip changes, like traffic signs or characters), classified by a second
  tiny CLIP pretrained with the same recipe on icons whose every caption names the side: its zero-shot
  model tells left from right, so a flip augmentation has something to destroy.

Every run is scored on the domain's validation split (for choices) and its test split (reported);
the test split is never used to choose anything. Results go to docs/benchmarks/shift_suite.json.
Finished runs are cached under ``CACHE/suite/`` and reused when nothing that changes them changed.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import platform
import shutil
import statistics
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

from benchmarks.shift.data import (
    CLASSES,
    SIDES,
    TEMPLATES,
    render_target_placed,
    style_key,
    write_target,
)
from benchmarks.shift.pretrain import SIDE_STAGES, SUITE_STAGES
from must_core.ml import augment

SIZES = ("small", "large")
POSITIONS = ("top left", "top right", "bottom left", "bottom right")
WHERE_CLASSES = tuple(f"{s} {c} in the {p}" for s in SIZES for c in CLASSES for p in POSITIONS)
PLACE_CLASSES = tuple(f"{c} in the {p}" for c in CLASSES for p in POSITIONS)
SIDE_CLASSES = tuple(f"{c} on the {s}" for c in CLASSES for s in SIDES)
WHERE_TEMPLATES = ("a picture of a {}.", "a {}.", "a photo of a {}.")
DATA_SEED = 7


@dataclass(frozen=True)
class Domain:
    name: str
    classes: tuple[str, ...]
    templates: tuple[str, ...]
    imbalance_ratio: float  # most / least frequent class in every split
    flip_changes_class: bool
    n_adapt: int
    n_val: int
    n_test: int
    # When set, each image is shrunk to this many pixels and enlarged back. Out of repr (which keys
    # the caches) so that adding it kept the other domains' finished runs; the name carries it.
    low_res: int = field(default=0, repr=False)
    # A class's folder name from what the renderer drew; out of repr for the same reason.
    class_format: str = field(default="{shape}", repr=False)
    # Where the renderer places shapes (benchmarks/shift/data.py LAYOUTS) and which pretrained CLIP
    # (MODELS) classifies the domain; out of repr too (the model's fingerprint keys the runs).
    layout: str = field(default="free", repr=False)
    model: str = field(default="suite", repr=False)


def _flip_domain(name: str, classes: tuple[str, ...], class_format: str, **extra: Any) -> Domain:
    """A balanced domain whose class names a position, so that a mirror flip changes the class."""
    return Domain(
        name,
        classes,
        WHERE_TEMPLATES,
        1.0,
        True,
        1280,
        800,
        1600,
        class_format=class_format,
        **extra,
    )


DOMAINS: dict[str, Domain] = {
    "shapes10": Domain("shapes10", CLASSES, TEMPLATES, 1.0, False, 1280, 1000, 2000),
    "shapes10_imbalanced": Domain(
        "shapes10_imbalanced", CLASSES, TEMPLATES, 10.0, False, 1280, 800, 1600
    ),
    "where80": _flip_domain("where80", WHERE_CLASSES, "{size} {shape} in the {pos}"),
    "shapes10_small": Domain(
        "shapes10_small", CLASSES, TEMPLATES, 1.0, False, 1280, 800, 1600, low_res=20
    ),
    "place40": _flip_domain("place40", PLACE_CLASSES, "{shape} in the {pos}"),
    "side20_small": _flip_domain(
        "side20_small",
        SIDE_CLASSES,
        "{shape} on the {pos}",
        low_res=24,
        layout="side",
        model="side",
    ),
}
# A domain's CLIP: (cache folder under --cache, pretraining stages of benchmarks/shift/pretrain.py).
MODELS = {"suite": ("model", SUITE_STAGES), "side": ("model_side", SIDE_STAGES)}


# The reference's modal settings over its B/16 configs (spec §7) at our batch: fair 1, crop (0.3, 1),
# flip, mask 0.1, align 0.2, conf 0.5 ... and its EMA schedule without the horizon cap; lr 2e-5 (the
# most common value) and its random mask-token init.
REFERENCE = {
    "fair_weight": 1.0,
    "fair_marginal": "reference",
    "strong_crop_scale": (0.3, 1.0),
    "strong_hflip": 0.5,
    "ema_horizon": 0.0,
    "lr": 2e-5,
    "mask_token_init": "random",
    "randaug_geometric": True,
    "strong_strength": "config",
}
VARIANTS: dict[str, dict[str, Any]] = {
    "must_default": {},
    # main's defaults before this suite: per-batch marginal, flip and geometric ops always on, the
    # configured strength
    "must_previous_default": {
        "fair_marginal": "reference",
        "strong_hflip": 0.5,
        "randaug_geometric": True,
        "strong_strength": "config",
    },
    "must_reference": REFERENCE,
    # a plain self-training loop: EMA teacher pseudo-labels, no mask/MIM/alignment, gentle
    # augmentation (crop only, no flip, no RandAugment), fairness weight 1
    "self_training_plain": {
        "mask_ratio": 0.0,
        "mim_weight": 0.0,
        "align_weight": 0.0,
        "fair_weight": 1.0,
        "strong_hflip": 0.0,
        "randaug_num_ops": 0,
    },
    "no_fair": {"fair_weight": 0.0},
    "batch_marginal": {"fair_marginal": "reference"},
    "flip_on": {"strong_hflip": 0.5},
    "geometric_on": {"randaug_geometric": True},
    "geometric_off": {"randaug_geometric": False},
    "estimated_prior": {"fair_prior": "estimated"},
    "adaptive_threshold": {"conf_threshold_mode": "adaptive"},
    "strength_config": {"strong_strength": "config"},
    # one-setting changes of the defaults, for choosing them on the validation splits
    "grid_lr2e-4": {"lr": 2e-4},
    "grid_fair2": {"fair_weight": 2.0},
    "grid_randaug0": {"randaug_num_ops": 0},
    "grid_m5": {"randaug_magnitude": 5.0},
}
DEFAULT_VARIANTS = ("must_default", "must_reference", "self_training_plain", "no_fair")
# How every run executes: one thread, no loader processes, no sample gallery (a run's numbers do not
# depend on it). The dataset is decoded once per domain (the service's prepared form, as the worker
# uses it) instead of at every step.
RUN_SETTINGS: dict[str, Any] = {
    "num_threads": 1,
    "device": "cpu",
    "num_workers": 0,
    "gallery_max_images": 0,
}


# The label-free augmentation rules' constants (must_core.ml.augment): they change what a run trains
# on without changing the engine config, so they key the finished runs too.
AUGMENT_RULES = {
    k: getattr(augment, k)
    for k in (
        "FLIP_TOLERANCE",
        "GEOMETRIC_RATIO",
        "CROP_RATIO",
        "MAGNITUDE_RATIO",
        "MAGNITUDE_STEP",
        "DETAIL_RATIO",
        "LOW_DETAIL_MAGNITUDE",
    )
}


def _log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


def _imbalanced_labels(n: int, k: int, ratio: float, rng: np.random.Generator) -> np.ndarray:
    freq = ratio ** (-np.arange(k) / max(1, k - 1))
    counts = np.maximum(1, np.round(n * freq / freq.sum())).astype(int)
    labels = np.repeat(np.arange(k), counts)
    rng.shuffle(labels)
    return labels


def write_domain(root: Path, d: Domain) -> dict[str, Path]:
    """The adapt (unlabeled, flat) / val / test (class subfolders) splits of a domain, cached."""
    if d.name == "shapes10":
        s = write_target(root, d.n_adapt, d.n_val, d.n_test, DATA_SEED)
        return {"adapt": s.adapt_dir, "val": s.val_dir, "test": s.test_dir}
    splits = {"adapt": root / "adapt", "val": root / "val", "test": root / "test"}
    stamp = f"{style_key()} {d!r} seed={DATA_SEED} v1\n"
    done = root / ".complete"
    if done.exists() and done.read_text() == stamp:
        return splits
    for i, (split, n) in enumerate((("adapt", d.n_adapt), ("val", d.n_val), ("test", d.n_test))):
        folder = splits[split]
        shutil.rmtree(folder, ignore_errors=True)
        folder.mkdir(parents=True)
        rng = np.random.default_rng([DATA_SEED, 100 + i, len(d.classes)])
        # position classes: balanced shapes, placed where the renderer puts them
        if d.flip_changes_class:
            shapes = np.arange(n) % len(CLASSES)
            rng.shuffle(shapes)
        else:
            shapes = _imbalanced_labels(n, len(CLASSES), d.imbalance_ratio, rng)
        for j, shape in enumerate(shapes):
            img, size, pos = render_target_placed(rng, int(shape), layout=d.layout)
            if d.low_res:
                full = img.size
                img = img.resize((d.low_res, d.low_res), Image.Resampling.BOX).resize(full)
            name = d.class_format.format(shape=CLASSES[shape], size=size, pos=pos)
            sub = folder if split == "adapt" else folder / name
            sub.mkdir(exist_ok=True)
            img.save(sub / f"{j:05d}.png")
    done.write_text(stamp)
    return splits


# A run's labelled splits, decoded once per process (eval view): (images, labels) by folder.
_EVAL_SETS: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}


def _eval_set(folder: Path, d: Domain, preprocess: Any) -> tuple[torch.Tensor, torch.Tensor]:
    from must_core.ml.data import EvalDataset, eval_transform, scan_labelled

    key = str(folder)
    if key not in _EVAL_SETS:
        items, _ = scan_labelled(folder, list(d.classes))
        data = EvalDataset(items, eval_transform(preprocess))
        images, labels = zip(*(data[i] for i in range(len(data))), strict=True)
        if len(_EVAL_SETS) >= 4:  # the domains run one after the other: keep the latest few
            _EVAL_SETS.pop(next(iter(_EVAL_SETS)))
        _EVAL_SETS[key] = (torch.stack(images), torch.tensor(labels))
    return _EVAL_SETS[key]


@torch.no_grad()
def _eval(model: torch.nn.Module, folder: Path, d: Domain, preprocess: Any) -> dict[str, float]:
    from must_core.ml.evaluate import accuracy_from_predictions

    x, y = _eval_set(folder, d, preprocess)
    model.eval()
    pred = torch.cat([model(x[i : i + 256]).argmax(-1) for i in range(0, len(x), 256)])
    r = accuracy_from_predictions(pred, y, len(d.classes))
    return {"top1": round(r.top1, 2), "mean_per_class": round(r.mean_per_class, 2)}


def _zero_shot(base: Any, d: Domain) -> tuple[torch.nn.Module, Any]:
    from must_core.ml.model import build_must_model, load_base_model

    clip = load_base_model(base)
    return build_must_model(clip, list(d.classes), list(d.templates)).eval(), clip.preprocess


def _finished(out: Path, key: str) -> bool:
    """Whether the run folder holds a finished run made under ``key``."""
    cached = out / "bench_result.json"
    return cached.exists() and json.loads(cached.read_text()).get("key") == key


def run_one(
    d: Domain, variant: str, seed: int, base: Any, splits: dict[str, Path], out: Path, key: str
) -> dict[str, Any]:
    from must_core.ml import checkpoint as ckpt
    from must_core.ml.config import make_config
    from must_core.ml.train import adapt

    cached = out / "bench_result.json"
    if _finished(out, key):
        _log(f"{d.name} {variant} seed {seed}: reusing the finished run")
        return json.loads(cached.read_text())["result"]  # type: ignore[no-any-return]
    cfg = make_config(**VARIANTS[variant], **RUN_SETTINGS, seed=seed)
    t0 = time.monotonic()
    res = adapt(
        cfg,
        images_dir=splits["adapt"],
        class_names=list(d.classes),
        output_dir=out,
        base_model=base,
        templates=list(d.templates),
        resume=False,
        prepared_cache=splits["prepared"],
    )
    seconds = time.monotonic() - t0
    state = ckpt.load_training_checkpoint(res.checkpoint_path)
    model, preprocess = _zero_shot(base, d)
    scores: dict[str, Any] = {}
    for which in ("student", "ema"):
        model.load_state_dict(state[which])
        for split in ("val", "test"):
            scores[f"{which}_{split}"] = _eval(model, splits[split], d, preprocess)
    m = res.metrics
    result = {
        "seed": seed,
        "steps": res.step,
        "seconds": round(seconds, 1),
        **scores,
        "served_model": m.get("served_model"),
        "warnings": [w["code"] for w in m.get("warnings", [])],
        "health": {k: v for k, v in (m.get("health") or {}).items() if k != "class_counts"},
        "augmentation": m.get("augmentation"),
        "train": m.get("train"),
    }
    _log(
        f"{d.name} {variant} seed {seed}: val {scores['student_val']['top1']:.2f} test "
        f"{scores['student_test']['top1']:.2f} (ema test {scores['ema_test']['top1']:.2f}) "
        f"warnings {result['warnings']} in {seconds:.0f}s"
    )
    cached.write_text(json.dumps({"key": key, "result": result}))
    for f in ("last.pt", "model.safetensors", "model_ema.safetensors"):
        (out / f).unlink(missing_ok=True)  # the numbers are kept; the weights are not needed
    return result


def _summary(runs: list[dict[str, Any]], zero_shot_test: float) -> dict[str, Any]:
    def col(which: str, split: str, metric: str = "top1") -> list[float]:
        return [r[f"{which}_{split}"][metric] for r in runs]

    served = []
    for r in runs:
        w = (r.get("served_model") or {}).get("weights", "student")
        served.append(
            zero_shot_test
            if w == "zero_shot"
            else r[f"{'ema' if w == 'ema' else 'student'}_test"]["top1"]
        )
    return {
        "seeds": [r["seed"] for r in runs],
        "top1_per_seed": col("student", "test"),
        "top1_mean": round(statistics.fmean(col("student", "test")), 2),
        "mean_per_class_mean": round(statistics.fmean(col("student", "test", "mean_per_class")), 2),
        "val_top1_per_seed": col("student", "val"),
        "val_top1_mean": round(statistics.fmean(col("student", "val")), 2),
        "ema_top1_per_seed": col("ema", "test"),
        "ema_val_top1_per_seed": col("ema", "val"),
        "served_top1_per_seed": served,
        "steps": runs[0]["steps"],
        "seconds_per_run": [r["seconds"] for r in runs],
        "warnings_per_seed": [r["warnings"] for r in runs],
        "served_per_seed": [(r.get("served_model") or {}).get("weights") for r in runs],
        "health_last": [r["health"] for r in runs],
        "augmentation": runs[0].get("augmentation"),
    }


HEADING = "## Shift suite: defaults across several target domains (`benchmarks/shift/suite.py`)"


def _cells(values: list[float]) -> str:
    return ", ".join(f"{v:.2f}" for v in values)


def markdown(result: dict[str, Any]) -> str:
    """The suite's section of docs/benchmarks.md (numbers from shift_suite.json only)."""
    lines = [
        HEADING,
        "",
        "Generated from `docs/benchmarks/shift_suite.json` by `python -m benchmarks.shift.suite` "
        "(what the numbers say: the next section). Top-1 % on each domain's **test** split "
        "(scored once per run, never used for a choice) and on its validation split; `served` is "
        'what `served_model="auto"` chose; `warnings` the health rule\'s flags; seeds as listed.',
        "",
    ]
    for name, b in result["benchmarks"].items():
        zs = b["zero_shot"]
        lines += [
            f"### {name}: {b['num_classes']} classes, imbalance {b['imbalance_ratio']:g}:1"
            + (", a flip changes the class" if b.get("flip_changes_class") else ""),
            "",
            f"Zero-shot: test {zs['top1']:.2f} (mean-per-class {zs['mean_per_class']:.2f}), "
            f"val {zs['val_top1']:.2f}.",
            "",
            "| run | seeds | steps | test top-1 per seed | mean-per-class | EMA test | val top-1 | vs zero-shot | "
            "served | warnings |",
            "|---|---|---|---|---|---|---|---|---|---|",
        ]
        for v, r in b["runs"].items():
            gain = r["top1_mean"] - zs["top1"]
            lines.append(
                f"| {v} | {r['seeds']} | {r['steps']} | {_cells(r['top1_per_seed'])} | "
                f"{r['mean_per_class_mean']:.2f} | {_cells(r['ema_top1_per_seed'])} | "
                f"{_cells(r['val_top1_per_seed'])} | {gain:+.2f} | {r['served_per_seed']} | "
                f"{r['warnings_per_seed']} |"
            )
        default_first = [b["runs"].get("must_default", {}), *b["runs"].values()]
        aug = next((r["augmentation"] for r in default_first if r.get("augmentation")), None)
        if aug and "flip_agreement" in aug:
            lines += ["", "Label-free augmentation rules (default run): " + _recipe_sentence(aug)]
        lines.append("")
    lines.append(
        f"Wall time of the last invocation: {result['wall_seconds']:.0f} s with "
        f"{result.get('jobs', 1)} runs at a time; all runs in the file, summed (one thread each): "
        f"{result.get('run_seconds_sum', 0):.0f} s."
    )
    full = result.get("full_suite")
    if full:
        lines.append(
            f"The last full default invocation (`{full['command']}`, {full['runs']} runs, "
            f"{full['runs_reused']} of them reused from the run cache): {full['wall_seconds']:.0f} s."
        )
    return "\n".join(lines) + "\n"


def _recipe_sentence(aug: dict[str, Any]) -> str:
    """The label-free augmentation choices of one run, as a sentence."""
    text = (
        f"flip agreement {aug['flip_agreement']:.3f}, shift agreement "
        f"{aug['shift_agreement']:.3f} → flip p = {aug['hflip']}"
    )
    if "translate_agreement" in aug:
        on = "on" if aug["geometric"] else "off"
        text += f"; translate agreement {aug['translate_agreement']:.3f} → geometric ops {on}"
    text += "."
    if "randaug_agreement" in aug:
        text += (
            f" Strength: crop agreement {aug['crop_agreement']:.3f} → crop scale "
            f"{tuple(aug['crop_scale'])};"
        )
        detail = aug.get("fine_detail")  # absent from runs before the detail rule
        if detail is not None and detail < augment.DETAIL_RATIO:
            return text + f" fine detail {detail:.4f} → low-detail images, no RandAugment."
        if detail is not None:
            text += f" fine detail {detail:.4f};"
        text += (
            f" RandAugment agreement {aug['randaug_agreement']:.3f} → magnitude "
            f"{aug['randaug_magnitude']:g} ({aug['randaug_num_ops']} ops)."
        )
    return text


def splice(existing: str, section: str) -> str:
    """Replace only this section of docs/benchmarks.md (or append it)."""
    if HEADING not in existing:
        return existing.rstrip("\n") + "\n\n" + section
    start = existing.index(HEADING)
    nxt = existing.find("\n## ", start + len(HEADING))
    return existing[:start] + section + ("" if nxt < 0 else existing[nxt:])


def _run_key(common: dict[str, Any], variant: str, seed: int) -> str:
    blob = json.dumps(
        {**common, "variant": VARIANTS[variant], "seed": seed}, sort_keys=True, default=str
    )
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def _prepare_domain(
    name: str, cache: Path, base: Any
) -> tuple[dict[str, Path], dict[str, dict[str, float]]]:
    from must_core.ml.prepared import dataset_key, prepare_folder, prepared_dir, short_side_for

    d = DOMAINS[name]
    t0 = time.monotonic()
    splits = write_domain(cache / "suite" / name / "data", d)
    zs_model, preprocess = _zero_shot(base, d)
    # keyed by the files' identity: a re-rendered split gets a new prepared form
    splits["prepared"] = cache / "suite" / name / "prepared" / dataset_key(splits["adapt"])
    side = short_side_for(preprocess.image_size)
    folder = prepared_dir(splits["prepared"], side)
    if not (folder / "meta.json").exists():
        prepare_folder(splits["adapt"], folder, side, workers=os.cpu_count() or 1)
    zs = {split: _eval(zs_model, splits[split], d, preprocess) for split in ("val", "test")}
    _log(
        f"{name}: data {time.monotonic() - t0:.0f}s; zero-shot val {zs['val']['top1']:.2f} "
        f"test {zs['test']['top1']:.2f}"
    )
    return splits, zs


def _pretrain_bases(cache: Path, models: set[str]) -> dict[str, tuple[Any, str, bool]]:
    """model name -> (the engine's base-model spec, final-stage fingerprint, was it cached)."""
    from benchmarks.shift.pretrain import pretrain
    from must_core.ml.config import BaseModelSpec

    out = {}
    for m in sorted(models):
        folder, stages = MODELS[m]
        info = pretrain(cache / folder, log=_log, stages=stages)
        base = BaseModelSpec(arch=f"local-dir:{Path(info['path']).resolve()}")
        out[m] = (base, info["stages"][-1]["fingerprint"], bool(info["cached"]))
    return out


def _run_all(tasks: list[tuple[Any, ...]], jobs: int) -> list[dict[str, Any]]:
    """Every (domain, variant, seed) run; ``jobs`` single-threaded runs at a time."""
    if jobs <= 1:
        return [run_one(*t) for t in tasks]
    import multiprocessing
    from concurrent.futures import ProcessPoolExecutor

    with ProcessPoolExecutor(jobs, mp_context=multiprocessing.get_context("spawn")) as pool:
        return list(pool.map(run_one, *zip(*tasks, strict=True)))


def _domain_entry(
    name: str, zs: dict[str, dict[str, float]], runs: dict[str, Any]
) -> dict[str, Any]:
    d = DOMAINS[name]
    return {
        "num_classes": len(d.classes),
        "base_model": d.model,
        "imbalance_ratio": d.imbalance_ratio,
        "flip_changes_class": d.flip_changes_class,
        "splits": {"adapt_unlabeled": d.n_adapt, "val": d.n_val, "test": d.n_test},
        "zero_shot": {
            **zs["test"],
            "val_top1": zs["val"]["top1"],
            "val_mean_per_class": zs["val"]["mean_per_class"],
        },
        "runs": runs,
    }


def _write(result: dict[str, Any], out: Path, md: Path) -> None:
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=1) + "\n")
    md.write_text(splice(md.read_text() if md.exists() else "", markdown(result)))


def _parse(argv: list[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--cache", type=Path, default=Path(".cache/shift"))
    ap.add_argument("--domains", nargs="+", default=list(DOMAINS), choices=list(DOMAINS))
    ap.add_argument("--variants", nargs="+", default=list(DEFAULT_VARIANTS), choices=list(VARIANTS))
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument(
        "--jobs", type=int, default=os.cpu_count() or 1, help="runs at a time (1 thread each)"
    )
    ap.add_argument("--out", type=Path, default=Path("docs/benchmarks/shift_suite.json"))
    ap.add_argument("--markdown", type=Path, default=Path("docs/benchmarks.md"))
    ap.add_argument("--no-write", action="store_true")
    return ap.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = _parse(argv)
    os.environ["OMP_NUM_THREADS"] = "1"  # the spawned runs inherit it
    torch.set_num_threads(1)
    t_all = time.monotonic()

    from must_core.ml.config import make_config

    bases = _pretrain_bases(args.cache, {DOMAINS[n].model for n in args.domains})
    defaults = make_config().model_dump(mode="json")
    previous = json.loads(args.out.read_text()) if args.out.exists() else {}
    if previous.get("engine_config") != defaults:
        previous = {}  # runs made under other engine defaults are not kept beside these
    result: dict[str, Any] = {"benchmarks": dict(previous.get("benchmarks", {}))}

    def key(name: str, variant: str, seed: int) -> str:
        fp = bases[DOMAINS[name].model][1]
        common = {
            "pretrain": fp,
            "style": style_key(),
            "defaults": defaults,
            "run_settings": RUN_SETTINGS,
            "augment_rules": AUGMENT_RULES,
        }
        return _run_key({**common, "domain": repr(DOMAINS[name])}, variant, seed)

    prepared = {
        name: _prepare_domain(name, args.cache, bases[DOMAINS[name].model][0])
        for name in args.domains
    }
    tasks = [
        (
            DOMAINS[name],
            variant,
            seed,
            bases[DOMAINS[name].model][0],
            prepared[name][0],
            args.cache / "suite" / name / "runs" / f"{variant}_seed{seed}",
            key(name, variant, seed),
        )
        for name in args.domains
        for variant in args.variants
        for seed in args.seeds
    ]
    reused = sum(_finished(out, k) for *_, out, k in tasks)
    done = iter(_run_all(tasks, args.jobs))
    for name in args.domains:
        zs = prepared[name][1]
        runs = dict(result["benchmarks"].get(name, {}).get("runs", {}))
        for variant in args.variants:
            per_seed = [next(done) for _ in args.seeds]
            runs[variant] = {
                **_summary(per_seed, zs["test"]["top1"]),
                "overrides": VARIANTS[variant],
            }
        result["benchmarks"][name] = _domain_entry(name, zs, runs)
    total = time.monotonic() - t_all
    command = " ".join(["python -m benchmarks.shift.suite", *(argv or sys.argv[1:])])
    full = previous.get("full_suite")
    if set(args.domains) == set(DOMAINS) and set(args.variants) >= set(DEFAULT_VARIANTS):
        full = {"command": command, "wall_seconds": round(total, 1)}
        full |= {"runs": len(tasks), "runs_reused": reused, "seeds": args.seeds, "jobs": args.jobs}
    result.update(
        {
            "suite": "shift_suite",
            "description": "tiny CLIP pretrained on rendered icons, adapted without labels to several "
            "rendered target domains; top-1 in percent, test split unless named val",
            "engine_config": make_config().model_dump(mode="json"),
            "command": command,
            "wall_seconds": round(total, 1),
            # every run in this file, however many invocations produced them (1 thread each)
            "run_seconds_sum": round(
                sum(
                    sum(r["seconds_per_run"])
                    for b in result["benchmarks"].values()
                    for r in b["runs"].values()
                ),
                1,
            ),
            "jobs": args.jobs,
            # the wall time of the last invocation that ran every domain's default variants
            "full_suite": full,
            "pretrain_cached": all(b[2] for b in bases.values()),
            "machine": f"{platform.machine()} {os.cpu_count()} cpus, torch {torch.__version__}",
        }
    )
    for name, b in result["benchmarks"].items():
        for v, r in b["runs"].items():
            _log(
                f"{name} {v}: test {r['top1_per_seed']} val {r['val_top1_per_seed']} "
                f"(zero-shot {b['zero_shot']['top1']})"
            )
    if not args.no_write:
        _write(result, args.out, args.markdown)
        _log(f"wrote {args.out} and {args.markdown}; {total:.0f}s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
