"""The student's augmentation recipe chosen without labels, from the data and the zero-shot model.

A mirror flip is a free augmentation only if it does not change the class. Whether it does can be
measured without labels: on the health probe (unlabeled images, eval view), compare the zero-shot
model's predictions on mirrored images with its predictions on the originals (``flip_agreement``),
against a change that never changes the class, a shift by 1/16 of the image (``shift_agreement``,
how stable zero-shot predictions are anyway). The flip stays on when
``flip_agreement >= shift_agreement - FLIP_TOLERANCE`` and is turned off otherwise: on data whose
classes a mirror changes (left/right, digits, letters, many traffic signs) a zero-shot model that
tells the classes apart changes its prediction under the flip far more often than under a shift.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F

from must_core.ml.health import Probe, predict_probs

FLIP_TOLERANCE = 0.1


def shifted(x: torch.Tensor, fraction: float = 1 / 16) -> torch.Tensor:
    """Translate right by ``fraction`` of the width, repeating the edge column (no wrap-around)."""
    s = max(1, round(x.shape[-1] * fraction))
    return F.pad(x, (s, 0, 0, 0), mode="replicate")[..., : x.shape[-1]]


def choose_hflip(
    probe: Probe,
    model: torch.nn.Module,
    device: torch.device,
    batch_size: int,
    autocast: Callable[[], Any],
    flip_prob: float = 0.5,
) -> dict[str, Any]:
    """{"hflip": chosen probability, "flip_agreement", "shift_agreement", "rule"}."""
    zs = probe.zero_shot_pred

    def agreement(x: torch.Tensor) -> float:
        pred = predict_probs(model, x, device, batch_size, autocast).argmax(-1)
        return round(float((pred == zs).float().mean()), 4)

    flip, shift = agreement(probe.x.flip(-1)), agreement(shifted(probe.x))
    keep = flip >= shift - FLIP_TOLERANCE
    return {
        "hflip": flip_prob if keep else 0.0,
        "flip_agreement": flip,
        "shift_agreement": shift,
        "rule": f"flip kept iff flip_agreement >= shift_agreement - {FLIP_TOLERANCE}",
    }
