"""Batched top-k predictions over image files, decoding in a DataLoader, skipping bad files.

One function, :func:`predict_files`, used by ``must predict DIR``, the batch-predictions job and the
end-of-job sample gallery. Files that do not decode are never fatal: each is reported once through
``on_skip(path, reason)`` (reasons from :func:`must_core.ml.images.decode_reason`) and left out.
"""

from __future__ import annotations

import csv
import json
import logging
from collections.abc import Callable, Iterable, Iterator, Sequence
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
