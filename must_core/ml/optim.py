"""AdamW with layer-wise lr decay and the 1-D no-decay rule; per-iteration cosine schedule (spec §5)."""

from __future__ import annotations

import math
import re
from typing import Any

import torch
from torch import nn

_RESBLOCK = re.compile(r"resblocks\.(\d+)\.")


def layer_id(name: str, num_layers: int) -> int:
    """0 for embeddings/conv1/ln_pre (and the mask token), block i → i+1, everything else L+1."""
    if "embedding" in name or "conv1" in name or "ln_pre" in name:
        return 0
    m = _RESBLOCK.search(name)
    if m:
        return int(m.group(1)) + 1
    return num_layers + 1


def param_groups(
    model: nn.Module, num_layers: int, weight_decay: float, layer_decay: float
) -> list[dict[str, Any]]:
    """Groups keyed by (layer id, decay/no-decay). Exactly the 1-D parameters get no weight decay."""
    groups: dict[tuple[int, bool], dict[str, Any]] = {}
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        lid = layer_id(name, num_layers)
        no_decay = p.ndim == 1
        key = (lid, no_decay)
        if key not in groups:
            groups[key] = {
                "params": [],
                "names": [],
                "weight_decay": 0.0 if no_decay else weight_decay,
                "lr_scale": layer_decay ** (num_layers + 1 - lid),
                "layer_id": lid,
            }
        groups[key]["params"].append(p)
        groups[key]["names"].append(name)
    return [groups[k] for k in sorted(groups)]


def build_optimizer(
    model: nn.Module,
    num_layers: int,
    *,
    weight_decay: float,
    layer_decay: float,
    betas: tuple[float, float],
    eps: float,
    fused: bool = False,
) -> torch.optim.AdamW:
    groups = param_groups(model, num_layers, weight_decay, layer_decay)
    for g in groups:
        g["lr"] = 0.0  # set every step from the schedule
    kwargs: dict[str, Any] = {"betas": betas, "eps": eps}
    if fused:
        kwargs["fused"] = True
    return torch.optim.AdamW(groups, **kwargs)


def cosine_lr(step: int, total: int, base: float, final: float) -> float:
    """sched[i] = final + ½(base − final)(1 + cos(π·i/T)), i in [0, T) (no warm-up)."""
    if total <= 0:
        return base
    i = min(max(step, 0), total - 1)
    return final + 0.5 * (base - final) * (1.0 + math.cos(math.pi * i / total))


def scaled_lrs(lr_per_256: float, min_lr_per_256: float, batch_size: int) -> tuple[float, float]:
    """The reference scales both by the global batch / 256."""
    return lr_per_256 * batch_size / 256.0, min_lr_per_256 * batch_size / 256.0


def set_lr(optimizer: torch.optim.Optimizer, lr: float) -> None:
    for g in optimizer.param_groups:
        g["lr"] = lr * g["lr_scale"]
