"""The prepared dataset: decoded once (corrupt files counted in the same pass), reused by content key,
read back as uint8 views that training normalises on the device."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from PIL import Image

from must_core.ml.data import StrongView, WeakView
from must_core.ml.model import load_base_model
from must_core.ml.prepared import (
    content_key,
    open_prepared,
    prepare_folder,
    prepared_dir,
    short_side_for,
)
from must_core.ml.train import adapt
from tests.conftest import write_images


def _folder(tmp_path: Path) -> Path:
    data = tmp_path / "d"
    write_images(data, 5, size=(40, 48))
    write_images(data / "sub", 2, seed=1, size=(30, 200), fmt="jpg")  # extreme aspect ratio
    write_images(data / "photo", 1, seed=2, size=(375, 500), fmt="jpg")  # rounding at the edge
    (data / "broken.png").write_bytes(b"not an image")
    (data / "notes.txt").write_text("ignored")
    return data


def test_prepare_decodes_once_counts_corrupt_files_and_reopens(tmp_path: Path) -> None:
    data = _folder(tmp_path)
    prepared = prepare_folder(data, tmp_path / "p", short_side=37, workers=2)
    assert len(prepared) == 8
    assert prepared.skipped == [("broken.png", "not a decodable image (UnidentifiedImageError)")]
    for i in range(len(prepared)):
        img = prepared.image(i)
        assert img.dtype == np.uint8 and min(img.shape[:2]) == 37 and max(img.shape[:2]) <= 74
    again = open_prepared(tmp_path / "p")
    assert again is not None and again.files == prepared.files
    assert np.array_equal(again.image(3), prepared.image(3))
    original = np.asarray(Image.open(data / prepared.files[0]).convert("RGB").resize((44, 37)))
    assert np.abs(prepared.image(0).astype(int) - original.astype(int)).mean() < 8  # same picture


def test_incomplete_folder_is_not_a_prepared_dataset(tmp_path: Path) -> None:
    data = _folder(tmp_path)
    prepare_folder(data, tmp_path / "p", short_side=37, workers=1)
    (tmp_path / "p" / "meta.json").unlink()  # killed before the last write
    assert open_prepared(tmp_path / "p") is None


def test_content_key_follows_the_content(tmp_path: Path) -> None:
    data = _folder(tmp_path)
    key = content_key(data)
    assert key == content_key(data)
    (data / "broken.png").write_bytes(b"not an image either")
    assert content_key(data) != key
    (data / "notes.txt").write_text("not an image file: not part of the key")
    assert content_key(data) == content_key(data)


def test_views_are_uint8_and_the_weak_view_never_mirrors(tiny_spec: Any) -> None:
    pp = load_base_model(tiny_spec).preprocess
    arr = np.zeros((32, 48, 3), dtype=np.uint8)
    arr[:, :4] = 255  # bright left edge
    img = arr
    weak, strong = WeakView(pp.image_size), StrongView(pp, num_ops=2)
    for seed in range(20):
        torch.manual_seed(seed)
        w, s = weak(img), strong(img)
        assert w.dtype == s.dtype == torch.uint8
        assert w.shape == s.shape == (3, pp.image_size, pp.image_size)
        assert w[:, :, -1].float().mean() < 1.0  # the bright edge never lands on the right


def test_adapt_prepares_once_then_reuses(tmp_path: Path, tiny_spec: Any) -> None:
    from must_core.ml.config import make_config

    data = tmp_path / "d"
    write_images(data, 12, seed=4)
    (data / "broken.png").write_bytes(b"not an image")
    cfg = make_config(batch_size=4, epochs=1, prepare_workers=1, export_ema=False)
    cache = tmp_path / "cache"
    stats = []
    for run in ("first", "second"):
        res = adapt(
            cfg,
            images_dir=data,
            class_names=["red", "green", "blue"],
            output_dir=tmp_path / run,
            base_model=tiny_spec,
            prepared_cache=cache,
        )
        assert res.status == "completed" and res.num_images == 12 and res.num_skipped == 1
        stats.append(res.metrics["dataset_cache"])
    assert stats[0]["prepared"] and not stats[0]["reused"]
    assert stats[1]["reused"] and stats[1]["short_side"] == short_side_for(32)
    assert open_prepared(prepared_dir(cache, short_side_for(32))) is not None


@pytest.mark.parametrize("image_size", [32, 224])
def test_short_side_is_about_115_percent(image_size: int) -> None:
    assert image_size * 1.15 <= short_side_for(image_size) < image_size * 1.15 + 1
