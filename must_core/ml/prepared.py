"""A dataset decoded once: every image resized to the size training needs, stored as uint8 shards.

Decoding a full-size JPEG costs more than both training views together, and MUST reads every image
20–60 times. :class:`Preparation` decodes each image once, in parallel processes, resizes its shorter
side to ``short_side`` (about 1.15× the model input; the longer side is capped at ``MAX_ASPECT``× that,
centre-cropped), and writes the pixels into memory-mappable shard files. Files that do not decode are
skipped and counted in the same pass, which replaces the decode probe of a plain scan.

The pass streams: files are prepared in a fixed pseudo-random order (:func:`preparation_order`), one
chunk of ``CHUNK`` files per shard, and each finished shard is announced by its ``chunk-K.json``. A
reader (:class:`PreparedDataset`) sees the images of every announced chunk, so training can start
after the first chunk, reading the images in preparation order while the rest is still being decoded
(:class:`must_core.ml.data.PreparedOrderSampler`).

Layout of a prepared folder: ``plan.json`` (written first: format, short side, number of files),
``pixels-K.u8`` shards with their ``chunk-K.json`` (relative names, [offset, height, width] rows,
skipped files), and ``meta.json`` (format, short side, counts), written last: a folder is complete
once ``meta.json`` exists. ``failed.json`` says that the pass died, and why.

:func:`dataset_key` names a dataset by the identity of its files, so a retry, a resumed attempt or
another job on the same files finds the prepared form in a cache.
"""

from __future__ import annotations

import hashlib
import json
import math
import multiprocessing
import os
import threading
import time
from collections.abc import Sequence
from concurrent.futures import Future, ProcessPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from must_core.errors import DatasetError
from must_core.ml.images import ScanResult, candidate_paths, decode_reason, load_image

FORMAT = "must-prepared/2"
PLAN_FILE = "plan.json"
META_FILE = "meta.json"
FAILED_FILE = "failed.json"
MAX_ASPECT = 2.0
SHORT_SIDE_FACTOR = 1.15
CHUNK = 256  # images per worker task (one shard file each)
ORDER_SEED = 20261202  # the preparation order is part of the prepared form, not of a job
_POLL_S = 0.05


def short_side_for(image_size: int) -> int:
    """The stored shorter side for a model input of ``image_size`` pixels."""
    return math.ceil(image_size * SHORT_SIDE_FACTOR)


def prepared_dir(cache_root: Path, short_side: int) -> Path:
    return cache_root / f"s{short_side}"


def preparation_order(source: Path) -> list[str]:
    """The candidate files in a fixed pseudo-random order: every chunk is a uniform sample of them."""
    files = candidate_paths(source)
    perm = np.random.default_rng(ORDER_SEED).permutation(len(files))
    return [files[i] for i in perm]


def _write_json(path: Path, value: Any) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(value))
    os.replace(tmp, path)  # readers see the whole file or none


# ---- read side ------------------------------------------------------------------------------------------
@dataclass
class PreparedDataset:
    """Images as uint8 [H, W, 3] views into memory-mapped shards; grows while the pass still runs."""

    root: Path
    short_side: int
    num_candidates: int  # files the pass was given (decodable or not)
    files: list[str] = field(default_factory=list)  # relative to the source folder, in index order
    skipped: list[tuple[str, str]] = field(default_factory=list)
    complete: bool = False
    _rows: list[np.ndarray] = field(default_factory=list, repr=False)  # per chunk: [m, 4]
    _index: np.ndarray | None = field(default=None, repr=False)
    _chunks: int = 0  # chunks read so far
    _shards: dict[int, np.memmap] = field(default_factory=dict, repr=False)

    def __len__(self) -> int:
        return len(self.files)

    @property
    def index(self) -> np.ndarray:
        if self._index is None or len(self._index) != len(self.files):
            self._index = np.concatenate(self._rows) if self._rows else np.zeros((0, 4), np.int64)
        return self._index

    def refresh(self) -> None:
        """Take in the chunks announced since the last look; raise if the pass failed."""
        if self.complete:
            return
        while (chunk := self.root / f"chunk-{self._chunks}.json").is_file():
            data = json.loads(chunk.read_text())
            rows = np.asarray(data["rows"], dtype=np.int64).reshape(-1, 3)
            shard = np.full((len(rows), 1), self._chunks, dtype=np.int64)
            self._rows.append(np.concatenate([shard, rows], axis=1))
            self.files.extend(data["files"])
            self.skipped.extend((p, r) for p, r in data["skipped"])
            self._chunks += 1
        self.complete = (self.root / META_FILE).is_file()
        if not self.complete and (self.root / FAILED_FILE).is_file():
            reason = json.loads((self.root / FAILED_FILE).read_text()).get("error", "unknown")
            raise DatasetError(f"preparing the dataset failed: {reason}")

    def wait_for(self, count: int) -> int:
        """Block until ``count`` images are prepared or the pass is complete; the images there are."""
        self.refresh()
        while len(self) < count and not self.complete:
            time.sleep(_POLL_S)
            self.refresh()
        return len(self)

    def wait_complete(self) -> None:
        self.wait_for(self.num_candidates + 1)

    def image(self, i: int) -> np.ndarray:
        if i >= len(self):  # a loader worker: the sampler has seen a newer chunk than this copy
            self.wait_for(i + 1)
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
        return {**self.__dict__, "_shards": {}, "_index": None}


def open_prepared(folder: Path, *, partial: bool = False) -> PreparedDataset | None:
    """The prepared dataset in ``folder``; None when absent, of another format, or (unless
    ``partial``) not complete yet."""
    try:
        plan = json.loads((folder / PLAN_FILE).read_text())
    except (OSError, ValueError):
        return None
    if plan.get("format") != FORMAT or not (partial or (folder / META_FILE).is_file()):
        return None
    prepared = PreparedDataset(folder, int(plan["short_side"]), int(plan["num_candidates"]))
    prepared.refresh()
    return prepared


# ---- write side -----------------------------------------------------------------------------------------
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


def _prepare_chunk(args: tuple[list[str], str, str, int, int]) -> None:
    """Decode, resize and append a chunk of images to shard K, then announce it (chunk-K.json)."""
    paths, source, folder, k, short_side = args
    files, rows, skipped = [], [], []
    offset = 0
    with open(Path(folder) / f"pixels-{k}.u8", "wb") as f:
        for p in paths:
            rel = str(Path(p).relative_to(source))
            try:
                img = _resize_short(load_image(Path(p), draft_size=short_side), short_side)
            except Exception as exc:  # every undecodable file is skipped and counted, never fatal
                skipped.append((rel, decode_reason(exc)))
                continue
            data = np.asarray(img, dtype=np.uint8)
            f.write(data.tobytes())
            files.append(rel)
            rows.append((offset, data.shape[0], data.shape[1]))
            offset += data.size
    _write_json(
        Path(folder) / f"chunk-{k}.json", {"files": files, "rows": rows, "skipped": skipped}
    )


class Preparation:
    """The single decode pass over ``source`` into ``folder``, run by a pool in the background.

    ``plan.json`` exists when the constructor returns, so readers can open the folder at once.
    """

    def __init__(self, source: Path, folder: Path, short_side: int, workers: int) -> None:
        folder.mkdir(parents=True, exist_ok=True)
        for stale in folder.iterdir():  # an earlier attempt's partial pass
            stale.unlink()
        order = preparation_order(source)
        self.folder, self.short_side = folder, short_side
        self.tasks = [
            (order[i : i + CHUNK], str(source), str(folder), k, short_side)
            for k, i in enumerate(range(0, len(order), CHUNK))
        ]
        plan = {"format": FORMAT, "short_side": short_side, "num_candidates": len(order)}
        _write_json(folder / PLAN_FILE, plan)
        self.seconds: float | None = None
        self._t0 = time.monotonic()
        # spawn, not fork: the trainer may already hold CUDA or threads; the workers only need PIL
        self._pool = ProcessPoolExecutor(
            max_workers=max(1, workers), mp_context=multiprocessing.get_context("spawn")
        )
        self._futures: list[Future[None]] = [
            self._pool.submit(_prepare_chunk, t) for t in self.tasks
        ]
        self._thread = threading.Thread(target=self._finish, name="prepare-dataset", daemon=True)
        self._thread.start()

    def _finish(self) -> None:
        try:
            for fut in self._futures:
                fut.result()
            reader = open_prepared(self.folder, partial=True)
            assert reader is not None
            meta = {
                "format": FORMAT,
                "short_side": self.short_side,
                "num_images": len(reader),
                "num_skipped": len(reader.skipped),
            }
            _write_json(self.folder / META_FILE, meta)  # the folder counts as prepared from here on
            self.seconds = time.monotonic() - self._t0
        except (
            BaseException
        ) as exc:  # readers wait on the folder: tell them, never leave them hanging
            _write_json(self.folder / FAILED_FILE, {"error": f"{type(exc).__name__}: {exc}"})
        finally:
            self._pool.shutdown(wait=False, cancel_futures=True)

    def cancel(self) -> None:
        """Stop the pass (a stopped run): queued chunks are dropped, the folder stays incomplete."""
        for fut in self._futures:
            fut.cancel()
        self._pool.shutdown(wait=True, cancel_futures=True)
        self._thread.join()

    def join(self) -> None:
        self._thread.join()


def prepare_folder(source: Path, folder: Path, short_side: int, workers: int) -> PreparedDataset:
    """Decode every image under ``source`` once into ``folder`` and wait for the pass to finish."""
    Preparation(source, folder, short_side, workers).join()
    prepared = open_prepared(folder, partial=True)
    assert prepared is not None
    prepared.refresh()  # raises if the pass failed
    return prepared


def dataset_key(source: Path) -> str:
    """A name for the dataset: relative paths, sizes and modification times of its image files.

    Like make and rsync, a file counts as changed when its size or mtime changes; nothing is read, so
    the key costs one ``stat`` per file. Datasets fetched from S3 or an archive get their files' times
    from the object's ``LastModified`` or the archive member (:mod:`must_core.datasets.fetch`), so a
    fetch of the same objects gives the same key and a rewritten object a new one.
    """
    h = hashlib.sha256(FORMAT.encode())
    prefix = len(str(source).rstrip(os.sep)) + 1
    for path in candidate_paths(source):
        st = os.stat(path)  # follows a staged link to the file itself
        h.update(f"{path[prefix:]}\0{st.st_size}\0{st.st_mtime_ns}\n".encode())
    return h.hexdigest()[:32]


def cache_files(folder: Path) -> Sequence[Path]:
    """The files of a complete prepared folder, ``meta.json`` last (it marks completeness)."""
    return [
        *sorted(p for p in folder.iterdir() if p.name != META_FILE and not p.name.startswith(".")),
        folder / META_FILE,
    ]
