"""The student's augmentation recipe chosen without labels, from the data and the zero-shot model.

An augmentation is free only if it does not change the class. Whether it does can be measured
without labels: on the health probe (unlabeled images, eval view), compare the zero-shot model's
predictions on transformed images with its predictions on the originals, against a change that never
changes the class, a shift by 1/16 of the image (``shift_agreement``, how stable zero-shot predictions
are anyway). Two families are decided this way:

- **mirror flip** (``flip_agreement``): kept when ``flip_agreement >= shift_agreement - FLIP_TOLERANCE``.
  On data whose classes a mirror changes (left/right, digits, letters, many traffic signs) a zero-shot
  model that tells the classes apart changes its prediction under the flip far more often.
- **geometric RandAugment ops** (Rotate, ShearX/Y, TranslateX/YRel): the strongest of them moves the
  image by 0.45·m/10 of its size (0.405 at m = 9). ``translate_agreement`` is the agreement under that
  translation (along x for half the probe, y for the other half, both signs, the dataset mean filling
  the gap, as timm does). They are kept when ``translate_agreement >= GEOMETRIC_RATIO ·
  shift_agreement``; otherwise RandAugment draws from its photometric ops only. Where a class depends
  on where things are (position, layout, text), a large translation changes it.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F

from must_core.ml.health import Probe, predict_probs

FLIP_TOLERANCE = 0.1
GEOMETRIC_RATIO = 0.5
RANDAUG_TRANSLATE_PCT = 0.45  # timm's default translate_pct at magnitude 10


def shifted(x: torch.Tensor, fraction: float = 1 / 16) -> torch.Tensor:
    """Translate right by ``fraction`` of the width, repeating the edge column (no wrap-around)."""
    s = max(1, round(x.shape[-1] * fraction))
    return F.pad(x, (s, 0, 0, 0), mode="replicate")[..., : x.shape[-1]]


def translated(x: torch.Tensor, fraction: float) -> torch.Tensor:
    """Move the first half of the images along x and the second along y by ``fraction`` of the size,
    alternating the sign image by image; the uncovered part is 0 (the dataset mean, normalised)."""
    out = torch.zeros_like(x)
    for i in range(len(x)):
        dim = -1 if i < len(x) // 2 else -2
        s = round(x.shape[dim] * fraction) * (1 if i % 2 == 0 else -1)
        src = x[i].narrow(dim, max(0, -s), x.shape[dim] - abs(s))
        out[i].narrow(dim, max(0, s), x.shape[dim] - abs(s)).copy_(src)
    return out


def translate_fraction(magnitude: float) -> float:
    """How far RandAugment's TranslateRel moves an image at ``magnitude`` (0-10)."""
    return RANDAUG_TRANSLATE_PCT * min(10.0, magnitude) / 10.0


def choose_augmentation(
    probe: Probe,
    model: torch.nn.Module,
    device: torch.device,
    batch_size: int,
    autocast: Callable[[], Any],
    *,
    magnitude: float = 9.0,
    flip_prob: float = 0.5,
) -> dict[str, Any]:
    """{"hflip", "geometric", the three agreements, "rule"} from the zero-shot model on the probe."""
    zs = probe.zero_shot_pred

    def agreement(x: torch.Tensor) -> float:
        pred = predict_probs(model, x, device, batch_size, autocast).argmax(-1)
        return round(float((pred == zs).float().mean()), 4)

    shift = agreement(shifted(probe.x))
    flip = agreement(probe.x.flip(-1))
    move = agreement(translated(probe.x, translate_fraction(magnitude)))
    return {
        "hflip": flip_prob if flip >= shift - FLIP_TOLERANCE else 0.0,
        "geometric": move >= GEOMETRIC_RATIO * shift,
        "flip_agreement": flip,
        "shift_agreement": shift,
        "translate_agreement": move,
        "rule": (
            f"flip kept iff flip_agreement >= shift_agreement - {FLIP_TOLERANCE}; geometric "
            f"RandAugment ops kept iff translate_agreement >= {GEOMETRIC_RATIO} * shift_agreement"
        ),
    }


def strong_view_agreement(
    probe: Probe,
    model: torch.nn.Module,
    device: torch.device,
    batch_size: int,
    autocast: Callable[[], Any],
    view: Callable[[Any], torch.Tensor],
    normalize: Callable[[torch.Tensor], torch.Tensor],
) -> float:
    """Share of probe images whose zero-shot prediction on ``view(image)`` (a uint8 strong view,
    drawn with per-image seeds) is the one on the eval view."""
    import random

    import numpy as np

    py_state, np_state = random.getstate(), np.random.get_state()
    views = []
    with torch.random.fork_rng(devices=[]):
        for i, img in enumerate(probe.images):
            random.seed(i)
            np.random.seed(i)
            torch.default_generator.manual_seed(i)
            views.append(view(np.asarray(img)))
    random.setstate(py_state)
    np.random.set_state(np_state)
    x = normalize(torch.stack(views).float() / 255.0)
    pred = predict_probs(model, x, device, batch_size, autocast).argmax(-1)
    return round(float((pred == probe.zero_shot_pred).float().mean()), 4)
