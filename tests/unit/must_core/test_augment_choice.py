"""The label-free augmentation rules: a flip or a geometric op is off when it changes the zero-shot
prediction much more than a small shift does, on otherwise."""

from __future__ import annotations

import contextlib
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

from must_core.ml.augment import (
    DETAIL_RATIO,
    LOW_DETAIL_MAGNITUDE,
    MAGNITUDE_RATIO,
    ViewAgreement,
    choose_augmentation,
    choose_recipe,
    choose_strength,
    fine_detail,
    shifted,
    translated,
)
from must_core.ml.health import Probe
from must_core.ml.model import Preprocess


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

    cpu = torch.device("cpu")
    both = make_config(strong_hflip=0, randaug_geometric=False, strong_strength="config")
    out = choose_recipe(both, _SideClassifier(), None, cpu, contextlib.nullcontext, _PP)
    assert (out["hflip"], out["geometric"], out["chosen_by"]) == (0.0, False, "config")
    model = _QuadrantClassifier()
    # the flip and the strength pinned, the geometric ops chosen by the rule
    one = make_config(strong_hflip=0.5, strong_strength="config")
    probe = _probe(model, quadrants=True)
    out = choose_recipe(one, model, probe, cpu, contextlib.nullcontext, _PP)
    assert out["hflip"] == 0.5 and out["geometric"] is False
    assert out["chosen_by"] == (
        "zero-shot agreement on the unlabeled data (hflip, strength from config)"
    )
    assert out["randaug_magnitude"] == 9.0 and "randaug_agreement" not in out
    assert "fine_detail" not in out  # the strength rules did not run


# ---- the strength of the student view: crop scale and RandAugment magnitude -----------------------
_PP = Preprocess(image_size=32, mean=(0.0, 0.0, 0.0), std=(1.0, 1.0, 1.0))


_LEVELS = (0.15, 0.25, 0.35, 0.45, 0.55, 0.65, 0.75, 0.85)


class _LevelClassifier(torch.nn.Module):
    """Eight grey levels by the mean intensity: brightness, contrast, solarize or invert change the
    class, a crop does not."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        m = x.mean((1, 2, 3)).view(-1, 1)
        return -40 * (m - torch.tensor(_LEVELS)).abs()


class _CornerClassifier(torch.nn.Module):
    """Which corner holds the bright dot (none: class 4): a tight crop cuts the dot out or moves it."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        s = x.shape[-1] // 4
        corners = [x[..., :s, :s], x[..., :s, -s:], x[..., -s:, :s], x[..., -s:, -s:]]
        q = torch.stack([c.mean((1, 2, 3)) for c in corners], -1)
        return torch.cat([40 * q, torch.full_like(q[:, :1], 40 * 0.3)], -1)


def _image_probe(model: torch.nn.Module, images: list[Image.Image]) -> Probe:
    x = torch.stack([torch.from_numpy(np.array(i)).permute(2, 0, 1).float() / 255 for i in images])
    with torch.no_grad():
        probs = model(x).softmax(-1)
    return Probe(x=x, zero_shot_probs=probs, images=images)


def _strength(model: torch.nn.Module, images: list[Image.Image], **kw: Any) -> dict[str, Any]:
    probe = _image_probe(model, images)
    cpu = torch.device("cpu")
    agree = ViewAgreement(probe, model, cpu, 16, contextlib.nullcontext, _PP)
    shift = choose_augmentation(probe, model, cpu, 16, contextlib.nullcontext)["shift_agreement"]
    args = {"crop_scale": (0.8, 1.0), "num_ops": 2, "magnitude": 9.0, "magnitude_std": 0.5}
    return choose_strength(agree, shift, **{**args, "geometric": False, **kw})


def _grey_images() -> list[Image.Image]:
    rng = np.random.default_rng(0)
    levels = _LEVELS * 6
    return [
        Image.fromarray(
            np.clip(255 * (v + rng.normal(0, 0.03, (32, 32, 3))), 0, 255).astype("uint8")
        )
        for v in levels
    ]


def test_randaugment_is_weakened_when_it_erases_what_the_classes_differ_in() -> None:
    out = _strength(_LevelClassifier(), _grey_images())
    assert out["crop_agreement"] == 1.0 and out["crop_scale"] == [0.8, 1.0]  # crops are harmless
    assert out["randaug_magnitude"] < 9.0  # brightness/contrast at m9 move most images' level
    assert out["randaug_agreement"] >= MAGNITUDE_RATIO * out["crop_agreement"]


def test_the_configured_strength_is_kept_when_no_view_changes_the_prediction() -> None:
    class _Constant(torch.nn.Module):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return torch.tensor([[1.0, 0.0]]).repeat(len(x), 1)

    out = _strength(_Constant(), _grey_images(), crop_scale=(0.3, 1.0))
    assert out == {
        "crop_scale": [0.3, 1.0],
        "randaug_num_ops": 2,
        "randaug_magnitude": 9.0,
        "crop_agreement": 1.0,
        "randaug_agreement": 1.0,
    }


def _shape_images(source_px: int, n: int = 16) -> list[Image.Image]:
    """Sharp-edged discs and squares drawn at ``source_px`` and enlarged to 64 px (bicubic)."""
    rng = np.random.default_rng(1)
    out = []
    for i in range(n):
        a = np.full((source_px, source_px, 3), 40, np.uint8)
        yy, xx = np.mgrid[:source_px, :source_px] / source_px
        cx, cy, r = rng.uniform(0.3, 0.7), rng.uniform(0.3, 0.7), rng.uniform(0.1, 0.25)
        inside = (
            (xx - cx) ** 2 + (yy - cy) ** 2 < r**2 if i % 2 else abs(xx - cx) + abs(yy - cy) < r
        )
        a[inside] = rng.integers(120, 255, 3)
        out.append(Image.fromarray(a).resize((64, 64), Image.Resampling.BICUBIC))
    return out


def _tensor(images: list[Image.Image]) -> torch.Tensor:
    return torch.stack(
        [torch.from_numpy(np.array(i)).permute(2, 0, 1).float() / 255 for i in images]
    )


def test_fine_detail_tells_images_enlarged_from_a_small_source_from_sharp_ones() -> None:
    sharp, small = fine_detail(_tensor(_shape_images(64))), fine_detail(_tensor(_shape_images(20)))
    assert sharp > 3 * DETAIL_RATIO and small < DETAIL_RATIO / 3
    assert fine_detail(torch.full((4, 3, 16, 16), 0.5)) == 0.0  # flat images have no detail


def test_low_detail_images_get_a_gentler_randaugment_even_when_no_view_changes_the_prediction() -> (
    None
):
    class _Constant(torch.nn.Module):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return torch.tensor([[1.0, 0.0]]).repeat(len(x), 1)

    small = _shape_images(20)
    detail = fine_detail(_image_probe(_Constant(), small).x)
    low = _strength(_Constant(), small, detail=detail)
    sharp = _strength(
        _Constant(), _shape_images(64), detail=fine_detail(_tensor(_shape_images(64)))
    )
    assert sharp["randaug_magnitude"] == 9.0 and sharp["randaug_num_ops"] == 2
    assert low["randaug_magnitude"] == LOW_DETAIL_MAGNITUDE
    assert low["randaug_num_ops"] == (2 if LOW_DETAIL_MAGNITUDE > 0 else 0)


def test_crops_that_cut_the_class_out_are_narrowed() -> None:
    images = []
    for i in range(48):
        a = np.full((32, 32, 3), 60, np.uint8)
        if i % 5 < 4:  # a bright 5 px dot in one corner, 2 px from the edges
            r, c = divmod(i % 5, 2)
            a[2 + 25 * r - 2 * r : 7 + 25 * r - 2 * r, 2 + 25 * c - 2 * c : 7 + 25 * c - 2 * c] = (
                255
            )
        images.append(Image.fromarray(a))
    out = _strength(_CornerClassifier(), images, crop_scale=(0.3, 1.0), num_ops=0)
    assert out["crop_scale"][0] > 0.3
    assert out["randaug_num_ops"] == 0 and out["randaug_agreement"] == out["crop_agreement"]


def test_a_run_reports_the_chosen_strength_and_trains_with_it(tmp_path: Path, tiny_spec) -> None:  # type: ignore[no-untyped-def]
    from must_core.ml.config import make_config
    from must_core.ml.train import adapt
    from tests.conftest import write_images

    write_images(tmp_path / "d", 16, seed=3)
    cfg = make_config(batch_size=8, epochs=1, probe_samples=16, randaug_magnitude=5.0)
    res = adapt(
        cfg,
        images_dir=tmp_path / "d",
        class_names=["red", "green", "blue"],
        output_dir=tmp_path / "out",
        base_model=tiny_spec,
    )
    aug = res.metrics["augmentation"]
    assert res.status == "completed"
    assert 0 <= aug["crop_agreement"] <= 1 and 0 <= aug["randaug_agreement"] <= 1
    assert aug["randaug_magnitude"] <= 5.0 and aug["crop_scale"][0] >= 0.8
    assert aug["fine_detail"] >= 0
    assert aug["chosen_by"] == "zero-shot agreement on the unlabeled data"
