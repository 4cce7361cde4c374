"""The shift benchmark, end to end: data, tiny CLIP pretraining (cached), zero-shot, MUST + ablations.

    python -m benchmarks.shift.run            # full documented run (2 parallel 1-thread runs, seeds 0 1 2)

Writes docs/benchmarks/shift.json, the PNG plots next to it and the table in docs/benchmarks.md.
Nothing here tunes on the test split: the engine runs with its default config; the ablations only
switch loss terms off. Per-step test accuracy is measured for the plots only (never for selection).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import torch

from benchmarks.shift.data import CLASSES, TEMPLATES, style_key, write_source_eval, write_target

# Ablations: the engine's default config with loss terms switched off (no other change).
VARIANTS: dict[str, dict[str, Any]] = {
    "must": {},
    # Masking and the alignment loss stay on; only the reconstruction loss is removed.
    "no_mim": {"mim_weight": 0.0},
    "no_align": {"align_weight": 0.0},
    "no_fair": {"fair_weight": 0.0},
    # No masking: the student sees the unmasked strong view (MIM and alignment vanish with the mask).
    "no_mask": {"mask_ratio": 0.0},
    # Plain EMA-teacher pseudo-labelling on strong views: no mask, no MIM, no alignment, no fairness.
    "self_training_only": {
        "mask_ratio": 0.0,
        "mim_weight": 0.0,
        "align_weight": 0.0,
        "fair_weight": 0.0,
    },
}
# The table; `no_mask` is an extra ablation, run with `--variants no_mask` (the runs above are
# then reused from the cache), which keeps the default run under 30 minutes on 2 cores.
DEFAULT_VARIANTS = ("must", "no_mim", "no_align", "no_fair", "self_training_only")
DATA_SEED = 7
N_ADAPT, N_VAL, N_TEST, N_SOURCE_TEST = 1280, 1000, 2000, 1000


def _log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


def _mean_std(values: list[float]) -> tuple[float, float]:
    mean = statistics.fmean(values)
    return mean, (statistics.stdev(values) if len(values) > 1 else 0.0)


class _TestSet:
    """The labelled test images preprocessed once, so curve points cost one forward pass."""

    def __init__(self, items: list[tuple[Path, int]], preprocess: Any) -> None:
        from must_core.ml.data import eval_transform, load_image

        tf = eval_transform(preprocess)
        self.x = torch.stack([tf(load_image(p)) for p, _ in items])
        self.y = torch.tensor([label for _, label in items])

    @torch.no_grad()
    def top1(self, model: torch.nn.Module) -> float:
        was = model.training
        model.eval()
        preds = torch.cat(
            [model(self.x[i : i + 500]).argmax(-1) for i in range(0, len(self.x), 500)]
        )
        model.train(was)
        return 100.0 * float((preds == self.y).float().mean())


def zero_shot_model(base: Any) -> tuple[torch.nn.Module, Any]:
    """The engine's zero-shot classifier (student at step 0) and the base model's preprocessing."""
    from must_core.ml.model import build_must_model, load_base_model

    clip = load_base_model(base)
    model = build_must_model(clip, list(CLASSES), list(TEMPLATES))
    return model.eval(), clip.preprocess


def run_variant(
    name: str,
    seed: int,
    *,
    base: Any,
    splits: Any,
    run_root: Path,
    threads: int,
    workers: int,
    test: _TestSet,
    curve_every: int | None,
    common_key: str = "",
) -> dict[str, Any]:
    from must_core.ml import checkpoint as ckpt
    from must_core.ml.config import make_config
    from must_core.ml.train import adapt

    overrides: dict[str, Any] = {
        **VARIANTS[name],
        "seed": seed,
        "num_threads": threads,
        "device": "cpu",
        "num_workers": workers,
    }
    if curve_every:
        overrides["checkpoint_every_steps"] = curve_every
    cfg = make_config(**overrides)
    curve: list[dict[str, float]] = []
    probe, _ = zero_shot_model(base)

    def on_checkpoint(path: Path, step: int) -> None:
        state = ckpt.load_training_checkpoint(path)
        point = {"step": step}
        for key, label in (("student", "top1"), ("ema", "ema_top1")):
            probe.load_state_dict(state[key])
            point[label] = test.top1(probe)
        curve.append(point)

    out_dir = run_root / f"{name}_seed{seed}"
    t0 = time.monotonic()
    res = adapt(
        cfg,
        images_dir=splits.adapt_dir,
        class_names=list(CLASSES),
        output_dir=out_dir,
        base_model=base,
        templates=list(TEMPLATES),
        eval_dir=splits.test_dir,
        resume=False,
        on_checkpoint=on_checkpoint if curve_every else None,
    )
    seconds = time.monotonic() - t0
    m = res.metrics
    if curve_every:  # first point: the zero-shot model; last point: the final models
        curve.insert(
            0, {"step": 0, "top1": m["zero_shot"]["top1"], "ema_top1": m["zero_shot"]["top1"]}
        )
        if curve[-1]["step"] != res.step:
            curve.append(
                {
                    "step": res.step,
                    "top1": m["adapted"]["top1"],
                    "ema_top1": m["adapted_ema"]["top1"],
                }
            )
    _log(
        f"{name} seed {seed}: top1 {m['adapted']['top1']:.2f} (ema {m['adapted_ema']['top1']:.2f}, "
        f"zero-shot {m['zero_shot']['top1']:.2f}) in {seconds:.0f}s, {res.step} steps"
    )
    result = {
        "seed": seed,
        "top1": m["adapted"]["top1"],
        "mean_per_class": m["adapted"]["mean_per_class"],
        "ema_top1": m["adapted_ema"]["top1"],
        "ema_mean_per_class": m["adapted_ema"]["mean_per_class"],
        "steps": res.step,
        "seconds": round(seconds, 1),
        "history": [
            {
                "step": h["step"],
                "conf_ratio": h["conf_ratio"],
                "lr": h["lr"],
                "ema_decay": h["ema_decay"],
                **h["losses"],
            }
            for h in res.history
        ],
        "curve": curve,
        "config": cfg.model_dump(mode="json"),
    }
    # Persist at once: a crash later (or a rerun) does not cost the finished runs.
    (out_dir / RESULT_NAME).write_text(
        json.dumps({"key": run_key(name, seed, curve_every, common_key), "result": result})
    )
    return result


RESULT_NAME = "bench_result.json"


def run_key(name: str, seed: int, curve_every: int | None, common_key: str) -> str:
    """Everything that changes a run's numbers: variant, seed, curve points, engine defaults, base."""
    from must_core.ml.config import make_config

    blob = json.dumps(
        {
            "variant": VARIANTS[name],
            "seed": seed,
            "curve_every": curve_every,
            "defaults": make_config().model_dump(mode="json"),
            "common": common_key,
        },
        sort_keys=True,
    )
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def cached_run(
    run_root: Path, name: str, seed: int, curve_every: int | None, common_key: str
) -> dict[str, Any] | None:
    path = run_root / f"{name}_seed{seed}" / RESULT_NAME
    if not path.exists():
        return None
    data = json.loads(path.read_text())
    if data.get("key") != run_key(name, seed, curve_every, common_key):
        return None
    return data["result"]  # type: ignore[no-any-return]


_WORKER_TEST: _TestSet | None = None


def _init_worker(threads: int, test_items: list[tuple[Path, int]], preprocess: Any) -> None:
    global _WORKER_TEST
    os.environ["OMP_NUM_THREADS"] = str(threads)
    torch.set_num_threads(threads)
    _WORKER_TEST = _TestSet(test_items, preprocess)


def _run_in_worker(
    name: str, seed: int, curve_every: int | None, common: dict[str, Any]
) -> dict[str, Any]:
    assert _WORKER_TEST is not None
    return run_variant(name, seed, test=_WORKER_TEST, curve_every=curve_every, **common)


def summarise(runs: list[dict[str, Any]]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key in ("top1", "mean_per_class", "ema_top1", "ema_mean_per_class"):
        mean, std = _mean_std([r[key] for r in runs])
        out[f"{key}_mean"], out[f"{key}_std"] = round(mean, 2), round(std, 2)
    out["per_seed"] = [
        {
            k: (round(v, 2) if isinstance(v, float) else v)
            for k, v in r.items()
            if k not in ("history", "curve", "config")
        }
        for r in runs
    ]
    return out


def _earlier_invocations(path: Path, result: dict[str, Any]) -> list[dict[str, Any]]:
    """Wall-time records of the earlier invocation whose runs this table reuses.

    They are carried over from the previous shift.json only when every per-seed number it reports
    for a variant of this table is identical here (so the times belong to these very runs).
    """
    if not result["runs_reused"] or not path.exists():
        return []
    prev = json.loads(path.read_text())
    fields = ("seed", "top1", "ema_top1", "mean_per_class", "steps")
    for name, r in prev.get("runs", {}).items():
        if name not in result["runs"]:
            return []
        now = [{k: x.get(k) for k in fields} for x in result["runs"][name]["per_seed"]]
        then = [{k: x.get(k) for k in fields} for x in r["per_seed"]]
        if now != then:
            return []
    if "invocations" in prev:
        return list(prev["invocations"])
    return [
        {
            "command": "python -m benchmarks.shift.run",
            "variants": list(prev.get("runs", {})),
            "runs_done": sum(len(r["per_seed"]) for r in prev.get("runs", {}).values()),
            "runs_reused": 0,
            "jobs": prev.get("jobs", 2),
            "threads": prev.get("threads"),
            "wall_seconds": prev.get("wall_seconds"),
        }
    ]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--threads", type=int, default=1, help="torch CPU threads per run (default 1)")
    ap.add_argument(
        "--jobs", type=int, default=2, help="adaptation runs in parallel processes (default 2)"
    )
    ap.add_argument(
        "--workers",
        type=int,
        default=0,
        help="data-loader worker processes for the adaptation runs (default 0)",
    )
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument(
        "--variants",
        nargs="+",
        default=list(DEFAULT_VARIANTS),
        choices=list(VARIANTS),
        help="variants to run (finished runs of the others are added to the report)",
    )
    ap.add_argument("--cache", type=Path, default=Path(".cache/shift"))
    ap.add_argument("--out", type=Path, default=Path("docs/benchmarks"))
    ap.add_argument("--markdown", type=Path, default=Path("docs/benchmarks.md"))
    ap.add_argument(
        "--curve-every",
        type=int,
        default=50,
        help="test-accuracy curve point every N steps (plots only; 0 = off)",
    )
    ap.add_argument("--curve-seeds", type=int, default=1, help="how many seeds record curves")
    ap.add_argument("--no-write", action="store_true", help="print results, write nothing to docs/")
    ap.add_argument(
        "--fresh",
        action="store_true",
        help="redo every run (by default finished runs with identical settings are reused)",
    )
    args = ap.parse_args(argv)

    # The main process (data, pretraining, zero-shot) uses every core the parallel runs will use.
    main_threads = max(1, args.threads * max(1, args.jobs))
    os.environ.setdefault("OMP_NUM_THREADS", str(main_threads))
    torch.set_num_threads(main_threads)
    t_all = time.monotonic()

    from benchmarks.shift.pretrain import pretrain
    from must_core.ml.config import BaseModelSpec, make_config
    from must_core.ml.data import scan_labelled
    from must_core.ml.evaluate import evaluate_folder

    t0 = time.monotonic()
    splits = write_target(args.cache / "data" / "target", N_ADAPT, N_VAL, N_TEST, DATA_SEED)
    source_test = write_source_eval(
        args.cache / "data" / "source_test", N_SOURCE_TEST, DATA_SEED + 1
    )
    t_data = time.monotonic() - t0
    _log(f"data ready ({t_data:.0f}s)")
    info = pretrain(args.cache / "model", log=_log)
    _log(
        f"tiny CLIP: {'cached' if info['cached'] else 'pretrained'} "
        f"({info['seconds']:.0f}s when trained, source held-out zero-shot {info['source_heldout_zero_shot_top1']:.1f}%)"
    )
    base = BaseModelSpec(arch=f"local-dir:{Path(info['path']).resolve()}")

    # Zero-shot on the source and the target (same prompts the engine uses).
    zs_model, preprocess = zero_shot_model(base)
    zero_shot: dict[str, Any] = {}
    for key, folder in (
        ("test", splits.test_dir),
        ("val", splits.val_dir),
        ("source", source_test),
    ):
        items, _ = scan_labelled(folder, list(CLASSES))
        r = evaluate_folder(
            zs_model, items, preprocess, num_classes=len(CLASSES), device=torch.device("cpu")
        )
        zero_shot[key] = {"top1": round(r.top1, 2), "mean_per_class": round(r.mean_per_class, 2)}
    _log(
        f"zero-shot top1: source {zero_shot['source']['top1']:.1f}, "
        f"target test {zero_shot['test']['top1']:.1f}, target val {zero_shot['val']['top1']:.1f}"
    )
    test_items, _ = scan_labelled(splits.test_dir, list(CLASSES))
    test = _TestSet(test_items, preprocess)

    run_root = args.cache / "runs"
    t_runs = time.monotonic()
    tasks = [
        (name, seed, args.curve_every if i < args.curve_seeds and args.curve_every > 0 else None)
        for name in args.variants
        for i, seed in enumerate(args.seeds)
    ]
    common_key = json.dumps(
        {
            "pretrain": info["stages"][-1]["fingerprint"],
            "data": [DATA_SEED, N_ADAPT, N_VAL, N_TEST, style_key()],
            "threads": args.threads,
        },
        sort_keys=True,
    )
    common = {
        "base": base,
        "splits": splits,
        "run_root": run_root,
        "threads": args.threads,
        "workers": args.workers,
        "common_key": common_key,
    }
    reused: dict[tuple[str, int], dict[str, Any]] = {}
    if not args.fresh:
        for name, seed, curve_every in tasks:
            hit = cached_run(run_root, name, seed, curve_every, common_key)
            if hit is not None:
                reused[(name, seed)] = hit
                _log(f"{name} seed {seed}: reusing the finished run (pass --fresh to redo it)")
    tasks = [t for t in tasks if (t[0], t[1]) not in reused]
    done: dict[tuple[str, int], dict[str, Any]] = {}
    if tasks and args.jobs <= 1:
        for name, seed, curve_every in tasks:
            done[(name, seed)] = run_variant(
                name, seed, test=test, curve_every=curve_every, **common
            )
    elif tasks:
        # Independent runs in parallel processes (each with --threads torch threads): on 2 cores two
        # 1-thread runs finish ~2x sooner than one 2-thread run, which is bound by the Python loop.
        import multiprocessing as mp
        from concurrent.futures import ProcessPoolExecutor

        with ProcessPoolExecutor(
            max_workers=args.jobs,
            mp_context=mp.get_context("spawn"),
            initializer=_init_worker,
            initargs=(args.threads, test_items, preprocess),
        ) as pool:
            futures = {
                (name, seed): pool.submit(_run_in_worker, name, seed, curve_every, common)
                for name, seed, curve_every in tasks
            }
            done = {key: fut.result() for key, fut in futures.items()}
    raw: dict[str, list[dict[str, Any]]] = {}
    for name in VARIANTS:  # table order; variants not asked for are added when fully cached
        if name in args.variants:
            raw[name] = [reused.get((name, seed)) or done[(name, seed)] for seed in args.seeds]
            continue
        hits = [
            cached_run(
                run_root,
                name,
                seed,
                args.curve_every if i < args.curve_seeds and args.curve_every > 0 else None,
                common_key,
            )
            for i, seed in enumerate(args.seeds)
        ]
        if not args.fresh and all(h is not None for h in hits):
            raw[name] = [h for h in hits if h is not None]
            reused.update({(name, seed): h for seed, h in zip(args.seeds, raw[name], strict=True)})
            _log(f"{name}: added from finished runs with identical settings")
    t_runs = time.monotonic() - t_runs
    total = time.monotonic() - t_all

    default_cfg = make_config().model_dump(mode="json")
    result = {
        "benchmark": "shift",
        "description": "tiny CLIP pretrained on rendered shapes on flat backgrounds (source), adapted "
        "with MUST to shapes on textured, cluttered, blurred and noisy backgrounds (target); top-1 in "
        "percent",
        "classes": list(CLASSES),
        "templates": list(TEMPLATES),
        "splits": {
            "target_adapt_unlabeled": N_ADAPT,
            "target_val": N_VAL,
            "target_test": N_TEST,
            "source_test": N_SOURCE_TEST,
        },
        "zero_shot": {
            **zero_shot["test"],
            "source_top1": zero_shot["source"]["top1"],
            "val_top1": zero_shot["val"]["top1"],
        },
        "runs": {name: {**summarise(rs), "overrides": VARIANTS[name]} for name, rs in raw.items()},
        "seeds": args.seeds,
        "engine_config": default_cfg,
        "pretrain": {
            k: info[k]
            for k in (
                "seconds",
                "steps",
                "source_heldout_zero_shot_top1",
                "num_params",
                "num_visual_params",
                "settings",
                "stages",
            )
        },
        "wall_seconds": {
            "data": round(t_data, 1),
            "runs": round(t_runs, 1),
            "total": round(total, 1),
            "pretrain_when_not_cached": round(info["seconds"], 1),
            "pretrain_cached": bool(info["cached"]),
        },
        "threads": args.threads,
        "jobs": args.jobs,
        "machine": f"{platform.machine()} {os.cpu_count()} cpus, torch {torch.__version__}",
    }
    for name in raw:
        _log(
            f"{name}: top1 {result['runs'][name]['top1_mean']:.2f} ± {result['runs'][name]['top1_std']:.2f}"
            f" (ema {result['runs'][name]['ema_top1_mean']:.2f})"
        )
    if args.no_write:
        return 0
    from benchmarks.shift.report import write_markdown, write_plots

    args.out.mkdir(parents=True, exist_ok=True)
    result["runs_reused"] = sorted(f"{n}_seed{sd}" for n, sd in reused)
    this = {
        "command": " ".join(["python -m benchmarks.shift.run", *(argv or sys.argv[1:])]).strip(),
        "runs_done": len(tasks),
        "runs_reused": len(reused),
        "jobs": args.jobs,
        "threads": args.threads,
        "wall_seconds": result["wall_seconds"],
    }
    result["invocations"] = [*_earlier_invocations(args.out / "shift.json", result), this]
    (args.out / "shift.json").write_text(json.dumps(result, indent=1) + "\n")  # before the plots
    plots = write_plots(raw, result, args.out)
    result["plots"] = [str(p.name) for p in plots]
    (args.out / "shift.json").write_text(json.dumps(result, indent=1) + "\n")
    write_markdown(result, args.markdown, args.out, plots)
    _log(
        f"wrote {args.out / 'shift.json'}, {args.markdown} and {len(plots)} plots; total {total:.0f}s"
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
