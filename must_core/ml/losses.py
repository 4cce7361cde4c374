"""The four MUST losses (spec §3), written with static shapes and no host syncs."""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F


def self_training_loss(
    logits: torch.Tensor, pseudo_labels: torch.Tensor, confident: torch.Tensor
) -> torch.Tensor:
    """Mean CE over confident samples only; 0 (with zero gradient) when none is confident (§10.1)."""
    ce = F.cross_entropy(logits.float(), pseudo_labels, reduction="none")
    w = confident.to(ce.dtype)
    return (ce * w).sum() / w.sum().clamp_min(1.0)


def fairness_batch(probs_mean: torch.Tensor) -> torch.Tensor:
    """Variant A: -(1/K) Σ_k log b_k (minimum log K at a uniform mean prediction)."""
    return -torch.log(probs_mean).mean()


def fairness_prior(probs_mean: torch.Tensor, prior: torch.Tensor | None) -> torch.Tensor:
    """-Σ_k π_k log b_k: Variant A for a uniform prior π (None); its minimum over b is at b = π."""
    if prior is None:
        return fairness_batch(probs_mean)
    return -(prior.to(probs_mean.dtype) * torch.log(probs_mean)).sum()


def running_marginal(
    batch_marginal: torch.Tensor, state: torch.Tensor | None, keep: float
) -> torch.Tensor:
    """Detached running class marginal: keep·state + (1 − keep)·sg(b) (b itself at the first step).

    ``keep = 1 − N_batch/N_samples`` makes it a mean over about N_samples recent samples.
    """
    b = batch_marginal.detach()
    return b if state is None else keep * state.detach() + (1.0 - keep) * b


def running_keep(global_batch: int, samples: int) -> float:
    """The running marginal's decay for a global batch: 0 (the batch alone) once it covers samples."""
    return max(0.0, 1.0 - global_batch / samples)


def fairness_moving_average(
    probs_mean: torch.Tensor, previous: torch.Tensor | None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Variant B (K >= 512): p̄ = b at an epoch's first step, else 0.5·(sg(p̄_prev) + b); loss /0.5.

    Kept for parity with the reference, quirks included (spec §10.9). Returns (loss, new state).
    """
    pbar = probs_mean if previous is None else 0.5 * (previous.detach() + probs_mean)
    return -torch.log(pbar).mean() / 0.5, pbar.detach()


def mim_loss(recon: torch.Tensor, target: torch.Tensor, mask_pix: torch.Tensor) -> torch.Tensor:
    """L1 over masked pixels: Σ|recon − x|·M / (3·ΣM); 0 for an empty mask (§10.2)."""
    diff = (recon.float() - target.float()).abs() * mask_pix.float()
    return diff.sum() / (3.0 * mask_pix.float().sum()).clamp_min(1.0)


def align_loss(align: torch.Tensor, token_mask: torch.Tensor) -> torch.Tensor:
    """Mean of ||z_i − z_cls||² over masked tokens; 0 for an empty mask (§10.2)."""
    w = token_mask.to(align.dtype)
    return ((align * w).sum() / w.sum().clamp_min(1.0)).float()


@dataclass
class LossWeights:
    fair: float
    mim: float
    align: float


def total_loss(
    st: torch.Tensor, fair: torch.Tensor, mim: torch.Tensor, align: torch.Tensor, w: LossWeights
) -> torch.Tensor:
    """L = L_st + w_fair·L_fair + w_mim·L_mim + w_align·L_align (spec §3.5; w_mim = 1 by default)."""
    return st + w.fair * fair + w.mim * mim + w.align * align
