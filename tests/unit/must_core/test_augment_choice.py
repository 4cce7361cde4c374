"""The label-free flip rule: off when a mirror changes the zero-shot prediction, on otherwise."""

from __future__ import annotations

import contextlib

import torch

from must_core.ml.augment import choose_hflip, shifted
from must_core.ml.health import Probe


class _SideClassifier(torch.nn.Module):
    """Class 0 when the left half is brighter, else 1: a mirror changes the class."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w = x.shape[-1]
        d = x[..., : w // 2].mean((1, 2, 3)) - x[..., w // 2 :].mean((1, 2, 3))
        return torch.stack([10 * d, -10 * d], -1)


class _BrightnessClassifier(torch.nn.Module):
    """Class 0 for bright images, else 1: mirror-invariant."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        m = x.mean((1, 2, 3))
        return torch.stack([10 * m, -10 * m], -1)


def _probe(model: torch.nn.Module) -> Probe:
    g = torch.Generator().manual_seed(0)
    x = torch.rand(64, 3, 16, 16, generator=g)
    x[:32, ..., :8] += 1.0  # bright on the left
    x[32:, ..., 8:] += 1.0  # bright on the right
    x[::3] += 0.5  # some brighter overall
    with torch.no_grad():
        probs = model(x).softmax(-1)
    return Probe(x=x, zero_shot_probs=probs, images=[])


def test_flip_is_turned_off_when_it_changes_the_class() -> None:
    model = _SideClassifier()
    out = choose_hflip(_probe(model), model, torch.device("cpu"), 16, contextlib.nullcontext)
    assert out["hflip"] == 0.0
    assert out["flip_agreement"] < 0.2 and out["shift_agreement"] > 0.9


def test_flip_is_kept_when_it_does_not() -> None:
    model = _BrightnessClassifier()
    out = choose_hflip(_probe(model), model, torch.device("cpu"), 16, contextlib.nullcontext)
    assert out["hflip"] == 0.5 and out["flip_agreement"] == 1.0


def test_shift_repeats_the_edge() -> None:
    x = torch.arange(16.0).view(1, 1, 1, 16)
    y = shifted(x)
    assert y.shape == x.shape and y[..., 0] == 0 and y[..., 1] == 0 and y[..., -1] == 14
