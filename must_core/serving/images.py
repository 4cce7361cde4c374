"""Decode untrusted image bytes safely: size caps, pixel caps, EXIF orientation, RGB."""

from __future__ import annotations

import base64
import binascii
import io
import warnings

from PIL import Image, UnidentifiedImageError

from must_core.errors import MustError
from must_core.ml.data import to_rgb


class ImageTooLargeError(MustError):
    """Image bytes over the per-image cap (HTTP 413)."""

    code = "image_too_large"


class PixelLimitError(MustError):
    """Too many pixels: decompression-bomb guard (HTTP 413)."""

    code = "image_pixels_exceeded"


class NotAnImageError(MustError):
    """Bytes are not a decodable image (HTTP 415)."""

    code = "not_an_image"


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


def decode_image(raw: bytes, *, max_bytes: int, max_pixels: int) -> Image.Image:
    """Bytes → RGB PIL image. Header-only pixel check before the full decode (bomb guard)."""
    if len(raw) > max_bytes:
        raise ImageTooLargeError(f"image larger than {max_bytes} bytes")
    if not raw:
        raise NotAnImageError("empty image")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            img = Image.open(io.BytesIO(raw))
            w, h = img.size
            if w * h > max_pixels:
                raise PixelLimitError(f"image has {w}x{h} pixels; the limit is {max_pixels}")
            img.load()
            return to_rgb(img)
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
        raise PixelLimitError(f"image exceeds the pixel limit: {exc}") from exc
    except MustError:
        raise
    except (UnidentifiedImageError, OSError, ValueError, SyntaxError) as exc:
        raise NotAnImageError(f"cannot decode image: {type(exc).__name__}") from exc
