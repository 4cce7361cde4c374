"""Resumable training checkpoints and the compact inference export.

- Training checkpoint (``torch.save``, loaded with ``weights_only=True``): student, EMA, optimizer,
  step/epoch, fairness state, RNG states, config and run identity. Written atomically (temp + rename).
- Inference export (safetensors): ``visual.*`` + ``classifier`` tensors; metadata holds class names,
  preprocessing and the open_clip model config, so it loads without the text tower, optimizer or any
  download.
"""

from __future__ import annotations

import json
import logging
import random
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from must_core.errors import CheckpointError, ModelLoadError
from must_core.fsutil import atomic_write

_logger = logging.getLogger(__name__)

FORMAT_VERSION = 1
INFERENCE_FORMAT = "must-classifier/1"


def rng_state() -> dict[str, Any]:
    state: dict[str, Any] = {
        "torch": torch.get_rng_state(),
        "python": _py_state_to_tensor(random.getstate()),
        "numpy": _np_state_to_tensors(tuple(np.random.get_state())),
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():  # type: ignore[no-untyped-call]
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    random.setstate(_tensor_to_py_state(state["python"]))
    np.random.set_state(_tensors_to_np_state(state["numpy"]))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


# weights_only loading accepts tensors and plain containers only: encode RNG states accordingly.
def _py_state_to_tensor(s: tuple[Any, ...]) -> dict[str, Any]:
    version, internal, gauss = s
    return {
        "version": version,
        "internal": torch.tensor(internal, dtype=torch.int64),
        "gauss": gauss,
    }


def _tensor_to_py_state(d: dict[str, Any]) -> tuple[Any, ...]:
    return (d["version"], tuple(int(x) for x in d["internal"].tolist()), d["gauss"])


def _np_state_to_tensors(s: tuple[Any, ...]) -> dict[str, Any]:
    name, keys, pos, has_gauss, cached = s
    return {
        "name": name,
        "keys": torch.from_numpy(keys.astype(np.int64)),
        "pos": int(pos),
        "has_gauss": int(has_gauss),
        "cached": float(cached),
    }


def _tensors_to_np_state(d: dict[str, Any]) -> tuple[Any, ...]:
    keys = d["keys"].numpy().astype(np.uint32)
    return (d["name"], keys, d["pos"], d["has_gauss"], d["cached"])


def save_training_checkpoint(path: Path, payload: dict[str, Any]) -> None:
    payload = {"format_version": FORMAT_VERSION, **payload}
    atomic_write(path, lambda tmp: torch.save(payload, tmp))


def snapshot(obj: Any) -> Any:
    """A copy of a checkpoint payload whose tensors live on the CPU and no longer alias training state.

    The only part of a checkpoint that must run on the training thread: after it, training may update
    the weights in place while the copy is serialised elsewhere.
    """
    if isinstance(obj, torch.Tensor):
        t = obj.detach()
        return t.to("cpu", copy=True) if t.device.type != "cpu" else t.clone()
    if isinstance(obj, dict):
        return {k: snapshot(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return type(obj)(snapshot(v) for v in obj)
    return obj


class AsyncCheckpointer:
    """Writes training checkpoints off the training thread, with at most one write in flight.

    ``save`` snapshots the payload (a CPU copy, on the caller's thread) and serialises it on a
    background thread with an atomic rename, so a reader (or a kill) only ever sees a complete
    checkpoint. If the previous write is still running, a periodic save is skipped rather than queued
    (the next interval saves a newer state); ``wait=True`` (a run's last save) waits for it instead.
    ``on_written(path, step)`` runs after each completed write, on the writer thread. A failed write is
    re-raised by the next ``save``/``close``.
    """

    def __init__(
        self,
        path: Path,
        on_written: Callable[[Path, int], None] | None = None,
        *,
        background: bool = True,
    ) -> None:
        self.path = path
        self.on_written = on_written
        self.background = background
        self._thread: threading.Thread | None = None
        self._error: BaseException | None = None
        self.skipped = 0

    @property
    def busy(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    def save(self, payload: dict[str, Any], step: int, *, wait: bool = False) -> bool:
        """Checkpoint ``payload`` as ``step``; False when skipped because a write is in flight."""
        self._raise_failure()
        if self.busy and not wait:
            self.skipped += 1
            _logger.info(
                "checkpoint at step %d skipped: the previous one is still being written", step
            )
            return False
        self.wait()
        self._raise_failure()  # a write that failed meanwhile, before this one is announced
        copy = snapshot(payload)
        if not self.background or wait:
            self._write(copy, step)
            self._raise_failure()
            return True
        self._thread = threading.Thread(
            target=self._write, args=(copy, step), daemon=True, name="must-checkpoint"
        )
        self._thread.start()
        return True

    def _write(self, payload: dict[str, Any], step: int) -> None:
        try:
            save_training_checkpoint(self.path, payload)
            if self.on_written is not None:
                self.on_written(self.path, step)
        except BaseException as exc:  # surfaced on the training thread by the next save/close
            self._error = exc

    def wait(self) -> None:
        if self._thread is not None:
            self._thread.join()
            self._thread = None

    def close(self) -> None:
        self.wait()
        self._raise_failure()

    def _raise_failure(self) -> None:
        if self._error is not None:
            err, self._error = self._error, None
            raise err


def load_training_checkpoint(path: Path) -> dict[str, Any]:
    if not path.is_file():
        raise CheckpointError(f"checkpoint not found: {path}")
    try:
        data = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:
        raise CheckpointError(f"cannot read checkpoint {path}: {exc}") from exc
    if not isinstance(data, dict) or data.get("format_version") != FORMAT_VERSION:
        raise CheckpointError(f"{path} is not a MUST training checkpoint (format {FORMAT_VERSION})")
    return data


def export_classifier(
    path: Path,
    state_dict: dict[str, torch.Tensor],
    *,
    class_names: list[str],
    preprocess: dict[str, Any],
    model_cfg: dict[str, Any],
    logit_scale: float,
    extra: dict[str, Any] | None = None,
) -> None:
    """Write the inference format: vision tower + classifier only (no MIM modules, no text tower)."""
    tensors = {
        k: v.detach().to("cpu", torch.float32).contiguous()
        for k, v in state_dict.items()
        if k.startswith("visual.") or k == "classifier"
    }
    meta = {
        "format": INFERENCE_FORMAT,
        "class_names": json.dumps(class_names),
        "preprocess": json.dumps(preprocess),
        "model_cfg": json.dumps(model_cfg),
        "logit_scale": repr(float(logit_scale)),
        "extra": json.dumps(extra or {}),
    }
    atomic_write(path, lambda tmp: save_file(tensors, str(tmp), metadata=meta))


def read_classifier(path: Path) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Tensors and decoded metadata of an inference export."""
    if not path.is_file():
        raise ModelLoadError(f"adapted model file not found: {path}")
    try:
        from safetensors import safe_open

        with safe_open(str(path), framework="pt") as f:
            raw = f.metadata() or {}
        tensors = load_file(str(path))
    except (SafetensorError, OSError, ValueError) as exc:
        raise ModelLoadError(f"cannot read adapted model {path}: {exc}") from exc
    if raw.get("format") != INFERENCE_FORMAT:
        raise ModelLoadError(f"{path} is not a MUST classifier export ({INFERENCE_FORMAT})")
    meta = {
        "class_names": json.loads(raw["class_names"]),
        "preprocess": json.loads(raw["preprocess"]),
        "model_cfg": json.loads(raw["model_cfg"]),
        "logit_scale": float(raw["logit_scale"]),
        "extra": json.loads(raw.get("extra", "{}")),
    }
    return tensors, meta
