"""A dataset decoded once: every image resized to the size training needs, stored as uint8 shards.

Decoding a full-size JPEG costs more than both training views together, and MUST reads every image
20–60 times. :func:`prepare_folder` decodes each image once, in parallel processes, resizes its shorter
side to ``short_side`` (about 1.15× the model input; the longer side is capped at ``MAX_ASPECT``× that,
centre-cropped), and writes the pixels into memory-mappable shard files. Files that do not decode are
skipped and counted in the same pass, which replaces the decode probe of a plain scan.

Layout of a prepared folder: ``meta.json`` (format, short side, relative file names, skipped files),
``index.npy`` ([N, 4] int64: shard, offset, height, width) and ``pixels-K.u8`` shards. A folder is
complete once ``meta.json`` exists (written last).

:func:`content_key` names a dataset by its content (relative names, sizes, BLAKE2 digests), so a retry,
a resumed attempt or another job on the same files finds the prepared form in a cache.
"""

from __future__ import annotations

import hashlib
import json
import math
import multiprocessing
import os
from collections.abc import Sequence
from concurrent.futures import ProcessPoolExecutor, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from must_core.ml.images import ScanResult, decode_reason, list_candidate_files, load_image

FORMAT = "must-prepared/1"
META_FILE = "meta.json"
MAX_ASPECT = 2.0
SHORT_SIDE_FACTOR = 1.15
_CHUNK = 256  # images per worker task (one shard file each)


def short_side_for(image_size: int) -> int:
    """The stored shorter side for a model input of ``image_size`` pixels."""
    return math.ceil(image_size * SHORT_SIDE_FACTOR)


def prepared_dir(cache_root: Path, short_side: int) -> Path:
    return cache_root / f"s{short_side}"


@dataclass
class PreparedDataset:
    """Read side: images as uint8 [H, W, 3] views into memory-mapped shards."""

    root: Path
    files: list[str]  # relative to the source folder, in index order
    index: np.ndarray  # [N, 4] int64: shard, offset, height, width
    short_side: int
    skipped: list[tuple[str, str]] = field(default_factory=list)
    _shards: dict[int, np.memmap] = field(default_factory=dict, repr=False)

    def __len__(self) -> int:
        return len(self.files)

    def image(self, i: int) -> np.ndarray:
        shard, offset, h, w = (int(v) for v in self.index[i])
        pixels = self._shards.get(shard)
        if pixels is None:  # opened lazily: each loader worker maps the shards it reads
            pixels = np.memmap(self.root / f"pixels-{shard}.u8", dtype=np.uint8, mode="r")
            self._shards[shard] = pixels
        return np.array(pixels[offset : offset + h * w * 3]).reshape(h, w, 3)  # a private copy

    def load(self, i: int) -> Image.Image:
        return Image.fromarray(self.image(i))

    def scan(self, source_root: Path) -> ScanResult:
        return ScanResult([source_root / f for f in self.files], list(self.skipped))

    def __getstate__(self) -> dict[str, Any]:  # loader workers re-open the shards themselves
        return {**self.__dict__, "_shards": {}}


def open_prepared(folder: Path) -> PreparedDataset | None:
    """The prepared dataset in ``folder``, or None when it is absent, incomplete or of another format."""
    meta_path = folder / META_FILE
    if not meta_path.is_file():
        return None
    meta = json.loads(meta_path.read_text())
    if meta.get("format") != FORMAT:
        return None
    index = np.load(folder / "index.npy")
    return PreparedDataset(
        root=folder,
        files=list(meta["files"]),
        index=index,
        short_side=int(meta["short_side"]),
        skipped=[(p, r) for p, r in meta["skipped"]],
    )


def _resize_short(img: Image.Image, short_side: int) -> Image.Image:
    w, h = img.size
    scale = short_side / min(w, h)
    nw, nh = max(short_side, round(w * scale)), max(short_side, round(h * scale))
    cap = round(short_side * MAX_ASPECT)
    box_w, box_h = min(nw, cap), min(nh, cap)
    # centre-crop an extreme aspect ratio in source coordinates, then resize once
    cw, ch = min(w, box_w / scale), min(h, box_h / scale)  # rounding may overshoot by a hair
    left, top = (w - cw) / 2, (h - ch) / 2
    return img.resize(
        (box_w, box_h), Image.Resampling.BICUBIC, box=(left, top, left + cw, top + ch)
    )


def _prepare_chunk(args: tuple[list[str], str, int, str]) -> list[tuple[int, int, int] | str]:
    """Decode, resize and append a chunk of images to one shard; per file (offset, h, w) or a reason."""
    paths, shard_path, short_side, _ = args
    out: list[tuple[int, int, int] | str] = []
    offset = 0
    with open(shard_path, "wb") as f:
        for p in paths:
            try:
                img = _resize_short(load_image(Path(p), draft_size=short_side), short_side)
            except Exception as exc:  # every undecodable file is skipped and counted, never fatal
                out.append(decode_reason(exc))
                continue
            data = np.asarray(img, dtype=np.uint8)
            f.write(data.tobytes())
            out.append((offset, data.shape[0], data.shape[1]))
            offset += data.size
    return out


def prepare_folder(source: Path, folder: Path, short_side: int, workers: int) -> PreparedDataset:
    """Decode every image under ``source`` once into ``folder`` (see the module docstring)."""
    folder.mkdir(parents=True, exist_ok=True)
    candidates = list_candidate_files(source)
    chunks = [candidates[i : i + _CHUNK] for i in range(0, len(candidates), _CHUNK)]
    tasks = [
        ([str(p) for p in chunk], str(folder / f"pixels-{k}.u8"), short_side, str(source))
        for k, chunk in enumerate(chunks)
    ]
    rows: list[tuple[int, int, int, int]] = []
    files: list[str] = []
    skipped: list[tuple[str, str]] = []
    # spawn, not fork: the trainer may already hold CUDA or threads; the workers only need PIL
    ctx = multiprocessing.get_context("spawn")
    with ProcessPoolExecutor(max_workers=max(1, workers), mp_context=ctx) as pool:
        for k, (chunk, results) in enumerate(
            zip(chunks, pool.map(_prepare_chunk, tasks), strict=True)
        ):
            for path, res in zip(chunk, results, strict=True):
                rel = str(path.relative_to(source))
                if isinstance(res, str):
                    skipped.append((rel, res))
                else:
                    rows.append((k, *res))
                    files.append(rel)
    index = np.asarray(rows, dtype=np.int64).reshape(-1, 4)
    np.save(folder / "index.npy", index)
    meta = {"format": FORMAT, "short_side": short_side, "files": files, "skipped": skipped}
    tmp = folder / f".{META_FILE}.tmp"
    tmp.write_text(json.dumps(meta))
    os.replace(tmp, folder / META_FILE)  # the folder counts as prepared from here on
    prepared = open_prepared(folder)
    assert prepared is not None
    return prepared


def _digest(path: Path) -> str:
    h = hashlib.blake2b(digest_size=16)
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def content_key(source: Path, workers: int = 8) -> str:
    """A name for the dataset's content: relative paths, sizes and BLAKE2 digests of its image files.

    Hashing runs on threads (hashlib releases the GIL), so it reads at disk speed, not one core's.
    """
    files = list_candidate_files(source)
    with ThreadPoolExecutor(max_workers=max(1, workers)) as pool:
        digests = list(pool.map(_digest, files))
    h = hashlib.sha256(FORMAT.encode())
    for path, digest in zip(files, digests, strict=True):
        h.update(f"{path.relative_to(source)}\0{path.stat().st_size}\0{digest}\n".encode())
    return h.hexdigest()[:32]


def cache_files(folder: Path) -> Sequence[Path]:
    """The files of a complete prepared folder, ``meta.json`` last (it marks completeness)."""
    return [
        *sorted(p for p in folder.iterdir() if p.name != META_FILE and not p.name.startswith(".")),
        folder / META_FILE,
    ]
