"""The label-free augmentation rules: a flip or a geometric op is off when it changes the zero-shot
prediction much more than a small shift does, on otherwise."""

from __future__ import annotations

import contextlib

import torch

from must_core.ml.augment import choose_augmentation, shifted, translated
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


class _QuadrantClassifier(torch.nn.Module):
    """The brightest quadrant's index: moving the image by 40 % of its size changes the class."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h, w = x.shape[-2] // 2, x.shape[-1] // 2
        q = [
            x[..., i * h : (i + 1) * h, j * w : (j + 1) * w].mean((1, 2, 3))
            for i in (0, 1)
            for j in (0, 1)
        ]
        return 10 * torch.stack(q, -1)


def _probe(model: torch.nn.Module, quadrants: bool = False) -> Probe:
    g = torch.Generator().manual_seed(0)
    x = torch.rand(64, 3, 16, 16, generator=g)
    if (
        quadrants
    ):  # one bright 6 px square in the middle of a quadrant, a quarter of the images each
        for i in range(64):
            r, c = divmod(i % 4, 2)
            x[i, :, 1 + 8 * r : 7 + 8 * r, 1 + 8 * c : 7 + 8 * c] += 1.0
    else:
        x[:32, ..., :8] += 1.0  # bright on the left
        x[32:, ..., 8:] += 1.0  # bright on the right
    x[::3] += 0.5  # some brighter overall
    with torch.no_grad():
        probs = model(x).softmax(-1)
    return Probe(x=x, zero_shot_probs=probs, images=[])


def _choose(model: torch.nn.Module, quadrants: bool = False) -> dict[str, object]:
    probe = _probe(model, quadrants)
    return choose_augmentation(probe, model, torch.device("cpu"), 16, contextlib.nullcontext)


def test_flip_is_turned_off_when_it_changes_the_class() -> None:
    out = _choose(_SideClassifier())
    assert out["hflip"] == 0.0
    assert out["flip_agreement"] < 0.2 and out["shift_agreement"] > 0.9  # type: ignore[operator]


def test_flip_and_geometric_ops_are_kept_when_they_do_not() -> None:
    out = _choose(_BrightnessClassifier())
    assert out["hflip"] == 0.5 and out["flip_agreement"] == 1.0
    assert out["geometric"] is True and out["translate_agreement"] == 1.0


def test_geometric_ops_are_turned_off_when_moving_the_image_changes_the_class() -> None:
    out = _choose(_QuadrantClassifier(), quadrants=True)
    assert out["shift_agreement"] == 1.0 and out["translate_agreement"] < 0.5  # type: ignore[operator]
    assert out["geometric"] is False and out["hflip"] == 0.0  # a mirror swaps the quadrants too


def test_translation_moves_half_along_x_and_half_along_y_and_fills_with_zero() -> None:
    x = torch.ones(4, 1, 10, 10)
    y = translated(x, 0.3)
    assert (y[0, 0, :, :3] == 0).all() and (y[0, 0, :, 3:] == 1).all()  # +x
    assert (y[1, 0, :, 7:] == 0).all() and (y[1, 0, :, :7] == 1).all()  # -x
    assert (y[2, 0, :3] == 0).all() and (y[2, 0, 3:] == 1).all()  # +y
    assert (y[3, 0, 7:] == 0).all() and (y[3, 0, :7] == 1).all()  # -y


def test_shift_repeats_the_edge() -> None:
    x = torch.arange(16.0).view(1, 1, 1, 16)
    y = shifted(x)
    assert y.shape == x.shape and y[..., 0] == 0 and y[..., 1] == 0 and y[..., -1] == 14


def test_explicit_settings_skip_the_rules() -> None:
    from must_core.ml.config import make_config
    from must_core.ml.train import _choose_augmentation

    cpu = torch.device("cpu")
    both = make_config(strong_hflip=0, randaug_geometric=False)
    out = _choose_augmentation(both, _SideClassifier(), None, cpu, None)  # type: ignore[arg-type]
    assert (out["hflip"], out["geometric"], out["chosen_by"]) == (0.0, False, "config")
    model = _QuadrantClassifier()
    one = make_config(strong_hflip=0.5)  # the flip pinned, the geometric ops chosen by the rule
    out = _choose_augmentation(one, model, _probe(model, quadrants=True), cpu, None)  # type: ignore[arg-type]
    assert out["hflip"] == 0.5 and out["geometric"] is False
    assert out["chosen_by"] == "zero-shot agreement on the unlabeled data (hflip from config)"
