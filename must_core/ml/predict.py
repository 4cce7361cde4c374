"""Batched top-k predictions over image files, decoding in a DataLoader, skipping bad files.

One function, :func:`predict_files`, used by ``must predict DIR``, the batch-predictions job and the
end-of-job sample gallery. Files that do not decode are never fatal: each is reported once through
``on_skip(path, reason)`` (reasons from :func:`must_core.ml.images.decode_reason`) and left out.
"""

from __future__ import annotations

import csv
import json
import logging
import shutil
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TextIO

import torch
from torch.utils.data import DataLoader, Dataset
from torchvision import transforms as T

from must_core.ml.images import decode_reason, list_candidate_files, load_image
from must_core.ml.inference import AdaptedClassifier, Prediction

_logger = logging.getLogger(__name__)

# (index into paths, image tensor or None, reason when None)
_Item = tuple[int, torch.Tensor | None, str]
SkipHandler = Callable[[Path, str], None]


class _FileImages(Dataset[_Item]):
    """Decodes and transforms one file; a bad file becomes (i, None, reason) instead of an error."""

    def __init__(self, paths: Sequence[Path], transform: T.Compose) -> None:
        self.paths = list(paths)
        self.transform = transform

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, i: int) -> _Item:
        try:
            # Full decode, no JPEG draft: the tensors equal those /classify computes for the same file.
            return i, self.transform(load_image(self.paths[i])), ""
        except Exception as exc:  # a corrupt file must never abort a batch
            return i, None, decode_reason(exc)


def _collate(items: list[_Item]) -> list[_Item]:
    return items  # stacking happens after dropping the bad files


def predict_files(
    model: AdaptedClassifier,
    paths: Sequence[Path],
    *,
    batch_size: int = 64,
    top_k: int = 5,
    num_workers: int = 0,
    on_skip: SkipHandler | None = None,
) -> Iterator[tuple[Path, Prediction]]:
    """Yield ``(path, prediction)`` for every decodable file, in the order of ``paths``.

    Args:
        model: the adapted classifier (its device is used for the forward pass).
        paths: image files; undecodable ones are skipped and reported to ``on_skip``.
        batch_size: images per forward pass.
        top_k: labels kept per image (capped at the number of classes).
        num_workers: DataLoader decode processes; 0 decodes in this process.
        on_skip: called once per skipped file with a short reason; by default a warning is logged.
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    paths = list(paths)
    loader = DataLoader(
        _FileImages(paths, model.transform),
        batch_size=batch_size,
        shuffle=False,
        num_workers=num_workers,
        collate_fn=_collate,
        persistent_workers=False,
    )
    device = model.classifier.device
    for batch in loader:
        good = [(i, x) for i, x, _ in batch if x is not None]
        for i, x, reason in batch:
            if x is None:
                _report_skip(paths[i], reason, on_skip)
        if not good:
            continue
        with torch.inference_mode():
            logits = model(torch.stack([x for _, x in good]).to(device))
        preds = model.predictions_from_logits(logits, top_k)
        for (i, _), pred in zip(good, preds, strict=True):
            yield paths[i], pred


def _report_skip(path: Path, reason: str, on_skip: SkipHandler | None) -> None:
    if on_skip is None:
        _logger.warning("skipped %s: %s", path, reason)
    else:
        on_skip(path, reason)


def expand_inputs(inputs: Sequence[Path]) -> list[Path]:
    """Files as given, folders expanded to their image files (recursive, sorted)."""
    out: list[Path] = []
    for p in inputs:
        out.extend(list_candidate_files(p) if p.is_dir() else [p])
    return out


def prediction_row(path: str, pred: Prediction) -> dict[str, Any]:
    """One JSONL row: the file, the top label and score, and the top-k list."""
    return {"path": path, "label": pred.label, "score": pred.score, "top_k": pred.top_k}


CSV_COLUMNS = ("path", "label", "score", "top_k_labels", "top_k_scores")


def write_jsonl(fh: TextIO, rows: Iterable[dict[str, Any]]) -> int:
    """One JSON object per line; returns the number of rows written."""
    n = 0
    for row in rows:
        fh.write(json.dumps(row, ensure_ascii=False) + "\n")
        n += 1
    return n


def write_csv(fh: TextIO, rows: Iterable[dict[str, Any]]) -> int:
    """CSV with a header; the top-k labels and scores are ``|``-joined in rank order."""
    writer = csv.writer(fh)
    writer.writerow(CSV_COLUMNS)
    n = 0
    for row in rows:
        top = row["top_k"]
        writer.writerow(
            [
                row["path"],
                row["label"],
                f"{row['score']:.6f}",
                "|".join(t["label"] for t in top),
                "|".join(f"{t['score']:.6f}" for t in top),
            ]
        )
        n += 1
    return n


# ---- a predictions run over a folder: resumable, stoppable, with progress -------------------------
ROWS_FILE = "rows.jsonl"  # every row so far, predictions and skipped files ({"path", "error"})
JSONL_FILE, CSV_FILE = "predictions.jsonl", "predictions.csv"


@dataclass
class PredictionRun:
    """The outcome of :func:`run_predictions` (paths relative to the images folder)."""

    status: str  # completed | stopped
    total: int
    done: int
    num_predicted: int
    skipped: list[tuple[str, str]]
    jsonl_path: str | None
    csv_path: str | None
    resumed_from: int
    images_per_second: float


def _read_rows(path: Path) -> list[dict[str, Any]]:
    """Rows of a (possibly cut-off) rows file: a torn last line is dropped."""
    rows = []
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            rows.append(json.loads(line))
        except ValueError:
            break
    return rows


def _write_skip(fh: TextIO, path: str, reason: str) -> None:
    fh.write(json.dumps({"path": path, "error": reason}) + "\n")


def run_predictions(
    model: AdaptedClassifier,
    images_dir: Path,
    out_dir: Path,
    *,
    top_k: int = 5,
    batch_size: int = 64,
    num_workers: int = 0,
    resume_rows: Path | None = None,
    on_progress: Callable[[dict[str, Any]], None] | None = None,
    should_stop: Callable[[], bool] = lambda: False,
    on_checkpoint: Callable[[Path, int], None] | None = None,
    checkpoint_every: int = 1000,
) -> PredictionRun:
    """Predict every image under ``images_dir`` into ``out_dir`` (``predictions.jsonl``/``.csv``).

    Rows go to ``rows.jsonl`` as they come; ``resume_rows`` (an earlier run's rows file) skips the
    files it already covers. ``on_checkpoint(copy_of_rows, n)`` receives a consistent copy every
    ``checkpoint_every`` files and when stopped, so a later run can resume from it.
    """
    out_dir.mkdir(parents=True, exist_ok=True)
    files = list_candidate_files(images_dir)
    rel = {p: p.relative_to(images_dir).as_posix() for p in files}
    rows_path = out_dir / ROWS_FILE
    prior = _read_rows(resume_rows) if resume_rows is not None and resume_rows.exists() else []
    seen = {r["path"] for r in prior}
    with rows_path.open("w", encoding="utf-8") as fh:
        write_jsonl(fh, prior)
    todo = [p for p in files if rel[p] not in seen]
    done, since_ckpt, t0 = len(prior), 0, time.monotonic()

    def emit(status: str) -> None:
        if on_progress is not None:
            rate = (done - len(prior)) / max(time.monotonic() - t0, 1e-6)
            left = len(files) - done
            on_progress(
                {
                    "step": done,
                    "total_steps": len(files),
                    "fraction": done / len(files) if files else 1.0,
                    "images_per_second": rate,
                    "eta_seconds": left / rate if rate > 0 else None,
                    "phase": status,
                }
            )

    def snapshot() -> None:
        if on_checkpoint is not None:
            copy = out_dir / f"rows-{done:09d}.jsonl"
            shutil.copyfile(rows_path, copy)
            on_checkpoint(copy, done)  # the handler links or copies it away
            copy.unlink(missing_ok=True)

    stopped = False
    with rows_path.open("a", encoding="utf-8") as fh:
        for start in range(0, len(todo), batch_size * 4):
            if should_stop():
                stopped = True
                break
            chunk = todo[start : start + batch_size * 4]
            got = dict(
                predict_files(
                    model,
                    chunk,
                    batch_size=batch_size,
                    top_k=top_k,
                    num_workers=num_workers,
                    on_skip=lambda p, why: _write_skip(fh, rel[p], why),
                )
            )
            write_jsonl(fh, [prediction_row(rel[p], pred) for p, pred in got.items()])
            fh.flush()
            done += len(chunk)
            since_ckpt += len(chunk)
            emit("predict")
            if since_ckpt >= checkpoint_every:
                since_ckpt = 0
                snapshot()
    rows = _read_rows(rows_path)
    skipped = [(r["path"], r["error"]) for r in rows if "error" in r]
    if stopped:
        snapshot()
        return PredictionRun(
            "stopped",
            len(files),
            done,
            len(rows) - len(skipped),
            skipped,
            None,
            None,
            len(prior),
            0.0,
        )
    good = sorted((r for r in rows if "error" not in r), key=lambda r: r["path"])
    with (out_dir / JSONL_FILE).open("w", encoding="utf-8") as fh:
        write_jsonl(fh, good)
    with (out_dir / CSV_FILE).open("w", encoding="utf-8", newline="") as fh:
        write_csv(fh, good)
    rate = (done - len(prior)) / max(time.monotonic() - t0, 1e-6)
    emit("done")
    return PredictionRun(
        "completed",
        len(files),
        done,
        len(good),
        skipped,
        str(out_dir / JSONL_FILE),
        str(out_dir / CSV_FILE),
        len(prior),
        rate,
    )
