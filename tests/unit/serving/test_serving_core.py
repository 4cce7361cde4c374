"""Serving core: image limits, single-flight LRU cache, micro-batching, zero-shot agreement."""

from __future__ import annotations

import base64
import io
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import torch
from PIL import Image

from must_core.ml.config import make_config
from must_core.ml.inference import AdaptedClassifier
from must_core.ml.model import build_must_model, load_base_model
from must_core.ml.train import adapt
from must_core.serving.batcher import MicroBatcher
from must_core.serving.cache import ModelCache
from must_core.serving.engine import ServingEngine, ServingOptions
from must_core.serving.images import (
    ImageLimits,
    ImageTooLargeError,
    NotAnImageError,
    PixelLimitError,
    check_request,
    decode_base64,
    decode_image,
)
from tests.conftest import save_local_dir, write_images


def _png(w: int, h: int, mode: str = "RGB") -> bytes:
    buf = io.BytesIO()
    Image.new(mode, (w, h)).save(buf, format="PNG")
    return buf.getvalue()


def _lim(max_bytes: int = 10**6, max_pixels: int = 10**6, **kw: int) -> ImageLimits:
    return ImageLimits(
        max_bytes=max_bytes,
        max_pixels=max_pixels,
        max_side=kw.get("max_side", 10**6),
        max_request_pixels=kw.get("max_request_pixels", 10**9),
    )


def test_decode_limits_and_formats() -> None:
    assert decode_image(_png(10, 12), _lim(10_000, 1000)).size == (10, 12)
    assert decode_image(_png(5, 5, "LA"), _lim(10_000, 1000)).mode == "RGB"
    with pytest.raises(ImageTooLargeError):
        decode_image(_png(10, 10), _lim(10, 1000))
    with pytest.raises(PixelLimitError):
        decode_image(_png(100, 100), _lim(10**6, 5000))
    with pytest.raises(NotAnImageError):
        decode_image(b"hello world", _lim(1000, 1000))
    with pytest.raises(NotAnImageError):
        decode_image(b"", _lim(1000, 1000))
    raw = _png(4, 4)
    assert decode_base64(base64.b64encode(raw).decode(), 10_000) == raw
    assert decode_base64("data:image/png;base64," + base64.b64encode(raw).decode(), 10_000) == raw
    with pytest.raises(NotAnImageError):
        decode_base64("%%%not base64", 10_000)
    with pytest.raises(ImageTooLargeError):
        decode_base64(base64.b64encode(b"x" * 5000).decode(), 100)


def test_side_cap_and_request_pixel_budget_refuse_from_the_header() -> None:
    with pytest.raises(PixelLimitError, match="side"):
        decode_image(_png(3000, 1), _lim(max_side=2000))
    check_request([_png(100, 100)] * 3, _lim(max_request_pixels=30_000))
    with pytest.raises(PixelLimitError, match="in total"):
        check_request([_png(100, 100)] * 4, _lim(max_request_pixels=30_000))


def test_extreme_aspect_is_cropped_and_oversized_images_reduced() -> None:
    assert decode_image(_png(2000, 10), _lim(), target_side=32).size == (40, 10)
    assert decode_image(_png(10, 2000), _lim(), target_side=32).size == (10, 40)
    assert decode_image(_png(100, 64), _lim(), target_side=32).size == (100, 64)  # untouched
    assert min(decode_image(_png(1000, 700), _lim(), target_side=32).size) >= 64
    assert decode_image(_png(1000, 700), _lim(), target_side=32).size == (100, 70)
    buf = io.BytesIO()
    Image.new("RGB", (1600, 1200), (10, 200, 30)).save(buf, format="JPEG")
    drafted = decode_image(buf.getvalue(), _lim(max_pixels=10**7), target_side=32)
    assert drafted.mode == "RGB" and 64 <= min(drafted.size) < 1200


def test_exif_orientation_is_honoured() -> None:
    img = Image.new("RGB", (20, 10), (255, 0, 0))
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90° on display
    buf = io.BytesIO()
    img.save(buf, format="JPEG", exif=exif)
    assert decode_image(buf.getvalue(), _lim()).size == (10, 20)


def test_cache_single_flight_and_budget_eviction() -> None:
    cache: ModelCache[str] = ModelCache(budget_bytes=250)
    loads = []

    def loader(key: str) -> tuple[str, int]:
        loads.append(key)
        time.sleep(0.2)
        return key.upper(), 100

    with ThreadPoolExecutor(8) as pool:
        results = list(pool.map(lambda _: cache.get("a", lambda: loader("a")), range(8)))
    assert results == ["A"] * 8 and loads == ["a"]
    assert cache.stats.misses == 1 and cache.stats.hits == 7
    cache.get("b", lambda: loader("b"))
    cache.get("a", lambda: loader("a"))  # refresh a: b becomes least recently used
    cache.get("c", lambda: loader("c"))  # 300 > 250: evicts b
    assert "b" not in cache and "a" in cache and "c" in cache
    assert cache.stats.evictions == 1
    assert cache.evict("a") and "a" not in cache


def test_cache_load_failure_is_not_cached() -> None:
    cache: ModelCache[int] = ModelCache(budget_bytes=10)

    def boom() -> tuple[int, int]:
        raise FileNotFoundError("gone")

    with pytest.raises(FileNotFoundError):
        cache.get("k", boom)
    assert cache.get("k", lambda: (1, 1)) == 1


def test_batcher_merges_concurrent_requests_and_matches_unbatched() -> None:
    torch.manual_seed(0)
    lin = torch.nn.Linear(6, 3)
    sizes: list[int] = []
    lock = threading.Lock()

    def fwd(x: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            time.sleep(0.01)
            return lin(x)

    def record(n: int) -> None:
        with lock:
            sizes.append(n)

    on = MicroBatcher(fwd, max_batch=16, max_wait_ms=50, on_batch=record)
    off = MicroBatcher(fwd, enabled=False)
    xs = [torch.randn(1 + i % 2, 6) for i in range(12)]
    with ThreadPoolExecutor(12) as pool:
        batched = list(pool.map(on, xs))
    plain = [off(x) for x in xs]
    for a, b in zip(batched, plain, strict=True):
        assert torch.allclose(a, b, atol=1e-6)
    assert max(sizes) > 2 and sum(sizes) == sum(x.shape[0] for x in xs)
    on.close()


def test_batcher_propagates_errors() -> None:
    def bad(_: torch.Tensor) -> torch.Tensor:
        raise RuntimeError("kaput")

    b = MicroBatcher(bad, max_wait_ms=1)
    with pytest.raises(RuntimeError, match="kaput"):
        b(torch.zeros(1, 2))
    b.close()


def test_engine_adapted_and_zero_shot_agree_with_engine(tmp_path: Path, tiny_spec) -> None:  # type: ignore[no-untyped-def]
    write_images(tmp_path / "d", 8)
    classes = ["red", "green", "blue"]
    res = adapt(
        make_config(batch_size=8, epochs=1),
        images_dir=tmp_path / "d",
        class_names=classes,
        output_dir=tmp_path / "o",
        base_model=tiny_spec,
    )
    assert res.model_path is not None
    imgs = [Image.open(p).convert("RGB") for p in sorted((tmp_path / "d").iterdir())[:5]]
    direct = AdaptedClassifier.load(res.model_path)
    with torch.no_grad():
        want = direct(direct.preprocess_images(imgs))
    for batching in (True, False):
        eng = ServingEngine(ServingOptions(batching=batching, max_wait_ms=2))
        fetches: list[Path] = []

        def fetch(path: Path = res.model_path, seen: list[Path] = fetches) -> Path:
            seen.append(path)
            return path

        served = eng.adapted("m1", fetch)
        again = eng.adapted("m1", fetch)
        assert served is again and len(fetches) == 1
        assert torch.allclose(served.logits(imgs), want, atol=1e-5)
        preds = served.classify(imgs, top_k=10)
        assert [p.index for p in preds] == want.argmax(-1).tolist()
        assert len(preds[0].top_k) == 3
        assert eng.evict_adapted("m1")
        eng.close()

    eng.close()


def _local_dir_base(tmp_path: Path, tiny_spec) -> object:  # type: ignore[no-untyped-def]
    """A fixed-weight base model folder, so two loads give identical weights."""
    from must_core.ml.config import BaseModelSpec

    folder = save_local_dir(load_base_model(tiny_spec).clip, tmp_path / "base")
    return BaseModelSpec(arch=f"local-dir:{folder}")


def test_zero_shot_agrees_with_engine_and_caches_text(tmp_path: Path, tiny_spec) -> None:  # type: ignore[no-untyped-def]
    spec = _local_dir_base(tmp_path, tiny_spec)
    classes = ["red", "green", "blue"]
    write_images(tmp_path / "d", 4)
    imgs = [Image.open(p).convert("RGB") for p in sorted((tmp_path / "d").iterdir())]
    eng = ServingEngine(ServingOptions(max_wait_ms=1))
    zs = eng.zero_shot(spec, classes, ["a photo of a {}.", "art of the {}."])
    ref = build_must_model(load_base_model(spec), classes, ["a photo of a {}.", "art of the {}."])
    x = zs.classifier.preprocess_images(imgs)
    with torch.no_grad():
        want = ref.eval()(x)
    assert torch.allclose(zs.logits(imgs), want, atol=1e-4)
    assert eng.zero_shot(spec, classes, ["a photo of a {}.", "art of the {}."]) is zs
    assert eng.text_misses == 1
    other = eng.zero_shot(spec, ["cat", "dog"], None)  # new classes: new text embeddings, same base
    assert other is not zs and eng.text_misses == 2 and other.classifier.num_classes == 2
    eng.close()
