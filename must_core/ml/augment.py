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

The strength of the rest (``choose_strength``, with ``strong_strength="auto"``) is measured on the
actual student view, drawn with per-image seeds and without the flip:

- **crop scale**: the configured ``strong_crop_scale`` is the widest range allowed. Its lower bound
  moves halfway to 1 (at most three times) while ``crop_agreement`` (crop only) is below
  ``CROP_RATIO · shift_agreement``: crops that cut the class out of the image are narrowed.
- **RandAugment magnitude**: the configured magnitude is the strongest allowed. On low-detail images
  (``fine_detail`` of the probe below ``DETAIL_RATIO``: less than 1 % of an image's contrast energy
  lies above half the input resolution, as when small crops are enlarged to the model's input or the
  images are blurred) RandAugment is off (``LOW_DETAIL_MAGNITUDE`` = 0). Otherwise the magnitude
  drops by 2 (down to no RandAugment) while ``randaug_agreement`` (the chosen crop, then RandAugment)
  is below ``MAGNITUDE_RATIO · crop_agreement``: photometric ops that erase what the classes differ in
  (colour, brightness, contrast) are weakened until RandAugment keeps that share of the crop's
  agreement.

On the six rendered domains of benchmarks/shift/suite.py the crop rule never binds at (0.8, 1) (crop
agreement 1.03-1.40 × shift agreement); the agreement rule lowers m to 7 on the two position domains
(where80, place40); the two small-image domains (shapes10_small, side20_small: fine detail
0.0016-0.0029 against 0.028-0.030 on the sharp ones) train without RandAugment. Why the detail rule exists beside
the agreement rule, and the validation grid behind it: docs/algorithm.md ("Strength").
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from must_core.ml.config import MustConfig
from must_core.ml.data import StrongView, seeded_transforms
from must_core.ml.health import Probe, predict_probs
from must_core.ml.model import Preprocess

FLIP_TOLERANCE = 0.1
GEOMETRIC_RATIO = 0.5
CROP_RATIO = 0.9
MAGNITUDE_RATIO = 0.6
MAGNITUDE_STEP = 2.0
DETAIL_RATIO = 0.01
LOW_DETAIL_MAGNITUDE = 0.0
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


def fine_detail(x: torch.Tensor) -> float:
    """Median over images of the share of an image's contrast energy (its variance about its own
    mean) that a round trip through half the side (area down, bicubic up) removes: the detail above
    half the input resolution. Photos and sharp renders keep a few percent or more there (0.02-0.11
    for photos at 224 px, 0.028-0.030 on the probes of the suite's sharp renders at 64 px); images
    enlarged from a source of less than about half the input side, or blurred, keep almost none
    (0.0002-0.0006 for 32-48 px photos enlarged to 224, 0.0016-0.0029 for the suite's small domains)."""
    h, w = x.shape[-2:]
    shares = []
    for i in range(0, len(x), 64):  # a few batches' memory at a time, whatever the probe size
        chunk = x[i : i + 64]
        half = F.interpolate(chunk, size=(max(1, h // 2), max(1, w // 2)), mode="area")
        back = F.interpolate(half, size=(h, w), mode="bicubic", align_corners=False)
        centred = chunk - chunk.mean((-2, -1), keepdim=True)
        energy = centred.pow(2).sum((1, 2, 3)).clamp_min(1e-12)
        shares.append((chunk - back).pow(2).sum((1, 2, 3)) / energy)
    return round(float(torch.cat(shares).median()), 4)


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


class ViewAgreement:
    """Zero-shot agreement of student views with the eval view, on the probe images."""

    def __init__(
        self,
        probe: Probe,
        model: torch.nn.Module,
        device: torch.device,
        batch_size: int,
        autocast: Callable[[], Any],
        preprocess: Preprocess,
    ) -> None:
        self.probe, self.model, self.device = probe, model, device
        self.batch_size, self.autocast, self.preprocess = batch_size, autocast, preprocess
        self.mean = torch.tensor(preprocess.mean).view(1, 3, 1, 1)
        self.std = torch.tensor(preprocess.std).view(1, 3, 1, 1)

    def __call__(self, view: Callable[[np.ndarray], torch.Tensor]) -> float:
        """Share of probe images whose prediction on ``view(image)`` (uint8, seeded per image)
        is the one on the eval view."""
        views = []
        for i, img in enumerate(self.probe.images):
            with seeded_transforms(i):
                views.append(view(np.asarray(img)))
        x = (torch.stack(views).float() / 255.0 - self.mean) / self.std
        probs = predict_probs(self.model, x, self.device, self.batch_size, self.autocast)
        return round(float((probs.argmax(-1) == self.probe.zero_shot_pred).float().mean()), 4)


def choose_strength(
    agree: ViewAgreement,
    shift_agreement: float,
    *,
    crop_scale: tuple[float, float],
    num_ops: int,
    magnitude: float,
    magnitude_std: float,
    geometric: bool,
    detail: float = 1.0,
) -> dict[str, Any]:
    """{"crop_scale", "randaug_num_ops", "randaug_magnitude", "crop_agreement",
    "randaug_agreement"}: the configured strength, lowered where the rules above say so. ``detail``
    is :func:`fine_detail` of the probe: below ``DETAIL_RATIO`` the magnitude starts at
    ``LOW_DETAIL_MAGNITUDE`` at most."""

    def view(scale: tuple[float, float], ops: int, m: float) -> StrongView:
        return StrongView(agree.preprocess, scale, ops, m, magnitude_std, 0.0, geometric)

    lo, hi = crop_scale
    crop = agree(view((lo, hi), 0, 0.0))
    for _ in range(3):
        if crop >= CROP_RATIO * shift_agreement:
            break
        lo = round((lo + hi) / 2, 4)
        crop = agree(view((lo, hi), 0, 0.0))
    m, ops, ra = magnitude, num_ops, crop
    if detail < DETAIL_RATIO:
        m = min(m, LOW_DETAIL_MAGNITUDE)
        ops = ops if m > 0 else 0
    while ops > 0:
        ra = agree(view((lo, hi), ops, m))
        if ra >= MAGNITUDE_RATIO * crop:
            break
        m -= MAGNITUDE_STEP
        if m <= 0:
            ops, m, ra = 0, 0.0, crop
    return {
        "crop_scale": [lo, hi],
        "randaug_num_ops": ops,
        "randaug_magnitude": m,
        "crop_agreement": crop,
        "randaug_agreement": ra,
    }


def choose_recipe(
    cfg: MustConfig,
    model: torch.nn.Module,
    probe: Probe | None,
    device: torch.device,
    autocast: Callable[[], Any],
    preprocess: Preprocess,
) -> dict[str, Any]:
    """The student view's recipe: the configured values where they are explicit, the label-free
    rules above for the "auto" ones, and how it was chosen."""
    recipe: dict[str, Any] = {
        "crop_scale": list(cfg.strong_crop_scale),
        "randaug_num_ops": cfg.randaug_num_ops,
        "randaug_magnitude": cfg.randaug_magnitude,
    }
    explicit = {
        k: v
        for k, v in (("hflip", cfg.strong_hflip), ("geometric", cfg.randaug_geometric))
        if v != "auto"
    }
    if len(explicit) == 2 and cfg.strong_strength == "config":
        return {**recipe, **explicit, "chosen_by": "config"}
    if probe is None:
        fallback = {"hflip": 0.5, "geometric": True}
        return {**recipe, **fallback, **explicit, "chosen_by": "default (no probe images)"}
    bs = cfg.eval_batch_size
    chosen = choose_augmentation(
        probe, model, device, bs, autocast, magnitude=cfg.randaug_magnitude
    )
    chosen.update(explicit)
    if cfg.strong_strength == "auto":
        chosen["fine_detail"] = fine_detail(probe.x)
        chosen |= choose_strength(
            ViewAgreement(probe, model, device, bs, autocast, preprocess),
            chosen["shift_agreement"],
            crop_scale=cfg.strong_crop_scale,
            num_ops=cfg.randaug_num_ops,
            magnitude=cfg.randaug_magnitude,
            magnitude_std=cfg.randaug_magnitude_std,
            geometric=bool(chosen["geometric"]),
            detail=chosen["fine_detail"],
        )
    configured = [*explicit, *(["strength"] if cfg.strong_strength == "config" else [])]
    how = "zero-shot agreement on the unlabeled data" + (
        f" ({', '.join(configured)} from config)" if configured else ""
    )
    return {**recipe, **chosen, "chosen_by": how}
