"""One MUST optimizer step over a global batch that may span DDP ranks and accumulated micro-batches.

The reference computes its fairness marginal and its confident-sample mean over the whole global batch
(1024 images on 16 GPUs). Here the global batch is ``world_size × accum_steps × micro_batch`` and every
term is taken over all of it, exactly:

- confident count C: teacher passes over every micro-batch first, then one all-reduce of a scalar;
- fairness: the marginal p̄ over the global batch is an all-reduced K-vector. With one micro-batch per
  rank it comes from the training forward itself; with accumulation a no-grad student pre-pass over the
  rank's micro-batches gives it first (the student is deterministic, so the values match). Each
  micro-batch then backpropagates f(p̄_sur) with ``p̄_sur = sg(p̄) + (p̄_m − sg(p̄_m)) / M``: its value is
  f(p̄) and, once DDP averages gradients over ranks and accumulation sums them over micro-batches, the
  gradient is exactly ∇f(p̄)·∂p̄/∂θ (gathering the B×K probabilities is not needed);
- MIM and alignment are means over equally many masked tokens per image, so the global mean is the
  mean of the micro-batch means.

With one process and one micro-batch this reduces to :func:`must_step_losses`, term for term.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from must_core.ml.config import BatchLayout
from must_core.ml.distributed import DistContext
from must_core.ml.losses import (
    LossWeights,
    align_loss,
    fairness_moving_average,
    fairness_prior,
    mim_loss,
    running_marginal,
    self_training_loss,
    total_loss,
)
from must_core.ml.model import MaskedOutput, MustModel

_logger = logging.getLogger(__name__)

LOSS_KEYS = ("loss", "st", "fair", "mim", "align", "conf_ratio")
MicroBatch = tuple[torch.Tensor, torch.Tensor, torch.Tensor]  # (weak, strong, mask)


def must_step_losses(
    student: MustModel,
    teacher: nn.Module,
    weak: torch.Tensor,
    strong: torch.Tensor,
    mask: torch.Tensor,
    *,
    conf_threshold: float,
    weights: LossWeights,
    moving_average_fairness: bool,
    fair_state: torch.Tensor | None,
    running_keep: float | None = None,
    prior: torch.Tensor | None = None,
) -> tuple[torch.Tensor, dict[str, torch.Tensor], torch.Tensor | None]:
    """One MUST objective evaluation on one batch (spec §0, §3). Returns (loss, parts, fair state).

    The plain single-batch form: the reference for tests and the step-cost benchmark. Training uses
    :class:`GlobalStep`, which equals this for one process and one micro-batch. ``running_keep``
    (not None) selects the running marginal (see :func:`fair_marginal_input`).
    """
    pseudo, confident = teacher_pass(teacher, weak, conf_threshold)
    out = student(strong, mask)
    assert isinstance(out, MaskedOutput)
    l_st = self_training_loss(out.logits, pseudo, confident)
    p_mean = out.logits.float().softmax(-1).mean(0)
    if running_keep is not None:
        fair_state = running_marginal(p_mean, fair_state, running_keep)
        l_fair = fairness_prior(fair_state + (p_mean - p_mean.detach()), prior)
    elif moving_average_fairness:
        l_fair, fair_state = fairness_moving_average(p_mean, fair_state)
    else:
        l_fair = fairness_prior(p_mean, prior)
    l_mim = mim_loss(out.recon, strong, out.mask_pix)
    l_align = align_loss(out.align, out.token_mask)
    loss = total_loss(l_st, l_fair, l_mim, l_align, weights)
    parts = {
        "loss": loss.detach(),
        "st": l_st.detach(),
        "fair": l_fair.detach(),
        "mim": l_mim.detach(),
        "align": l_align.detach(),
        "conf_ratio": confident.float().mean(),
    }
    return loss, parts, fair_state


def teacher_probs(
    teacher: Callable[[torch.Tensor], torch.Tensor], weak: torch.Tensor
) -> torch.Tensor:
    """The teacher's class probabilities on the unmasked weak view (fp32, no host sync)."""
    with torch.inference_mode():
        probs = teacher(weak).float().softmax(-1)
    return probs.clone()  # a plain tensor outside inference mode


def teacher_pass(
    teacher: Callable[[torch.Tensor], torch.Tensor], weak: torch.Tensor, conf_threshold: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """Pseudo-labels and the confident set from the unmasked weak view (no host sync)."""
    conf, pseudo = teacher_probs(teacher, weak).max(-1)
    return pseudo, conf > conf_threshold  # strict '>' (spec §3.1)


@dataclass
class AdaptiveThreshold:
    """A self-adaptive, per-class confidence threshold (FreeMatch's SAT, Wang et al. ICLR 2023).

    ``state`` is [τ, p̃_1 … p̃_K]: τ an exponential moving average of the teacher's mean max-probability
    over global batches, p̃ one of its mean class probabilities, both started at 1/K. A sample whose
    pseudo-label is c counts as confident when its max-probability exceeds τ · p̃_c / max_k p̃_k: the
    threshold starts low and rises as the teacher grows confident, and it is lower for the classes the
    teacher rarely predicts, which a fixed threshold starves of pseudo-labels. Label-free.
    """

    momentum: float
    state: torch.Tensor  # [K + 1]

    @classmethod
    def start(cls, num_classes: int, momentum: float, device: torch.device) -> AdaptiveThreshold:
        return cls(momentum, torch.full((num_classes + 1,), 1.0 / num_classes, device=device))

    def update(self, probs: Sequence[torch.Tensor], dist: DistContext) -> torch.Tensor:
        """Fold the global batch's statistics in; returns the per-class thresholds [K]."""
        p = torch.cat(list(probs))
        stats = torch.cat([p.max(-1).values.sum().view(1), p.sum(0), p.new_tensor([len(p)])])
        stats = dist.all_reduce_sum(stats)
        batch = stats[:-1] / stats[-1].clamp_min(1.0)
        self.state = self.momentum * self.state + (1.0 - self.momentum) * batch
        tau, class_mean = self.state[0], self.state[1:]
        return tau * class_mean / class_mean.max()


@dataclass
class GlobalStep:
    """Forward + backward of one global batch; the caller steps the optimizer and the EMA.

    ``student`` is what the forward goes through (the DDP wrapper under torchrun, else the model);
    ``model`` is the bare module (for the no-grad pre-pass).
    """

    student: nn.Module
    model: MustModel
    teacher: nn.Module
    layout: BatchLayout
    dist: DistContext
    conf_threshold: float
    weights: LossWeights
    moving_average_fairness: bool
    autocast: Callable[[], contextlib.AbstractContextManager[Any]]
    # The forward calls (torch.compile'd where enabled); default: the modules themselves.
    student_forward: Callable[..., Any] | None = None
    teacher_forward: Callable[..., Any] | None = None
    # Running marginal (``fair_marginal="running"``): its decay per step; None: the reference's terms.
    running_keep: float | None = None
    prior: torch.Tensor | None = None  # fairness target prior; None: uniform
    threshold: AdaptiveThreshold | None = None  # None: the fixed conf_threshold

    def __call__(
        self, micro: Sequence[MicroBatch], fair_state: torch.Tensor | None
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Returns (this rank's share of the logged parts, in LOSS_KEYS order, and the fairness state).

        Summing the shares over ranks gives the global-batch values.
        """
        m_steps = len(micro)
        labels = self._pseudo_labels(micro)
        count = torch.stack([c.sum() for _, c in labels]).sum().float()
        confident_total = self.dist.all_reduce_sum(count).clamp_min(1.0)
        p_global = self._marginal_prepass(micro) if m_steps > 1 else None
        shares = []
        new_state = fair_state
        running: torch.Tensor | None = None
        for i, ((_, strong, mask), (pseudo, confident)) in enumerate(
            zip(micro, labels, strict=True)
        ):
            sync = i == m_steps - 1
            with self._no_sync(not sync), self.autocast():
                out = (self.student_forward or self.student)(strong, mask)
                assert isinstance(out, MaskedOutput)
                ce = F.cross_entropy(out.logits.float(), pseudo, reduction="none")
                st_sum = (ce * confident.to(ce.dtype)).sum()
                p_m = out.logits.float().softmax(-1).mean(0)
                if p_global is None:  # one micro-batch per rank: the marginal of this forward
                    p_global = self.dist.all_reduce_sum(p_m.detach().clone()) / self.dist.world_size
                if self.running_keep is not None:
                    if running is None:  # the global batch joins the running marginal once
                        running = running_marginal(p_global, fair_state, self.running_keep)
                        new_state = running
                    # value: the running marginal; gradient: this micro-batch's share of p̄
                    l_fair = fairness_prior(running + (p_m - p_m.detach()) / m_steps, self.prior)
                elif self.moving_average_fairness:
                    p_sur = p_global + (p_m - p_m.detach()) / m_steps
                    l_fair, state_i = fairness_moving_average(p_sur, fair_state)
                    new_state = state_i if i == 0 else new_state
                else:
                    l_fair = fairness_prior(p_global + (p_m - p_m.detach()) / m_steps, self.prior)
                l_mim = mim_loss(out.recon, strong, out.mask_pix)
                l_align = align_loss(out.align, out.token_mask)
                w = self.weights
                loss = (
                    st_sum * self.dist.world_size / confident_total
                    + w.fair * l_fair
                    + (w.mim * l_mim + w.align * l_align) / m_steps
                )
            loss.backward()  # type: ignore[no-untyped-call]
            shares.append(self._share(st_sum, l_fair, l_mim, l_align, confident, confident_total))
        return torch.stack(shares).sum(0), new_state

    def _pseudo_labels(
        self, micro: Sequence[MicroBatch]
    ) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """(pseudo-labels, confident) per micro-batch, under the fixed or the adaptive threshold."""
        with self.autocast():
            teacher = self.teacher_forward or self.teacher
            probs = [teacher_probs(teacher, w) for w, _, _ in micro]
        per_class = None if self.threshold is None else self.threshold.update(probs, self.dist)
        out = []
        for p in probs:
            conf, pseudo = p.max(-1)
            cut = self.conf_threshold if per_class is None else per_class[pseudo]
            out.append((pseudo, conf > cut))  # strict '>' (spec §3.1)
        return out

    def _marginal_prepass(self, micro: Sequence[MicroBatch]) -> torch.Tensor:
        """p̄ over the global batch before any gradient pass (needed with accumulation only)."""
        with torch.no_grad(), self.autocast():
            total = torch.zeros(self.model.num_classes, device=micro[0][1].device)
            for _, strong, mask in micro:
                out = self.model(strong, mask)
                assert isinstance(out, MaskedOutput)
                total += out.logits.float().softmax(-1).mean(0)
        return self.dist.all_reduce_sum(total) / (self.dist.world_size * len(micro))

    def _share(
        self,
        st_sum: torch.Tensor,
        l_fair: torch.Tensor,
        l_mim: torch.Tensor,
        l_align: torch.Tensor,
        confident: torch.Tensor,
        confident_total: torch.Tensor,
    ) -> torch.Tensor:
        parts = self.layout.world_size * self.layout.accum_steps
        st = st_sum.detach() / confident_total
        fair = l_fair.detach() / parts
        mim = l_mim.detach() / parts
        align = l_align.detach() / parts
        loss = total_loss(st, fair, mim, align, self.weights)
        conf = confident.float().sum() / self.layout.global_batch
        return torch.stack([loss, st, fair, mim, align, conf])

    def _no_sync(self, skip: bool) -> contextlib.AbstractContextManager[Any]:
        no_sync = getattr(self.student, "no_sync", None)
        return no_sync() if skip and no_sync is not None else contextlib.nullcontext()


class CompiledOrEager:
    """A ``torch.compile``'d forward that falls back to the eager module for good if compiling fails.

    Compilation happens at the first call (and again for new shapes); a backend that cannot compile
    here (no compiler, an unsupported op) must cost a warning, not the job.
    """

    def __init__(self, module: nn.Module) -> None:
        self.module = module
        self.compiled: Callable[..., Any] | None = torch.compile(module)

    def __call__(self, *args: Any) -> Any:
        if self.compiled is not None:
            try:
                return self.compiled(*args)
            except Exception as exc:  # compile errors surface at the call; fall back, once
                _logger.warning("torch.compile failed (%s); running eager", type(exc).__name__)
                self.compiled = None
        return self.module(*args)
