"""Label-free run health: what a user without labels can still know about an adaptation run.

A fixed *probe* sample of the unlabeled images (up to ``probe_samples``, evenly spaced, eval view) is
classified by the zero-shot model once before training, then by the student and the EMA teacher at
every health interval. From these predictions alone (no labels):

- ``pred_entropy``: entropy (nats) of the student's predicted-class histogram; ``entropy_ratio`` is
  it divided by the target prior's entropy (log K for a uniform prior);
- ``max_class_share``: the largest class's share of the student's predictions;
- ``confident_ratio``: share of probe images whose teacher max-probability passes ``conf_threshold``;
- ``agree_zero_shot`` / ``agree_teacher``: share of probe images where the student's prediction
  equals the zero-shot model's / the teacher's;
- ``class_counts``: the student's predictions per class name;
- ``zero_shot_pred_entropy`` / ``zero_shot_entropy_ratio``: the same entropy for the zero-shot model.

The rule (:func:`health_warnings`, documented in docs/algorithm.md) flags a run as **collapsed** when
its predictions concentrate on few classes — ``entropy_ratio < 0.5`` or, for K >= 3,
``max_class_share > max(0.5, 2/K)`` — and as **degraded** when its prediction entropy fell more than
``0.1·log K`` below the zero-shot model's on the same images (the adaptation concentrated predictions
that zero-shot spread; a shift of the class balance that fairness is meant to prevent). It flags the
student as **diverged** when it predicts what its EMA teacher predicts on fewer than
``DIVERGED_AGREE_TEACHER`` (95 %) of the probe images: the student no longer follows the pseudo-labels
it is trained on (an augmentation that changes the class, a step size its teacher cannot track). In the
shift suite every run that lost to zero-shot without concentrating its predictions (the reference's
settings) ended at 46–90 % agreement, every default run at 98 % or more (docs/algorithm.md).

The same probe gives the EM estimate of the target class prior (``fair_prior="estimated"``) and the
zero-shot agreement of strong views that picks the augmentation recipe (:mod:`must_core.ml.augment`).
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from PIL import Image

_logger = logging.getLogger(__name__)

COLLAPSE_ENTROPY_RATIO = 0.5
# Warning codes in a job's ``warnings`` (not errors: the job succeeds).
COLLAPSED, DEGRADED, DIVERGED = "collapsed", "degraded", "diverged"
DEGRADED_ENTROPY_DROP = 0.1  # in units of log K (0.2 until the sixth session)
DIVERGED_AGREE_TEACHER = 0.95


@dataclass
class Probe:
    """The probe images (normalised eval view, CPU) and the zero-shot model's probabilities on them."""

    x: torch.Tensor  # [n, 3, H, W]
    zero_shot_probs: torch.Tensor  # [n, K]
    images: list[Image.Image]  # the decoded images (for strong-view agreement)

    @property
    def zero_shot_pred(self) -> torch.Tensor:
        return self.zero_shot_probs.argmax(-1)


def sample_images(load: Callable[[int], Image.Image], n_total: int, n: int) -> list[Image.Image]:
    """Up to ``n`` evenly spaced decodable images (undecodable ones are skipped)."""
    stride = max(1, n_total // max(1, n))
    out = []
    for i in range(0, n_total, stride)[:n]:
        try:
            out.append(load(i).convert("RGB"))
        except Exception as exc:  # the loader reports undecodable files; here they are skipped
            _logger.debug("probe skips image %d: %s", i, exc)
    return out


@torch.no_grad()
def predict_probs(
    net: torch.nn.Module,
    x: torch.Tensor,
    device: torch.device,
    batch_size: int,
    autocast: Callable[[], Any],
) -> torch.Tensor:
    """Softmax probabilities [n, K] (fp32, CPU) of an unmasked forward, in eval mode."""
    was = net.training
    net.eval()
    out = []
    try:
        for i in range(0, len(x), batch_size):
            with autocast():
                logits = net(x[i : i + batch_size].to(device))
            out.append(logits.float().softmax(-1).cpu())
    finally:
        net.train(was)
    return torch.cat(out) if out else torch.zeros(0)


def estimate_prior(probs: torch.Tensor, iters: int = 100, floor: float = 0.1) -> torch.Tensor:
    """EM re-estimation of the class prior from predictions made under a uniform prior.

    Saerens et al. (2002): π ← mean_i normalise(π ⊙ p_i), iterated. The result is floored at
    ``floor/K`` per class (and renormalised) so no class is ever given up entirely.
    """
    k = probs.shape[1]
    prior = torch.full((k,), 1.0 / k)
    for _ in range(iters):
        w = probs * prior
        prior = (w / w.sum(-1, keepdim=True).clamp_min(1e-12)).mean(0)
    prior = prior.clamp_min(floor / k)
    return prior / prior.sum()


def entropy(p: torch.Tensor) -> float:
    p = p[p > 0]
    return max(0.0, float(-(p * p.log()).sum()))


def prediction_stats(pred: torch.Tensor, k: int) -> tuple[torch.Tensor, float, float]:
    """(per-class counts, entropy of the predicted-class histogram, largest class share)."""
    counts = torch.bincount(pred, minlength=k)
    share = counts.float() / max(1, len(pred))
    return counts, entropy(share), float(share.max()) if len(pred) else 0.0


def snapshot(
    probe: Probe,
    student_probs: torch.Tensor,
    teacher_probs: torch.Tensor,
    *,
    class_names: Sequence[str],
    conf_threshold: float,
    prior_entropy: float,
    step: int,
) -> dict[str, Any]:
    """One health entry (see the module docstring for each field)."""
    k = len(class_names)
    pred = student_probs.argmax(-1)
    counts, h, top = prediction_stats(pred, k)
    _, zs_h, _ = prediction_stats(probe.zero_shot_pred, k)
    return {
        "step": step,
        "num_images": len(pred),
        "pred_entropy": round(h, 4),
        "entropy_ratio": round(h / prior_entropy, 4) if prior_entropy > 0 else 1.0,
        "zero_shot_pred_entropy": round(zs_h, 4),
        "zero_shot_entropy_ratio": round(zs_h / prior_entropy, 4) if prior_entropy > 0 else 1.0,
        "max_class_share": round(top, 4),
        "confident_ratio": round(
            float((teacher_probs.max(-1).values > conf_threshold).float().mean()), 4
        ),
        "agree_zero_shot": round(float((pred == probe.zero_shot_pred).float().mean()), 4),
        "agree_teacher": round(float((pred == teacher_probs.argmax(-1)).float().mean()), 4),
        "class_counts": {
            name: int(c) for name, c in zip(class_names, counts.tolist(), strict=True)
        },
    }


def _warning(kind: str, message: str) -> dict[str, str]:
    return {"code": kind, "message": message}


def health_warnings(
    entry: dict[str, Any], num_classes: int, which: str = "student"
) -> list[dict[str, str]]:
    """The documented collapse/degradation rule applied to one health entry (empty: healthy)."""
    k = num_classes
    out = []
    ratio, top = float(entry["entropy_ratio"]), float(entry["max_class_share"])
    top_limit = max(0.5, 2.0 / k)
    if ratio < COLLAPSE_ENTROPY_RATIO or (k >= 3 and top > top_limit):
        out.append(
            _warning(
                COLLAPSED,
                (
                    f"the {which}'s predictions on the unlabeled images concentrate on few classes "
                    f"(entropy {ratio:.0%} of the prior's, largest class {top:.0%} of predictions); "
                    "the adapted model is likely worse than zero-shot"
                ),
            )
        )
    drop = float(entry["zero_shot_pred_entropy"]) - float(entry["pred_entropy"])
    if not out and drop > DEGRADED_ENTROPY_DROP * math.log(k):
        out.append(
            _warning(
                DEGRADED,
                (
                    f"the {which}'s predictions are markedly less spread over the classes than "
                    f"zero-shot's (entropy {entry['pred_entropy']:.2f} vs {entry['zero_shot_pred_entropy']:.2f} "
                    "nats): a few classes took over"
                ),
            )
        )
    agree = float(entry.get("agree_teacher", 1.0))
    if which == "student" and agree < DIVERGED_AGREE_TEACHER:
        out.append(
            _warning(
                DIVERGED,
                (
                    f"the student predicts what its EMA teacher predicts on only {agree:.0%} of the "
                    "unlabeled images: it does not follow the pseudo-labels it is trained on, and is "
                    "likely worse than the teacher"
                ),
            )
        )
    return out
