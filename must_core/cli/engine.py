"""Offline engine commands: ``must adapt``, ``must eval``, ``must predict``."""

from __future__ import annotations

import argparse
import json
import logging
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from must_core.errors import InvalidConfigError, MustError

_logger = logging.getLogger(__name__)


def register(sub: Any) -> None:
    p = sub.add_parser(
        "adapt",
        help="adapt a CLIP zero-shot classifier to a folder of unlabeled images",
        description="Run MUST on IMAGES_DIR and write the adapted classifier to --output.",
    )
    p.add_argument("images_dir", type=Path, help="folder of unlabeled images (flat or subfolders)")
    cls = p.add_mutually_exclusive_group(required=True)
    cls.add_argument("--classes", type=Path, help="text file with one class name per line")
    cls.add_argument("--class-names", help="comma-separated class names")
    p.add_argument("--output", "-o", type=Path, required=True, help="output directory")
    p.add_argument("--model", default="ViT-B-16", help="open_clip architecture, or local-dir:PATH")
    p.add_argument("--pretrained", default=None, help="open_clip pretrained tag (needs internet)")
    p.add_argument("--checkpoint", default=None, help="local base-model checkpoint file")
    p.add_argument("--model-config", default=None, help="custom open_clip model-config JSON")
    p.add_argument(
        "--allow-random-init",
        action="store_true",
        help="allow a model without weights (random init; for tests only)",
    )
    p.add_argument(
        "--templates",
        type=Path,
        default=None,
        help="text file with one prompt template per line, each with one {}",
    )
    p.add_argument(
        "--eval-dir",
        type=Path,
        default=None,
        help="optional labelled folder (subfolders named by class) for accuracy",
    )
    p.add_argument(
        "--preset", default=None, help="named hyperparameter preset (see --list-presets)"
    )
    p.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override any MustConfig field, e.g. --set mask_ratio=0.3 (repeatable)",
    )
    p.add_argument("--epochs", type=int, default=None)
    p.add_argument("--batch-size", type=int, default=None)
    p.add_argument("--lr", type=float, default=None, help="learning rate per 256 images")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    p.add_argument("--device", default=None, help="auto | cpu | cuda | cuda:N")
    p.add_argument("--seed", type=int, default=None)
    p.add_argument("--no-resume", action="store_true", help="ignore an existing checkpoint")
    p.add_argument("--quiet", "-q", action="store_true", help="no progress bar")
    p.set_defaults(func=cmd_adapt)

    e = sub.add_parser("eval", help="accuracy of an adapted model on a labelled folder")
    e.add_argument("model", type=Path, help="adapted model (.safetensors from must adapt)")
    e.add_argument("labelled_dir", type=Path, help="folder with one subfolder per class")
    e.add_argument("--batch-size", type=int, default=128)
    e.add_argument("--threads", type=int, default=None)
    e.add_argument("--device", default="cpu")
    e.add_argument("--json", action="store_true", help="print JSON instead of a table")
    e.set_defaults(func=cmd_eval)

    r = sub.add_parser(
        "predict",
        help="top-k labels for image files or folders (batched)",
        description="Predict every image in the given files/folders; --out writes JSONL or CSV.",
    )
    r.add_argument("model", type=Path, help="adapted model (.safetensors from must adapt)")
    r.add_argument("images", type=Path, nargs="+", help="image files and/or folders (recursive)")
    r.add_argument("--top-k", type=int, default=5)
    r.add_argument("--batch-size", type=int, default=64)
    r.add_argument("--workers", type=int, default=0, help="decode processes (0: in process)")
    r.add_argument(
        "--out", type=Path, default=None, help="write rows to a .jsonl or .csv file (by suffix)"
    )
    r.add_argument("--threads", type=int, default=None)
    r.add_argument("--device", default="cpu")
    r.add_argument("--json", action="store_true", help="print JSON instead of text")
    r.set_defaults(func=cmd_predict)

    x = sub.add_parser(
        "export",
        help="export an adapted model for runtimes outside Python (ONNX)",
        description="Write MODEL as ONNX: images [N,3,H,W] (normalised) -> logits [N,K].",
    )
    x.add_argument("model", type=Path, help="adapted model (.safetensors from must adapt)")
    x.add_argument("--format", choices=["onnx"], default="onnx")
    x.add_argument("--output", "-o", type=Path, default=None, help="default: MODEL with .onnx")
    x.set_defaults(func=cmd_export)

    lp = sub.add_parser("presets", help="list the hyperparameter presets")
    lp.set_defaults(func=cmd_presets)


def _fail(exc: MustError) -> int:
    print(f"error [{exc.code}]: {exc.message}", file=sys.stderr)
    return 2


def _parse_value(raw: str) -> Any:
    try:
        return json.loads(raw)
    except ValueError:
        return raw


def parse_overrides(items: list[str]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for item in items:
        if "=" not in item:
            raise InvalidConfigError(f"--set expects KEY=VALUE, got {item!r}")
        key, raw = item.split("=", 1)
        out[key.strip()] = _parse_value(raw.strip())
    return out


def _read_lines(path: Path, what: str) -> list[str]:
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise InvalidConfigError(f"cannot read {what} file {path}: {exc}") from exc
    return [line.strip() for line in text.splitlines() if line.strip() and not line.startswith("#")]


def _set_threads(threads: int | None) -> None:
    if threads:
        import torch

        torch.set_num_threads(threads)


def cmd_adapt(args: argparse.Namespace) -> int:
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    from must_core.ml.config import BaseModelSpec, make_config
    from must_core.ml.train import ProgressEvent, adapt

    try:
        classes = (
            _read_lines(args.classes, "classes")
            if args.classes
            else [c for c in args.class_names.split(",") if c.strip()]
        )
        templates = _read_lines(args.templates, "templates") if args.templates else None
        overrides = parse_overrides(args.overrides)
        for key, val in (
            ("epochs", args.epochs),
            ("batch_size", args.batch_size),
            ("lr", args.lr),
            ("num_threads", args.threads),
            ("device", args.device),
            ("seed", args.seed),
        ):
            if val is not None:
                overrides[key] = val
        cfg = make_config(args.preset, **overrides)
        spec = BaseModelSpec(
            arch=args.model,
            pretrained=args.pretrained,
            checkpoint=args.checkpoint,
            config=args.model_config,
            allow_random_init=args.allow_random_init,
        )
    except MustError as exc:
        return _fail(exc)
    except ValueError as exc:
        return _fail(InvalidConfigError(str(exc)))

    bar: Any = None

    def on_progress(ev: ProgressEvent) -> None:
        nonlocal bar
        if args.quiet:
            return
        if bar is None:
            from tqdm import tqdm

            # The ETA is the engine's (from its measured images/s), not tqdm's guess.
            bar = tqdm(
                total=ev.total_steps,
                unit="step",
                dynamic_ncols=True,
                file=sys.stderr,
                bar_format="{l_bar}{bar}| {n_fmt}/{total_fmt} [{elapsed}{postfix}]",
            )
        bar.n = ev.step
        bar.set_postfix(
            eta=f"{ev.eta_seconds:.0f}s",
            loss=f"{ev.losses['loss']:.3f}",
            conf=f"{ev.conf_ratio:.2f}",
            ips=f"{ev.images_per_second:.1f}",
            refresh=False,
        )
        bar.refresh()

    try:
        result = adapt(
            cfg,
            images_dir=args.images_dir,
            class_names=classes,
            output_dir=args.output,
            base_model=spec,
            templates=templates,
            eval_dir=args.eval_dir,
            resume=not args.no_resume,
            on_progress=on_progress,
        )
    except MustError as exc:
        return _fail(exc)
    finally:
        if bar is not None:
            bar.close()
    print(
        f"status: {result.status}  steps: {result.step}/{result.total_steps}  "
        f"images: {result.num_images} (skipped {result.num_skipped})"
    )
    for path, reason in result.skipped[:20]:
        print(f"  skipped {path}: {reason}")
    if result.model_path:
        print(f"model: {result.model_path}")
    if result.ema_model_path:
        print(f"ema model: {result.ema_model_path}")
    if "zero_shot" in result.metrics:
        rows = [
            (name, result.metrics[name])
            for name in ("zero_shot", "adapted", "adapted_ema")
            if name in result.metrics
        ]
        print(_accuracy_table(rows))
    return 0


def _accuracy_table(rows: Sequence[tuple[str, dict[str, Any]]]) -> str:
    lines = [f"{'model':<14}{'top-1 %':>10}{'mean/class %':>15}{'images':>9}"]
    for name, m in rows:
        lines.append(
            f"{name:<14}{m['top1']:>10.2f}{m['mean_per_class']:>15.2f}{m['num_images']:>9d}"
        )
    return "\n".join(lines)


def cmd_eval(args: argparse.Namespace) -> int:
    import torch

    from must_core.ml.data import scan_labelled
    from must_core.ml.evaluate import evaluate_folder
    from must_core.ml.inference import AdaptedClassifier

    _set_threads(args.threads)
    try:
        model = AdaptedClassifier.load(args.model, device=args.device)
        items, scan = scan_labelled(args.labelled_dir, model.class_names)
        res = evaluate_folder(
            model,
            items,
            model.preprocess,
            num_classes=model.num_classes,
            device=torch.device(args.device),
            batch_size=args.batch_size,
            class_names=model.class_names,
        )
    except MustError as exc:
        return _fail(exc)
    if args.json:
        print(json.dumps({**res.to_dict(), "num_skipped": scan.num_skipped}))
    else:
        print(_accuracy_table([(args.model.stem, res.to_dict())]))
        if scan.num_skipped:
            print(f"skipped {scan.num_skipped} undecodable files")
    return 0


def cmd_predict(args: argparse.Namespace) -> int:
    from must_core.ml.inference import AdaptedClassifier
    from must_core.ml.predict import expand_inputs, predict_files, prediction_row

    _set_threads(args.threads)
    try:
        model = AdaptedClassifier.load(args.model, device=args.device)
        paths = expand_inputs(args.images)
    except MustError as exc:
        return _fail(exc)
    if args.batch_size < 1 or args.top_k < 1 or args.workers < 0:
        return _fail(InvalidConfigError("--batch-size and --top-k must be >= 1, --workers >= 0"))
    if args.out is not None and args.out.suffix.lower() not in (".jsonl", ".csv"):
        return _fail(InvalidConfigError(f"--out must end in .jsonl or .csv, got {args.out}"))
    skipped: list[dict[str, Any]] = []
    rows = [
        prediction_row(str(path), pred)
        for path, pred in predict_files(
            model,
            paths,
            batch_size=args.batch_size,
            top_k=args.top_k,
            num_workers=args.workers,
            on_skip=lambda p, why: skipped.append({"path": str(p), "error": why}),
        )
    ]
    if args.out is not None:
        _write_rows(args.out, rows)
        print(f"{len(rows)} predictions written to {args.out}; {len(skipped)} files skipped")
        for s in skipped[:20]:
            print(f"  skipped {s['path']}: {s['error']}")
    elif args.json:
        print(json.dumps([*rows, *skipped], indent=2))
    else:
        for row in rows:
            tops = ", ".join(f"{t['label']} {t['score']:.3f}" for t in row["top_k"])
            print(f"{row['path']}: {tops}")
        for s in skipped:
            print(f"{s['path']}: ERROR {s['error']}")
    return 1 if skipped else 0


def _write_rows(out: Path, rows: list[dict[str, Any]]) -> None:
    from must_core.ml.predict import write_csv, write_jsonl

    out.parent.mkdir(parents=True, exist_ok=True)
    with out.open("w", encoding="utf-8", newline="") as fh:
        (write_csv if out.suffix.lower() == ".csv" else write_jsonl)(fh, rows)


def cmd_export(args: argparse.Namespace) -> int:
    from must_core.ml.export import export_onnx
    from must_core.ml.inference import AdaptedClassifier

    out = args.output or args.model.with_suffix(".onnx")
    try:
        model = AdaptedClassifier.load(args.model)
        export_onnx(model, out)
    except MustError as exc:
        return _fail(exc)
    print(f"onnx: {out}")
    return 0


def cmd_presets(_: argparse.Namespace) -> int:
    from must_core.ml.config import PRESETS

    for name, values in PRESETS.items():
        print(f"{name}: {json.dumps(values, sort_keys=True)}")
    return 0
