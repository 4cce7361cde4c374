"""Decode untrusted image bytes with bounded memory: size, side and pixel caps checked from the header
before any decode, a per-request pixel budget, JPEG draft decoding and early reduction of oversized
images, EXIF orientation, RGB.

Why each bound: the eval transform resizes the *shortest* side to the model's input size, so an image
of extreme aspect (300000×1) would be upscaled to gigapixels; a pixel cap alone does not prevent that.
The side cap refuses such images, and whatever passes is centre-cropped to at most ``MAX_ASPECT``
before the resize (the centre crop that follows keeps only the central square anyway).
"""

from __future__ import annotations

import base64
import binascii
import io
import warnings
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass

from PIL import Image, UnidentifiedImageError

from must_core.errors import MustError
from must_core.ml.data import to_rgb

# Larger aspect ratios are centre-cropped before the resize; images up to it are untouched, so their
# tensors are exactly those of the engine's eval transform.
MAX_ASPECT = 4
# Oversized images are reduced (JPEG: DCT draft, others: box reduce) while their shortest side stays
# at least this many times the model's input side.
KEEP_FACTOR = 2


class ImageTooLargeError(MustError):
    """Image bytes over the per-image cap (HTTP 413)."""

    code = "image_too_large"


class PixelLimitError(MustError):
    """Too many pixels, a side too long, or a request over its pixel budget (HTTP 413)."""

    code = "image_pixels_exceeded"


class NotAnImageError(MustError):
    """Bytes are not a decodable image (HTTP 415)."""

    code = "not_an_image"


@dataclass(frozen=True)
class ImageLimits:
    max_bytes: int  # encoded bytes per image
    max_pixels: int  # width × height per image
    max_side: int  # longest side per image
    max_request_pixels: int  # sum of width × height over one request


def decode_base64(data: str, max_bytes: int) -> bytes:
    """Decode a base64 string (optionally a data: URL) with a size cap checked before decoding."""
    if data.startswith("data:"):
        _, _, data = data.partition(",")
    if len(data) * 3 // 4 > max_bytes + 3:
        raise ImageTooLargeError(f"image larger than {max_bytes} bytes")
    try:
        raw = base64.b64decode(data, validate=True)
    except (binascii.Error, ValueError) as exc:
        raise NotAnImageError("image is not valid base64") from exc
    if len(raw) > max_bytes:
        raise ImageTooLargeError(f"image larger than {max_bytes} bytes")
    return raw


@contextmanager
def _decoding() -> Iterator[None]:
    """Map Pillow's failures to our codes; the bomb warning becomes an error."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            yield
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
        raise PixelLimitError(f"image exceeds the pixel limit: {exc}") from exc
    except MustError:
        raise
    except (UnidentifiedImageError, OSError, ValueError, SyntaxError, MemoryError) as exc:
        raise NotAnImageError(f"cannot decode image: {type(exc).__name__}") from exc


def _open_checked(raw: bytes, limits: ImageLimits) -> Image.Image:
    if len(raw) > limits.max_bytes:
        raise ImageTooLargeError(f"image larger than {limits.max_bytes} bytes")
    if not raw:
        raise NotAnImageError("empty image")
    img = Image.open(io.BytesIO(raw))  # header only
    w, h = img.size
    if max(w, h) > limits.max_side:
        raise PixelLimitError(f"image is {w}x{h}; no side may exceed {limits.max_side}")
    if w * h > limits.max_pixels:
        raise PixelLimitError(f"image has {w}x{h} pixels; the limit is {limits.max_pixels}")
    return img


def check_request(raws: Sequence[bytes], limits: ImageLimits) -> None:
    """Header checks of every image of a request, before any is decoded (cheap refusals first)."""
    total = 0
    for raw in raws:
        with _decoding():
            w, h = _open_checked(raw, limits).size
        total += w * h
        if total > limits.max_request_pixels:
            raise PixelLimitError(
                f"the images of this request exceed {limits.max_request_pixels} pixels in total"
            )


def decode_image(raw: bytes, limits: ImageLimits, target_side: int | None = None) -> Image.Image:
    """Bytes → RGB PIL image, bounded: header checks first; with ``target_side`` (the model's input
    side) extreme aspects are centre-cropped and oversized images reduced before the resize."""
    with _decoding():
        img = _open_checked(raw, limits)
        if target_side and img.format == "JPEG":
            img.draft(None, _draft_size(img.size, target_side * KEEP_FACTOR))
        img.load()
        if target_side:
            img = _bound_aspect(img)
        img = to_rgb(img)
        if target_side:
            img = _reduce(img, target_side * KEEP_FACTOR)
        return img


def _draft_size(size: tuple[int, int], keep: int) -> tuple[int, int]:
    w, h = size
    scale = max(keep / min(w, h), 0.0)
    return (max(1, int(w * scale)), max(1, int(h * scale))) if scale < 1 else (w, h)


def _bound_aspect(img: Image.Image) -> Image.Image:
    w, h = img.size
    if w > MAX_ASPECT * h:
        left = (w - MAX_ASPECT * h) // 2
        return img.crop((left, 0, left + MAX_ASPECT * h, h))
    if h > MAX_ASPECT * w:
        top = (h - MAX_ASPECT * w) // 2
        return img.crop((0, top, w, top + MAX_ASPECT * w))
    return img


def _reduce(img: Image.Image, keep: int) -> Image.Image:
    factor = min(img.size) // keep
    return img.reduce(factor) if factor >= 2 else img
