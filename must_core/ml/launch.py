"""The training process of a job: ``python -m must_core.ml.launch RUN_DIR`` (one rank, or under torchrun).

A service worker cannot train inside its own process: a Celery prefork child is daemonic and may not
start DataLoader workers or DDP ranks. So the worker writes ``RUN_DIR/launch.json`` and starts this
module as a child process group — directly for one process, through ``torchrun`` (``--torchrun N``)
for several — and talks to it through files in ``RUN_DIR`` only:

- ``launch.json`` (in): the config and local inputs of :func:`must_core.ml.train.adapt`;
- ``events.jsonl`` (out, rank 0): one JSON object per line, ``{"type": "progress", ...}``,
  ``{"type": "health", "kind": "health", "step": N, ...}`` (label-free run health) or
  ``{"type": "checkpoint", "path": ..., "step": N}`` (a hard link to a complete checkpoint that the
  reader uploads and then deletes);
- ``prepared_cache`` (in/out): a prepared dataset found there is reused; one built there is complete
  once its ``meta.json`` exists (the reader may then cache it);
- ``STOP`` (in): created by the supervisor to request a checkpoint-and-stop (cancel, lost claim);
- ``result.json`` (out, rank 0) on success, ``error-RANK.json`` (``{"code", "message"}``) on failure.

Every process of the tree asks the kernel for SIGKILL when its parent dies, so killing the worker
(even with SIGKILL) takes the trainer, its ranks and their loader workers down with it.

Several machines: start the same module on every node with torchrun's rendezvous, e.g.
``torchrun --nnodes 2 --nproc-per-node 8 --rdzv-backend c10d --rdzv-endpoint HOST:29400
-m must_core.ml.launch RUN_DIR`` with RUN_DIR (inputs and launch.json) present on each node.
"""

from __future__ import annotations

import argparse
import ctypes
import json
import logging
import os
import signal
import sys
import threading
import traceback
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

LAUNCH_FILE = "launch.json"
EVENTS_FILE = "events.jsonl"
STOP_FILE = "STOP"
RESULT_FILE = "result.json"
UPLOADS_DIR = "uploads"
PARENT_ENV = "MUST_TRAINER_PARENT_PID"

_logger = logging.getLogger("must_core.ml.launch")


@dataclass
class LaunchSpec:
    """What the trainer needs, as JSON: the config plus the local inputs of ``adapt``."""

    config: dict[str, Any]
    images_dir: str
    class_names: list[str]
    output_dir: str
    base_model: dict[str, Any]
    templates: list[str] | None = None
    eval_dir: str | None = None
    resume: bool = True
    prepared_cache: str | None = None  # see adapt(prepared_cache=...)
    # adapt: train (then optionally predict over images_dir); predict: only predictions of model_path
    task: str = "adapt"
    model_path: str | None = None  # predict: the adapted classifier to run
    export_onnx: bool = False  # adapt: also write model.onnx next to the model
    # predictions (task predict, or adapt with params.predict_dataset): top_k, batch_size,
    # num_workers, device, num_threads, checkpoint_every, resume_rows
    predict: dict[str, Any] | None = None

    def write(self, run_dir: Path) -> None:
        run_dir.mkdir(parents=True, exist_ok=True)
        (run_dir / LAUNCH_FILE).write_text(json.dumps(asdict(self)))

    @classmethod
    def read(cls, run_dir: Path) -> LaunchSpec:
        return cls(**json.loads((run_dir / LAUNCH_FILE).read_text()))


def die_with_parent() -> None:
    """SIGKILL this process when its parent dies (Linux); exit now if the parent is already gone."""
    if not sys.platform.startswith("linux"):
        return
    # The supervisor (and the torchrun agent, for its ranks) names itself: a parent that died before
    # this line has already been replaced by the reaper, which getppid() alone cannot tell.
    parent = int(os.environ.get(PARENT_ENV) or os.getppid())
    pr_set_pdeathsig = 1
    ctypes.CDLL(None, use_errno=True).prctl(pr_set_pdeathsig, signal.SIGKILL)
    if os.getppid() != parent:
        os._exit(1)


class _EventLog:
    """Rank 0's side of events.jsonl: whole lines, flushed, from the training and checkpoint threads."""

    def __init__(self, run_dir: Path) -> None:
        self.run_dir = run_dir
        self._lock = threading.Lock()
        self._file = (run_dir / EVENTS_FILE).open("a", encoding="utf-8")
        self._count = 0

    def emit(self, event: dict[str, Any]) -> None:
        line = json.dumps(event, allow_nan=False, default=str) + "\n"
        with self._lock:
            self._file.write(line)
            self._file.flush()

    def checkpoint(self, path: Path, step: int) -> None:
        """Hand a complete checkpoint to the reader: a hard link survives the next atomic rename."""
        uploads = self.run_dir / UPLOADS_DIR
        uploads.mkdir(exist_ok=True)
        self._count += 1  # unique: the same step may be saved twice (a stop right after a save)
        link = uploads / f"step-{step:09d}-{self._count}.pt"
        os.link(path, link)
        self.emit({"type": "checkpoint", "path": str(link), "step": step})

    def close(self) -> None:
        self._file.close()


def run(run_dir: Path) -> None:
    """Run the job described in ``run_dir`` (see the module docstring)."""
    spec = LaunchSpec.read(run_dir)
    if spec.task == "predict":
        _run_predict(run_dir, spec)
    else:
        _run_adapt(run_dir, spec)


def _run_adapt(run_dir: Path, spec: LaunchSpec) -> None:
    """Train one rank; rank 0 then exports ONNX and predicts over the dataset when asked."""
    from must_core.ml.config import BaseModelSpec, MustConfig
    from must_core.ml.distributed import destroy_process_group, from_environment, init_process_group
    from must_core.ml.train import adapt, select_device

    cfg = MustConfig(**spec.config)
    ctx = from_environment()
    init_process_group(ctx, select_device(cfg))
    log = _EventLog(run_dir) if ctx.is_main else None
    stop_file = run_dir / STOP_FILE
    try:
        result = adapt(
            cfg,
            images_dir=Path(spec.images_dir),
            class_names=spec.class_names,
            output_dir=Path(spec.output_dir),
            base_model=BaseModelSpec(**spec.base_model),
            templates=spec.templates,
            eval_dir=Path(spec.eval_dir) if spec.eval_dir else None,
            prepared_cache=Path(spec.prepared_cache) if spec.prepared_cache else None,
            resume=spec.resume,
            on_progress=(lambda e: log.emit({"type": "progress", **e.to_dict()})) if log else None,
            should_stop=stop_file.exists,
            on_checkpoint=log.checkpoint if log else None,
            on_health=(lambda e: log.emit({"type": "health", **e})) if log else None,
            dist=ctx,
        )
        if log is not None:
            out = _result_dict(result)
            if result.status == "completed" and result.model_path is not None:
                out.update(_after_adapt(run_dir, spec, Path(result.model_path), log))
            _write_json(run_dir / RESULT_FILE, out)
    finally:
        if log is not None:
            log.close()
        destroy_process_group()


def _after_adapt(
    run_dir: Path, spec: LaunchSpec, model_path: Path, log: _EventLog
) -> dict[str, Any]:
    """The ONNX export (a failure is reported, not fatal) and the dataset's predictions."""
    out: dict[str, Any] = {}
    if spec.export_onnx:
        from must_core.errors import MustError
        from must_core.ml.export import export_onnx
        from must_core.ml.inference import AdaptedClassifier

        try:
            out["onnx_path"] = str(
                export_onnx(AdaptedClassifier.load(model_path), model_path.with_suffix(".onnx"))
            )
        except MustError as exc:
            _logger.warning("ONNX export failed (the model is kept): %s", exc.message)
            out["onnx_error"] = exc.message
    if spec.predict is not None:
        # no progress/checkpoint events: the job's progress and checkpoint are the training's
        out["predictions"] = _predict(run_dir, spec, model_path, None)
    return out


def _run_predict(run_dir: Path, spec: LaunchSpec) -> None:
    log = _EventLog(run_dir)
    try:
        assert spec.model_path is not None
        result = _predict(run_dir, spec, Path(spec.model_path), log)
        _write_json(run_dir / RESULT_FILE, {"status": result["status"], "predictions": result})
    finally:
        log.close()


def _predict(
    run_dir: Path, spec: LaunchSpec, model_path: Path, log: _EventLog | None
) -> dict[str, Any]:
    """Predictions of ``model_path`` over ``spec.images_dir`` into ``output_dir/predictions``."""
    import torch

    from must_core.ml.inference import AdaptedClassifier
    from must_core.ml.predict import run_predictions

    opts = spec.predict or {}
    torch.set_num_threads(int(opts.get("num_threads") or 1))
    device = str(opts.get("device") or "cpu")
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    resume = opts.get("resume_rows")
    run = run_predictions(
        AdaptedClassifier.load(model_path, device=device),
        Path(spec.images_dir),
        Path(spec.output_dir) / "predictions",
        top_k=int(opts.get("top_k") or 5),
        batch_size=int(opts.get("batch_size") or 64),
        num_workers=int(opts.get("num_workers") or 0),
        resume_rows=Path(resume) if resume else None,
        on_progress=(lambda e: log.emit({"type": "progress", **e})) if log else None,
        should_stop=(run_dir / STOP_FILE).exists,
        on_checkpoint=log.checkpoint if log else None,
        checkpoint_every=int(opts.get("checkpoint_every") or 1000),
    )
    return asdict(run)


def _result_dict(result: Any) -> dict[str, Any]:
    d = asdict(result)
    for key in ("output_dir", "checkpoint_path", "model_path", "ema_model_path"):
        d[key] = str(d[key]) if d[key] is not None else None
    return d


def _write_json(path: Path, value: Any) -> None:
    from must_core.fsutil import atomic_write

    text = json.dumps(value, default=str)
    atomic_write(path, lambda tmp: tmp.write_text(text))


def _report_failure(run_dir: Path, exc: BaseException) -> int:
    from must_core.errors import MustError

    rank = os.environ.get("RANK", "0")
    if isinstance(exc, MustError):
        body, code = {"code": exc.code, "message": exc.message}, 3
    else:
        body = {"code": "internal_error", "message": f"{type(exc).__name__}: {exc}"[:2000]}
        code = 1
        traceback.print_exc()
    _write_json(run_dir / f"error-{rank}.json", body)
    return code


def _torchrun(nproc: int, run_dir: Path) -> int:
    """Start ``nproc`` ranks on this machine under torchrun's elastic agent (this process)."""
    from torch.distributed.run import main as torchrun_main

    os.environ[PARENT_ENV] = str(os.getpid())  # the ranks' parent is this agent
    torchrun_main(
        [
            "--standalone",
            f"--nproc-per-node={nproc}",
            "--max-restarts=0",
            "-m",
            "must_core.ml.launch",
            str(run_dir),
        ]
    )
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m must_core.ml.launch")
    parser.add_argument("run_dir", type=Path)
    parser.add_argument("--torchrun", type=int, metavar="N", help="start N ranks with torchrun")
    args = parser.parse_args(argv)
    die_with_parent()
    logging.basicConfig(
        level=os.environ.get("MUST_LOG_LEVEL", "INFO"),
        format=f"%(levelname)s rank{os.environ.get('RANK', '0')} %(name)s: %(message)s",
        stream=sys.stderr,
    )
    if args.torchrun:
        try:
            return _torchrun(args.torchrun, args.run_dir)
        except Exception as exc:  # ChildFailedError: the failing rank wrote its error file
            _logger.error("a training rank failed: %s", exc)
            return 2
    try:
        run(args.run_dir)
    except BaseException as exc:
        return _report_failure(args.run_dir, exc)
    return 0


if __name__ == "__main__":
    sys.exit(main())
