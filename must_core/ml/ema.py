"""EMA teacher (spec §4): a frozen copy of the student, updated with fused foreach lerps."""

from __future__ import annotations

import copy

import torch
from torch import nn


def make_teacher(student: nn.Module) -> nn.Module:
    """Deep copy in eval mode with requires_grad False: bitwise equal to the student at creation."""
    teacher = copy.deepcopy(student)
    teacher.eval()
    for p in teacher.parameters():
        p.requires_grad_(False)
    return teacher


def ema_decay(step: int, d_init: float, d_final: float, warm_steps: int) -> float:
    """d(it) = d_init + (d_final − d_init)·min(1, it/warm) (linear ramp in iterations)."""
    if warm_steps <= 0:
        return d_final
    return d_init + (d_final - d_init) * min(1.0, step / warm_steps)


class EmaUpdater:
    """θ_T ← d·θ_T + (1−d)·θ_S for every floating state entry (params and buffers).

    The tensor lists are built once; each update is one ``torch._foreach_lerp_`` call family, with no
    state-dict rebuild and no host sync (spec §10 perf 5).
    """

    def __init__(self, teacher: nn.Module, student: nn.Module) -> None:
        t_state = teacher.state_dict(keep_vars=True)
        s_state = student.state_dict(keep_vars=True)
        if t_state.keys() != s_state.keys():
            raise ValueError("teacher and student have different state keys")
        self.t_float: list[torch.Tensor] = []
        self.s_float: list[torch.Tensor] = []
        self.t_other: list[torch.Tensor] = []
        self.s_other: list[torch.Tensor] = []
        for k, t in t_state.items():
            s = s_state[k]
            if t.is_floating_point():
                self.t_float.append(t.data)
                self.s_float.append(s.data)
            else:
                self.t_other.append(t.data)
                self.s_other.append(s.data)

    @torch.no_grad()
    def update(self, decay: float) -> None:
        if self.t_float:
            torch._foreach_lerp_(self.t_float, self.s_float, 1.0 - decay)
        for t, s in zip(self.t_other, self.s_other, strict=True):
            t.copy_(s)
