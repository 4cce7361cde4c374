"""Labelled evaluation: top-1 and mean-per-class accuracy (spec §8, with §10.8 fixed)."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.utils.data import DataLoader

from must_core.ml.data import EvalDataset, eval_transform
from must_core.ml.model import Preprocess


@dataclass
class EvalResult:
    top1: float  # percent
    mean_per_class: float  # percent, over classes that have at least one sample
    num_images: int
    per_class: dict[str, float]  # class name -> recall (percent), classes with samples only

    def to_dict(self) -> dict[str, Any]:
        return {
            "top1": self.top1,
            "mean_per_class": self.mean_per_class,
            "num_images": self.num_images,
            "per_class": dict(self.per_class),
        }


def accuracy_from_predictions(
    preds: torch.Tensor,
    targets: torch.Tensor,
    num_classes: int,
    class_names: Sequence[str] | None = None,
) -> EvalResult:
    """Top-1 and mean per-class recall over ``range(num_classes)``; classes absent from the targets
    are excluded from the mean explicitly (the reference's sklearn path could produce NaN).
    ``per_class`` is keyed by class name (by the index as a string when no names are given)."""
    preds, targets = preds.long().cpu(), targets.long().cpu()
    names = list(class_names) if class_names is not None else [str(k) for k in range(num_classes)]
    if len(names) != num_classes:
        raise ValueError(f"{len(names)} class names for {num_classes} classes")
    n = int(targets.numel())
    top1 = 100.0 * float((preds == targets).sum()) / max(n, 1)
    per_class: dict[str, float] = {}
    for k in range(num_classes):
        sel = targets == k
        count = int(sel.sum())
        if count:
            per_class[names[k]] = 100.0 * float((preds[sel] == k).sum()) / count
    mpc = sum(per_class.values()) / len(per_class) if per_class else 0.0
    return EvalResult(top1=top1, mean_per_class=mpc, num_images=n, per_class=per_class)


@torch.no_grad()
def predict_logits(
    model: nn.Module,
    loader: DataLoader[Any],
    device: torch.device,
    amp_dtype: torch.dtype | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    was_training = model.training
    model.eval()
    logits, targets = [], []
    for x, y in loader:
        x = x.to(device, non_blocking=True)
        if amp_dtype is not None:
            with torch.autocast(device_type=device.type, dtype=amp_dtype):
                out = model(x)
        else:
            out = model(x)
        logits.append(out.float().cpu())
        targets.append(torch.as_tensor(y))
    model.train(was_training)
    return torch.cat(logits), torch.cat(targets)


def evaluate_folder(
    model: nn.Module,
    items: Sequence[tuple[Path, int]],
    preprocess: Preprocess,
    *,
    num_classes: int,
    device: torch.device,
    batch_size: int = 128,
    amp_dtype: torch.dtype | None = None,
    num_workers: int = 0,
    class_names: Sequence[str] | None = None,
) -> EvalResult:
    ds = EvalDataset(items, eval_transform(preprocess))
    loader: DataLoader[Any] = DataLoader(
        ds, batch_size=batch_size, shuffle=False, num_workers=num_workers
    )
    logits, targets = predict_logits(model, loader, device, amp_dtype)
    return accuracy_from_predictions(logits.argmax(-1), targets, num_classes, class_names)
