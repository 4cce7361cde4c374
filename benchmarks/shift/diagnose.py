"""Diagnostics for the shift benchmark, on the labelled target **validation** split only.

    python -m benchmarks.shift.diagnose --probe                      # what the frozen model allows
    python -m benchmarks.shift.diagnose --run default= fast_ema="ema_horizon=0.25;fair_weight=4"

``--probe`` prints, for the cached tiny CLIP: zero-shot top-1, a label-free prior-corrected
zero-shot (one bias per class, set so that the mean prediction is uniform), and two labelled
ceilings of the frozen features (a linear probe on a 50/50 split and leave-one-out 10-NN).
``--run NAME=key=value;key=value`` adapts on the unlabeled split with the engine defaults plus those
overrides and reports student and EMA top-1 on the validation split. Every result is appended to
``.cache/shift/diagnostics.jsonl``. These numbers are what engine defaults may be justified with;
the test split is never looked at here.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import time
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from benchmarks.shift.data import CLASSES, TEMPLATES, TargetStyle, style_key, write_target
from benchmarks.shift.run import DATA_SEED, N_ADAPT, N_TEST, N_VAL


def _parse_value(text: str) -> Any:
    try:
        return json.loads(text)
    except json.JSONDecodeError:
        return text


def parse_run(spec: str) -> tuple[str, dict[str, Any]]:
    """``name=k=v;k=v`` (``name=`` for the defaults) -> (name, overrides)."""
    name, _, rest = spec.partition("=")
    overrides: dict[str, Any] = {}
    for part in filter(None, rest.split(";")):
        key, sep, value = part.partition("=")
        if not sep:
            raise SystemExit(f"bad override {part!r} in {spec!r}: expected key=value")
        overrides[key.strip()] = _parse_value(value.strip())
    return name, overrides


@torch.no_grad()
def _features(model: Any, folder: Path, preprocess: Any) -> tuple[torch.Tensor, torch.Tensor]:
    """Unit-norm image features and labels of a labelled folder (images decoded once by _TestSet)."""
    from benchmarks.shift.run import _TestSet
    from must_core.ml.data import scan_labelled

    items, _ = scan_labelled(folder, list(CLASSES))
    data = _TestSet(items, preprocess)
    x = data.x
    feats = torch.cat([model.features(x[i : i + 256]) for i in range(0, len(x), 256)])
    return feats.float(), data.y


def prior_corrected(logits: torch.Tensor, iters: int = 500) -> torch.Tensor:
    """Per-class biases, found without labels, that make the mean softmax prediction uniform."""
    k = logits.shape[1]
    bias = torch.zeros(k)
    for _ in range(iters):
        mean = (logits + bias).softmax(-1).mean(0)
        bias -= 0.5 * torch.log(mean * k)
    return logits + bias


def linear_probe(f: torch.Tensor, y: torch.Tensor, seed: int = 0) -> float:
    g = torch.Generator().manual_seed(seed)
    perm = torch.randperm(len(y), generator=g)
    tr, te = perm[: len(y) // 2], perm[len(y) // 2 :]
    w = torch.zeros(f.shape[1], len(CLASSES), requires_grad=True)
    b = torch.zeros(len(CLASSES), requires_grad=True)
    opt = torch.optim.LBFGS([w, b], max_iter=500, line_search_fn="strong_wolfe")

    def closure() -> torch.Tensor:
        opt.zero_grad()
        loss = F.cross_entropy(f[tr] @ w * 20 + b, y[tr]) + 1e-4 * (w**2).sum()
        loss.backward()  # type: ignore[no-untyped-call]
        return loss

    opt.step(closure)  # type: ignore[no-untyped-call]
    with torch.no_grad():
        return 100.0 * float(((f[te] @ w * 20 + b).argmax(-1) == y[te]).float().mean())


def knn(f: torch.Tensor, y: torch.Tensor, k: int = 10) -> float:
    sim = f @ f.T
    sim.fill_diagonal_(-2.0)
    idx = sim.topk(k, dim=1).indices
    votes = F.one_hot(y[idx], len(CLASSES)).sum(1)
    return 100.0 * float((votes.argmax(-1) == y).float().mean())


def probe(base: Any, val_dir: Path) -> dict[str, float]:
    from benchmarks.shift.run import zero_shot_model

    model, preprocess = zero_shot_model(base)
    f, y = _features(model, val_dir, preprocess)
    logits = model.head(f)
    pred = logits.argmax(-1)
    hist = torch.bincount(pred, minlength=len(CLASSES)).tolist()
    return {
        "zero_shot": 100.0 * float((pred == y).float().mean()),
        "prior_corrected_zero_shot": 100.0
        * float((prior_corrected(logits).argmax(-1) == y).float().mean()),
        "linear_probe": linear_probe(f, y),
        "knn10": knn(f, y),
        "zero_shot_histogram": hist,  # type: ignore[dict-item]
    }


def _one_run(
    name: str, overrides: dict[str, Any], base: Any, adapt_dir: Path, val_dir: Path, root: Path
) -> dict[str, Any]:
    os.environ["OMP_NUM_THREADS"] = "1"
    torch.set_num_threads(1)
    from must_core.ml.config import make_config
    from must_core.ml.train import adapt

    cfg = make_config(
        **{"seed": 0, "device": "cpu", "num_threads": 1, "num_workers": 0, **overrides}
    )
    t0 = time.monotonic()
    res = adapt(
        cfg,
        images_dir=adapt_dir,
        class_names=list(CLASSES),
        output_dir=root / name,
        base_model=base,
        templates=list(TEMPLATES),
        eval_dir=val_dir,
        resume=False,
    )
    m = res.metrics
    return {
        "name": name,
        "overrides": overrides,
        "student": round(m["adapted"]["top1"], 2),
        "ema": round(m["adapted_ema"]["top1"], 2),
        "zero_shot": round(m["zero_shot"]["top1"], 2),
        "steps": res.step,
        "conf_ratio_last": res.history[-1]["conf_ratio"] if res.history else None,
        "seconds": round(time.monotonic() - t0, 1),
    }


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--cache", type=Path, default=Path(".cache/shift"))
    ap.add_argument("--model", type=Path, default=None, help="local-dir model (default: cached)")
    ap.add_argument("--probe", action="store_true")
    ap.add_argument("--run", action="append", default=[], metavar="NAME=k=v;...")
    ap.add_argument("--jobs", type=int, default=2)
    ap.add_argument(
        "--n-adapt", type=int, default=0, help="unlabeled images (default: the benchmark's)"
    )
    ap.add_argument(
        "--style", default="", help='target style overrides as JSON, e.g. {"noise": [0, 4]}'
    )
    args = ap.parse_args(argv)

    from must_core.ml.config import BaseModelSpec

    if args.style or args.n_adapt:  # candidate data: its own folder (no test split is written)
        style = TargetStyle(**json.loads(args.style or "{}"))
        n_adapt = args.n_adapt or N_ADAPT
        tag = hashlib.sha256(f"{style_key(style)}:{n_adapt}".encode()).hexdigest()[:10]
        splits = write_target(args.cache / "diag_data" / tag, n_adapt, N_VAL, 0, DATA_SEED, style)
    else:
        splits = write_target(args.cache / "data" / "target", N_ADAPT, N_VAL, N_TEST, DATA_SEED)
    model_dir = (args.model or args.cache / "model" / "stage2").resolve()
    base = BaseModelSpec(arch=f"local-dir:{model_dir}")
    log = args.cache / "diagnostics.jsonl"
    rows: list[dict[str, Any]] = []
    if args.probe:
        torch.set_num_threads(max(1, args.jobs))
        rows.append({"probe": probe(base, splits.val_dir)})
        print(json.dumps(rows[-1]), flush=True)
    runs = [parse_run(s) for s in args.run]
    if runs:
        import multiprocessing as mp
        from concurrent.futures import ProcessPoolExecutor, as_completed

        root = args.cache / "diag_runs"
        with ProcessPoolExecutor(max_workers=args.jobs, mp_context=mp.get_context("spawn")) as pool:
            futs = [
                pool.submit(_one_run, n, o, base, splits.adapt_dir, splits.val_dir, root)
                for n, o in runs
            ]
            for fut in as_completed(futs):
                rows.append(fut.result())
                print(json.dumps(rows[-1]), flush=True)
    with log.open("a") as fh:
        for r in rows:
            fh.write(json.dumps({"model": str(model_dir), "style": args.style, **r}) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
