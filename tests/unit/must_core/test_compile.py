"""torch.compile'd student and teacher forwards give the eager step's losses and gradients; a forward
that cannot compile falls back to eager instead of failing the run."""

from __future__ import annotations

import contextlib
from typing import Any

import pytest
import torch

from must_core.ml.config import batch_layout
from must_core.ml.distributed import DistContext
from must_core.ml.ema import make_teacher
from must_core.ml.losses import LossWeights
from must_core.ml.masking import MaskGenerator
from must_core.ml.model import build_must_model, default_mask_patch_size, load_base_model
from must_core.ml.step import CompiledOrEager, GlobalStep


def _step(model: Any, teacher: Any, compiled: bool) -> GlobalStep:
    extra = (
        {"student_forward": CompiledOrEager(model), "teacher_forward": CompiledOrEager(teacher)}
        if compiled
        else {}
    )
    return GlobalStep(
        student=model,
        model=model,
        teacher=teacher,
        layout=batch_layout(8, 1, None),
        dist=DistContext(),
        conf_threshold=0.3,
        weights=LossWeights(fair=4.0, mim=1.0, align=0.2),
        moving_average_fairness=False,
        autocast=contextlib.nullcontext,
        **extra,
    )


def test_compiled_step_matches_eager(tiny_spec: Any) -> None:
    torch.manual_seed(0)
    model = build_must_model(load_base_model(tiny_spec), ["red", "green", "blue"], ["a {}."])
    teacher = make_teacher(model)
    g = torch.Generator().manual_seed(1)
    size, p = model.image_size, model.patch_size
    gen = MaskGenerator(size, default_mask_patch_size(size, p), p, 0.3)
    rng = __import__("numpy").random.default_rng(0)
    mask = torch.stack([torch.from_numpy(gen(rng)) for _ in range(8)])
    batch = [
        (
            torch.randn(8, 3, size, size, generator=g),
            torch.randn(8, 3, size, size, generator=g),
            mask,
        )
    ]
    results = {}
    for compiled in (False, True):
        model.zero_grad(set_to_none=True)
        shares, _ = _step(model, teacher, compiled)(batch, None)
        grads = {n: q.grad.clone() for n, q in model.named_parameters() if q.grad is not None}
        results[compiled] = (shares, grads)
    (eager, g_eager), (comp, g_comp) = results[False], results[True]
    assert torch.allclose(eager, comp, rtol=1e-5, atol=1e-5), (eager, comp)
    assert g_eager.keys() == g_comp.keys()
    for name, grad in g_eager.items():
        err = (grad - g_comp[name]).abs().max() / grad.abs().max().clamp_min(1e-12)
        assert err < 1e-4, (name, float(err))


def test_a_forward_that_cannot_compile_runs_eager(monkeypatch: pytest.MonkeyPatch) -> None:
    lin = torch.nn.Linear(3, 2)
    wrapped = CompiledOrEager(lin)

    def broken(*_: Any) -> Any:
        raise RuntimeError("backend compiler failed")

    wrapped.compiled = broken
    x = torch.randn(4, 3)
    assert torch.equal(wrapped(x), lin(x))
    assert wrapped.compiled is None  # fell back for good
