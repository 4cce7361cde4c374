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
    dataset_key,
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


def test_dataset_key_follows_names_sizes_and_times(tmp_path: Path) -> None:
    import os

    data = _folder(tmp_path)
    key = dataset_key(data)
    assert key == dataset_key(data)
    broken = data / "broken.png"
    broken.write_bytes(b"not an image either")  # another size
    assert dataset_key(data) != key
    key = dataset_key(data)
    mtime = broken.stat().st_mtime_ns
    broken.write_bytes(b"not an image, ALSO!")  # the same size, a new time
    os.utime(broken, ns=(mtime + 1_000_000_000, mtime + 1_000_000_000))
    assert dataset_key(data) != key
    key = dataset_key(data)
    (data / "notes.txt").write_text("not an image file: not part of the key")
    assert dataset_key(data) == key


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


class _Growing:
    """A source whose images arrive a few at a time, each time the sampler waits for more."""

    def __init__(self, final: int, step: int) -> None:
        self.final, self.step, self.available = final, step, 0

    def __len__(self) -> int:
        return self.available

    def wait_for(self, count: int) -> int:
        while self.available < min(count, self.final):
            self.available = min(self.final, self.available + self.step)
        return self.available


def _keys(sampler: Any) -> list[tuple[int, int]]:
    return list(sampler)


def test_prepared_order_sampler_streams_windows_and_resumes_exactly() -> None:
    from must_core.ml.data import PreparedOrderSampler

    def make(source: Any, start: int = 0, rank: int = 0, world: int = 1) -> PreparedOrderSampler:
        return PreparedOrderSampler(
            source,
            6,
            seed=3,
            start_step=start,
            total_steps=9,
            window=4,
            rank=rank,
            world_size=world,
        )

    source = _Growing(final=10, step=3)
    seen = []
    for epoch, idx in make(source):
        if epoch == 0:
            assert idx < len(source)  # never an image that is not prepared yet
        seen.append((epoch, idx))
    assert len(seen) == 9 * 6
    assert sorted(i for e, i in seen if e == 0) == list(range(10))  # epoch 0: every image once
    first = [i for e, i in seen if e == 0]
    assert sorted(first[:4]) == [0, 1, 2, 3] and sorted(first[4:8]) == [4, 5, 6, 7]  # windows
    assert sorted(i for e, i in seen if e == 1) == list(range(10))
    full = _keys(make(_Growing(10, 10)))
    assert full == seen  # the order does not depend on how fast the images arrived
    assert _keys(make(_Growing(10, 10), start=5)) == full[5 * 6 :]  # resume at step 5
    halves = [_keys(make(_Growing(10, 10), rank=r, world=2)) for r in (0, 1)]
    joined = [k for s in range(9) for r in (0, 1) for k in halves[r][s * 3 : s * 3 + 3]]
    assert joined == full  # two ranks see exactly the batches of one process


def test_training_reads_a_dataset_while_it_is_being_prepared(tmp_path: Path) -> None:
    import shutil
    import threading

    from must_core.ml import prepared as prep
    from must_core.ml.data import PreparedOrderSampler

    data = tmp_path / "d"
    write_images(data, prep.CHUNK + 20, seed=5, size=(12, 12))
    done = prepare_folder(data, tmp_path / "p", short_side=8, workers=2)
    order = _keys(PreparedOrderSampler(done, 4, 0, 0, 80, window=prep.CHUNK))
    # the same folder caught mid-pass: the second chunk and the completion mark not written yet
    held = tmp_path / "held"
    held.mkdir()
    for name in ("chunk-1.json", "meta.json"):
        shutil.move(tmp_path / "p" / name, held / name)
    partial = open_prepared(tmp_path / "p", partial=True)
    assert partial is not None and not partial.complete and len(partial) == prep.CHUNK
    assert open_prepared(tmp_path / "p") is None  # not a cache hit while incomplete

    def finish() -> None:
        for name in ("chunk-1.json", "meta.json"):
            shutil.move(held / name, tmp_path / "p" / name)

    timer = threading.Timer(0.5, finish)
    timer.start()
    streamed = []
    for epoch, idx in PreparedOrderSampler(partial, 4, 0, 0, 80, window=prep.CHUNK):
        if not streamed:
            assert not partial.complete  # the first batch came before the pass ended
        streamed.append((epoch, idx))
        assert np.array_equal(partial.image(idx), done.image(idx))
    timer.join()
    assert streamed == order and partial.complete and len(partial) == prep.CHUNK + 20


def test_a_streamed_run_equals_a_run_from_the_cache(tmp_path: Path, tiny_spec: Any) -> None:
    from must_core.ml.checkpoint import read_classifier
    from must_core.ml.config import make_config

    data = tmp_path / "d"
    write_images(data, 20, seed=6)
    cfg = make_config(batch_size=4, epochs=2, prepare_workers=2, export_ema=False)
    cache = tmp_path / "cache"
    weights, stats = [], []
    for run in ("streamed", "cached"):
        res = adapt(
            cfg,
            images_dir=data,
            class_names=["red", "green", "blue"],
            output_dir=tmp_path / run,
            base_model=tiny_spec,
            prepared_cache=cache,
        )
        assert res.model_path is not None
        weights.append(read_classifier(res.model_path)[0])
        stats.append(res.metrics["dataset_cache"])
    assert [s["reused"] for s in stats] == [False, True]
    assert stats[0]["prepare_seconds"] > 0
    for name, tensor in weights[0].items():
        assert torch.equal(tensor, weights[1][name]), name


def test_a_failed_pass_stops_its_readers_and_is_prepared_again(tmp_path: Path) -> None:
    import json

    from must_core.errors import DatasetError

    data = _folder(tmp_path)
    prepare_folder(data, tmp_path / "p", short_side=37, workers=1)
    (tmp_path / "p" / "meta.json").unlink()  # the pass died before the end ...
    (tmp_path / "p" / "failed.json").write_text(json.dumps({"error": "CancelledError"}))
    assert open_prepared(tmp_path / "p") is None  # ... so it is no cache hit, and no error
    with pytest.raises(DatasetError, match="CancelledError"):
        open_prepared(tmp_path / "p", partial=True)  # a reader learns that no more images come
    assert len(prepare_folder(data, tmp_path / "p", short_side=37, workers=1)) == 8
