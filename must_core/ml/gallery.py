"""Label-free spot checks of a run: which classes a model predicts on the unlabeled set, and a few of
the user's own images under each predicted class.

A fixed random sample of the unlabeled images (``cfg.gallery_max_images``, the same sample before
and after training) is classified by the zero-shot model before the first step and by the adapted
model at the end. The run's metrics get both predicted-class histograms (``predicted_classes``,
keyed by class name); ``gallery.json`` in the output folder holds, per class, the served weights'
(student, EMA teacher or zero-shot model) most confident images as small JPEG thumbnails with their scores (the worker stores them with the
model; ``GET /v1/jobs/{id}/samples`` serves them).
"""

from __future__ import annotations

import base64
import io
import random
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from torch.utils.data import DataLoader

from must_core.ml.data import EvalDataset, eval_transform, load_image
from must_core.ml.evaluate import predict_logits
from must_core.ml.model import Preprocess

GALLERY_FILE = "gallery.json"


def sample_files(files: Sequence[Path], limit: int, seed: int) -> list[Path]:
    """``limit`` files chosen by ``seed`` (all of them when there are fewer), in a stable order."""
    ordered = sorted(files)
    if len(ordered) <= limit:
        return ordered
    return sorted(random.Random(seed).sample(ordered, limit))  # noqa: S311 (a sample, no secret)


def predict_top1(
    net: torch.nn.Module,
    files: Sequence[Path],
    preprocess: Preprocess,
    *,
    device: torch.device,
    batch_size: int,
    amp_dtype: torch.dtype | None = None,
    num_workers: int = 0,
) -> tuple[list[int], list[float]]:
    """Top-1 class index and softmax score of each file."""
    ds = EvalDataset([(p, 0) for p in files], eval_transform(preprocess))
    loader: DataLoader[Any] = DataLoader(ds, batch_size=batch_size, num_workers=num_workers)
    logits, _ = predict_logits(net, loader, device, amp_dtype)
    scores, idx = logits.softmax(-1).max(-1)
    return [int(i) for i in idx.tolist()], [float(s) for s in scores.tolist()]


def class_histogram(indices: Sequence[int], class_names: Sequence[str]) -> dict[str, int]:
    """Predicted images per class name, every class present (0 when never predicted)."""
    counts = dict.fromkeys(class_names, 0)
    for i in indices:
        counts[class_names[i]] += 1
    return counts


def thumbnail(path: Path, px: int) -> str:
    """A JPEG thumbnail (longest side ``px``) as a data URI."""
    img = load_image(path)
    img.thumbnail((px, px))
    buf = io.BytesIO()
    img.convert("RGB").save(buf, format="JPEG", quality=80)
    return "data:image/jpeg;base64," + base64.b64encode(buf.getvalue()).decode()


def build_gallery(
    files: Sequence[Path],
    indices: Sequence[int],
    scores: Sequence[float],
    class_names: Sequence[str],
    *,
    root: Path,
    per_class: int,
    thumb_px: int,
) -> dict[str, list[dict[str, Any]]]:
    """Per class name, its ``per_class`` most confident images: path (relative to ``root``), score
    and thumbnail, best first. Classes the model never predicts have an empty list."""
    ranked: dict[str, list[tuple[float, Path]]] = {name: [] for name in class_names}
    for path, i, score in zip(files, indices, scores, strict=True):
        ranked[class_names[i]].append((score, path))
    gallery: dict[str, list[dict[str, Any]]] = {}
    for name, items in ranked.items():
        best = sorted(items, key=lambda t: (-t[0], str(t[1])))[:per_class]
        gallery[name] = [
            {"path": _relative(p, root), "score": s, "thumbnail": thumbnail(p, thumb_px)}
            for s, p in best
        ]
    return gallery


def _relative(path: Path, root: Path) -> str:
    try:
        return path.relative_to(root).as_posix()
    except ValueError:
        return path.name
