"""Image files without torch: decoding to RGB, the bad-file reasons and the folder scan.

Kept free of torch so that processes that only decode (the dataset preparation pool, the service
worker computing a dataset's content key) start fast.
"""

from __future__ import annotations

import logging
import os
import warnings
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image, ImageFile, ImageOps, UnidentifiedImageError

from must_core.errors import DatasetError

_logger = logging.getLogger(__name__)

IMAGE_EXTENSIONS = frozenset({".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif"})
# Decompression-bomb guard: refuse images above this many pixels (PIL warns at 89 M by default).
MAX_IMAGE_PIXELS = 178_956_970
Image.MAX_IMAGE_PIXELS = MAX_IMAGE_PIXELS
ImageFile.LOAD_TRUNCATED_IMAGES = False


@dataclass
class ScanResult:
    """Decodable images found under a folder, plus what was skipped and why."""

    files: list[Path]
    skipped: list[tuple[str, str]] = field(default_factory=list)  # (relative path, reason)

    @property
    def num_skipped(self) -> int:
        return len(self.skipped)


def to_rgb(img: Image.Image) -> Image.Image:
    """EXIF-rotate and convert any mode (L, P, CMYK, I;16, RGBA/LA with alpha) to RGB.

    Transparent pixels are composited on white so that their hidden colour does not leak in.
    """
    img = ImageOps.exif_transpose(img) or img
    if img.mode == "RGB":
        return img
    if img.mode == "P" and "transparency" in img.info:
        img = img.convert("RGBA")
    if img.mode in ("RGBA", "LA", "PA"):
        rgba = img.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    if img.mode.startswith("I;16") or img.mode in ("I", "F"):
        arr = np.asarray(img, dtype=np.float64)
        hi = float(arr.max()) or 1.0
        img = Image.fromarray((arr / hi * 255.0).clip(0, 255).astype(np.uint8))
    return img.convert("RGB")


def load_image(path: Path, draft_size: int | None = None) -> Image.Image:
    """Decode an image file fully to RGB. Raises OSError/ValueError/DecompressionBombError on bad files.

    ``draft_size`` lets JPEG decode at reduced scale (still >= the requested size) to save CPU.
    """
    with warnings.catch_warnings():
        warnings.simplefilter("error", Image.DecompressionBombWarning)
        with Image.open(path) as img:
            if draft_size is not None and img.format == "JPEG":
                img.draft("RGB", (draft_size, draft_size))
            img.load()
            return to_rgb(img)


def decode_reason(exc: BaseException) -> str:
    """A short reason why a file is not a usable image, for the skipped-file report."""
    if isinstance(exc, Image.DecompressionBombError | Image.DecompressionBombWarning):
        return "image too large (decompression bomb guard)"
    if isinstance(exc, OSError | ValueError | SyntaxError | UnidentifiedImageError):
        return f"not a decodable image ({type(exc).__name__})"
    return f"decode error ({type(exc).__name__})"


def _probe(path: Path) -> str | None:
    """None if the file decodes, else a short reason."""
    try:
        img = load_image(path, draft_size=64)
        if img.width < 1 or img.height < 1:
            return "empty image"
    except Exception as exc:  # a corrupt file must never abort a scan
        return decode_reason(exc)
    return None


def list_candidate_files(root: Path) -> list[Path]:
    """:func:`candidate_paths` as ``Path`` objects."""
    return [Path(p) for p in candidate_paths(root)]


def candidate_paths(root: Path) -> list[str]:
    """Files with an image extension under root (recursive, sorted by path components; symlinked
    folders are not entered, symlinked files count when they point at a file).

    ``os.walk`` and strings rather than ``Path.rglob`` and sorting ``Path`` objects: 20× less CPU for
    100k files, which a job pays before its first step.
    """
    if not root.is_dir():
        raise DatasetError(f"dataset folder not found or not a directory: {root}")
    found = []
    for dirpath, _dirs, names in os.walk(root, followlinks=False):
        for name in names:
            if name.startswith(".") or os.path.splitext(name)[1].lower() not in IMAGE_EXTENSIONS:
                continue
            path = os.path.join(dirpath, name)
            if os.path.isfile(path):
                found.append(path)
    found.sort(key=lambda p: p.split(os.sep))
    return found


def scan_images(root: Path, workers: int = 4) -> ScanResult:
    """Find every decodable image under ``root``; corrupt/unreadable files are skipped and counted."""
    candidates = list_candidate_files(root)
    with ThreadPoolExecutor(max_workers=max(1, workers)) as pool:
        reasons = list(pool.map(_probe, candidates))
    files, skipped = [], []
    for path, reason in zip(candidates, reasons, strict=True):
        if reason is None:
            files.append(path)
        else:
            skipped.append((str(path.relative_to(root)), reason))
    if skipped:
        _logger.warning("skipped %d undecodable files under %s", len(skipped), root)
    return ScanResult(files=files, skipped=skipped)
