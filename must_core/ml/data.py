"""Local image folders, the weak/strong views and the eval transform (spec §6).

Folders may be flat or have class subfolders (names ignored for training), are scanned recursively, and
may contain anything: files that are not decodable images are skipped and counted, never fatal.
"""

from __future__ import annotations

import contextlib
import logging
import math
import random
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Protocol

import numpy as np
import torch
from PIL import Image
from torch.utils.data import Dataset, Sampler
from torchvision import transforms as T

from must_core.errors import DatasetError, EmptyDatasetError
from must_core.ml.images import (  # re-exported: the engine's image API lives in data
    IMAGE_EXTENSIONS as IMAGE_EXTENSIONS,
)
from must_core.ml.images import MAX_IMAGE_PIXELS as MAX_IMAGE_PIXELS
from must_core.ml.images import ScanResult as ScanResult
from must_core.ml.images import decode_reason as decode_reason
from must_core.ml.images import list_candidate_files as list_candidate_files
from must_core.ml.images import load_image as load_image
from must_core.ml.images import scan_images as scan_images
from must_core.ml.images import to_rgb as to_rgb
from must_core.ml.masking import MaskGenerator
from must_core.ml.model import Preprocess

_logger = logging.getLogger(__name__)


def require_images(scan: ScanResult, root: Path) -> None:
    if not scan.files:
        detail = f" ({scan.num_skipped} files could not be decoded)" if scan.skipped else ""
        raise EmptyDatasetError(f"no decodable images found under {root}{detail}")


def _interp(name: str) -> T.InterpolationMode:
    return {
        "bicubic": T.InterpolationMode.BICUBIC,
        "bilinear": T.InterpolationMode.BILINEAR,
        "nearest": T.InterpolationMode.NEAREST,
    }.get(name, T.InterpolationMode.BICUBIC)


def eval_transform(pp: Preprocess) -> T.Compose:
    """Deterministic test transform: shortest-side resize, centre crop, normalise (open_clip val)."""
    return T.Compose(
        [
            T.Resize(pp.image_size, interpolation=_interp(pp.interpolation)),
            T.CenterCrop(pp.image_size),
            T.ToTensor(),
            T.Normalize(pp.mean, pp.std),
        ]
    )


def weak_transform(pp: Preprocess) -> T.Compose:
    """Teacher view: resize shorter side, random crop; no flip, no colour (spec §6)."""
    return T.Compose(
        [
            T.Resize(pp.image_size, interpolation=_interp(pp.interpolation)),
            T.RandomCrop(pp.image_size),
            T.ToTensor(),
            T.Normalize(pp.mean, pp.std),
        ]
    )


def strong_transform(
    pp: Preprocess,
    scale: tuple[float, float] = (0.3, 1.0),
    num_ops: int = 2,
    magnitude: float = 9.0,
    magnitude_std: float = 0.5,
) -> T.Compose:
    """Student view: timm's RandomResizedCrop + flip + RandAugment 'rand-m9-mstd0.5-inc1' (spec §6)."""
    from timm.data import create_transform  # type: ignore[attr-defined]

    aa = randaug_spec(magnitude, num_ops, magnitude_std) if num_ops > 0 else None
    tf = create_transform(
        input_size=pp.image_size,
        is_training=True,
        scale=scale,
        hflip=0.5,
        color_jitter=0.0,
        auto_augment=aa,
        interpolation="bicubic",
        mean=pp.mean,
        std=pp.std,
        re_prob=0.0,
    )
    for t in getattr(tf, "transforms", []):
        _set_magnitude(t, magnitude)
        _cap_posterize(t)
    return tf  # type: ignore[no-any-return]


def randaug_spec(magnitude: float, num_ops: int, magnitude_std: float) -> str:
    """timm's RandAugment string. timm parses the magnitude as an integer ('m9.5' raises), so the
    string carries the rounded value and :func:`_set_magnitude` sets the exact one on the ops."""
    return f"rand-m{round(magnitude)}-n{num_ops}-mstd{magnitude_std:g}-inc1"


# timm's 'inc1' RandAugment ops without the geometric ones (Rotate, ShearX/Y, TranslateX/YRel): what
# the student's view draws from when the label-free rule finds that moving the image changes the class.
PHOTOMETRIC_OPS = (
    "AutoContrast",
    "Equalize",
    "Invert",
    "PosterizeIncreasing",
    "SolarizeIncreasing",
    "SolarizeAdd",
    "ColorIncreasing",
    "ContrastIncreasing",
    "BrightnessIncreasing",
    "SharpnessIncreasing",
)


def _set_magnitude(augment: object, magnitude: float) -> None:
    for op in getattr(augment, "ops", []):
        if hasattr(op, "magnitude"):
            op.magnitude = float(magnitude)


SampleKey = tuple[int, int]  # (epoch, index): the dataset seeds each sample's augmentation by it


class EpochSampler(Sampler[SampleKey]):
    """Shuffled, drop-last order that is a pure function of (seed, epoch): resumable mid-epoch.

    Yields ``(epoch, index)`` so the dataset knows the epoch for per-sample seeding, which keeps
    augmentation and masks reproducible whatever the number of loader workers or ranks. With
    ``world_size`` ranks each global batch of ``batch_size`` is cut into equal contiguous shards and rank
    ``r`` yields shard ``r``: together the ranks see exactly the batches one process would.
    """

    def __init__(
        self,
        n: int,
        batch_size: int,
        seed: int,
        start_epoch: int,
        start_step: int,
        epochs: int,
        *,
        rank: int = 0,
        world_size: int = 1,
    ) -> None:
        if batch_size % world_size:
            raise ValueError(f"batch {batch_size} does not split into {world_size} shards")
        self.n, self.batch_size, self.seed = n, batch_size, seed
        self.start_epoch, self.start_step, self.epochs = start_epoch, start_step, epochs
        self.rank, self.world_size = rank, world_size

    @property
    def steps_per_epoch(self) -> int:
        return self.n // self.batch_size

    @property
    def shard(self) -> int:
        return self.batch_size // self.world_size

    def order(self, epoch: int) -> torch.Tensor:
        return _permutation(self.n, self.seed, epoch)[: self.steps_per_epoch * self.batch_size]

    def __iter__(self) -> Iterator[SampleKey]:
        lo = self.rank * self.shard
        for epoch in range(self.start_epoch, self.epochs):
            batches = self.order(epoch).view(self.steps_per_epoch, self.batch_size)
            first = self.start_step if epoch == self.start_epoch else 0
            for idx in batches[first:, lo : lo + self.shard].reshape(-1).tolist():
                yield epoch, idx

    def __len__(self) -> int:
        total = (self.epochs - self.start_epoch) * self.steps_per_epoch - self.start_step
        return max(0, total * self.shard)


class GrowingSource(Protocol):
    """Images that may still be arriving (a prepared dataset while its pass runs)."""

    def __len__(self) -> int: ...

    def wait_for(self, count: int) -> int: ...


def _permutation(n: int, seed: int, epoch: int, window: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed * 1_000_003 + epoch + window * 104_729)
    return torch.randperm(n, generator=g)


class PreparedOrderSampler(Sampler[SampleKey]):
    """The order for a prepared dataset, which may still be being prepared when training starts.

    Epoch 0 reads the images in preparation order (itself a fixed random permutation of the files,
    :func:`must_core.ml.prepared.preparation_order`), shuffled by ``seed`` within windows of
    ``window`` images, waiting for a window until it is prepared; later epochs are full permutations.
    Samples form one stream across epochs, cut into global batches of ``batch_size``: step ``s`` is
    positions ``[s·B, (s+1)·B)`` whatever the epoch lengths, so a run resumes exactly at its step.
    With ``world_size`` ranks, rank ``r`` yields the ``r``-th contiguous shard of each global batch.
    """

    def __init__(
        self,
        source: GrowingSource,
        batch_size: int,
        seed: int,
        start_step: int,
        total_steps: int,
        *,
        window: int,
        rank: int = 0,
        world_size: int = 1,
    ) -> None:
        if batch_size % world_size:
            raise ValueError(f"batch {batch_size} does not split into {world_size} shards")
        self.source, self.batch_size, self.seed, self.window = source, batch_size, seed, window
        self.start_step, self.total_steps = start_step, total_steps
        self.rank, self.world_size = rank, world_size

    @property
    def shard(self) -> int:
        return self.batch_size // self.world_size

    def _first_epoch(self) -> Iterator[int]:
        lo, w = 0, 0
        while True:
            have = self.source.wait_for(lo + self.window)
            hi = min(lo + self.window, have)
            if hi <= lo:  # complete: every prepared image has been read
                return
            yield from (lo + _permutation(hi - lo, self.seed, 0, w)).tolist()
            lo, w = hi, w + 1

    def _stream(self) -> Iterator[SampleKey]:
        yield from ((0, i) for i in self._first_epoch())
        n = len(self.source)
        if n == 0:
            return
        epoch = 1
        while True:
            yield from ((epoch, i) for i in _permutation(n, self.seed, epoch).tolist())
            epoch += 1

    def __iter__(self) -> Iterator[SampleKey]:
        lo = self.rank * self.shard
        stream = self._stream()
        for _ in range(self.start_step * self.batch_size):  # resume: skip the steps already taken
            next(stream, None)
        for _ in range(self.start_step, self.total_steps):
            batch = [next(stream) for _ in range(self.batch_size)]
            yield from batch[lo : lo + self.shard]

    def __len__(self) -> int:
        return max(0, self.total_steps - self.start_step) * self.shard


def to_uint8_tensor(img: Image.Image) -> torch.Tensor:
    """[3, H, W] uint8: normalisation happens on the device, for the whole batch at once."""
    return torch.from_numpy(np.array(img, dtype=np.uint8)).permute(2, 0, 1)


def _crop_resize(x: torch.Tensor, top: int, left: int, h: int, w: int, size: int) -> torch.Tensor:
    """One crop + antialiased bicubic resize of a uint8 [3, H, W] tensor (torch's uint8 kernels are
    ~2.5× faster than PIL's resample here)."""
    from torchvision.transforms.v2 import functional as F2

    crop = x[:, top : top + h, left : left + w]
    if h == size and w == size:
        return crop.contiguous()
    out = F2.resize(crop, [size, size], interpolation=T.InterpolationMode.BICUBIC, antialias=True)
    return out  # type: ignore[no-any-return]


def _hwc_to_tensor(arr: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(np.ascontiguousarray(arr)).permute(2, 0, 1)


class WeakView:
    """Teacher view, uint8: a random shorter-side square, resized once to the input size.

    The same distribution as resize-shorter-side-then-random-crop (the reference), with one resample
    of the crop instead of the whole image (none when the shorter side is already the input size).
    No flip, no colour (spec §6).
    """

    def __init__(self, size: int) -> None:
        self.size = size

    def __call__(self, arr: np.ndarray) -> torch.Tensor:
        h, w = arr.shape[:2]
        side = min(w, h)
        left = random.randint(0, w - side)  # noqa: S311 - augmentation, seeded per sample
        top = random.randint(0, h - side)  # noqa: S311
        return _crop_resize(_hwc_to_tensor(arr), top, left, side, side, self.size)


class StrongView:
    """Student view, uint8: RandomResizedCrop as one crop+resize, flip, RandAugment on the small image
    (its photometric ops only when ``geometric`` is false).

    timm's 'rand-mM-nN-mstdS-inc1' recipe with the reference's crop (spec §6), minus the float
    conversion and normalisation, which move to the device.
    """

    def __init__(
        self,
        pp: Preprocess,
        scale: tuple[float, float] = (0.3, 1.0),
        num_ops: int = 2,
        magnitude: float = 9.0,
        magnitude_std: float = 0.5,
        hflip: float = 0.5,
        geometric: bool = True,
    ) -> None:
        from timm.data.auto_augment import rand_augment_transform  # type: ignore[attr-defined]

        self.size = pp.image_size
        self.scale = scale
        self.hflip = hflip
        self.augment = None
        if num_ops > 0:
            hparams = {
                "translate_const": int(pp.image_size * 0.45),
                "img_mean": tuple(round(255 * m) for m in pp.mean),
            }
            spec = randaug_spec(magnitude, num_ops, magnitude_std)
            ops = None if geometric else list(PHOTOMETRIC_OPS)
            self.augment = rand_augment_transform(spec, hparams, transforms=ops)
            _set_magnitude(self.augment, magnitude)
            _cap_posterize(self.augment)

    def __call__(self, arr: np.ndarray) -> torch.Tensor:
        x = _hwc_to_tensor(arr)
        top, left, h, w = _resized_crop_params(arr.shape[0], arr.shape[1], self.scale)
        out = _crop_resize(x, top, left, h, w, self.size)
        if self.hflip > 0 and random.random() < self.hflip:  # noqa: S311 - seeded per sample
            out = out.flip(-1)
        if self.augment is None:
            return out
        img = Image.fromarray(out.permute(1, 2, 0).contiguous().numpy())  # no strided copy in PIL
        return to_uint8_tensor(self.augment(img))


def _resized_crop_params(
    height: int, width: int, scale: tuple[float, float], ratio: tuple[float, float] = (3 / 4, 4 / 3)
) -> tuple[int, int, int, int]:
    """RandomResizedCrop's (top, left, h, w): torchvision's sampling rule (10 tries, then the
    centre crop clipped to the ratio range), drawn from the per-sample-seeded python RNG."""
    area = height * width
    log_lo, log_hi = math.log(ratio[0]), math.log(ratio[1])
    for _ in range(10):
        target = area * random.uniform(*scale)  # noqa: S311
        aspect = math.exp(random.uniform(log_lo, log_hi))  # noqa: S311
        w = round(math.sqrt(target * aspect))
        h = round(math.sqrt(target / aspect))
        if 0 < w <= width and 0 < h <= height:
            return random.randint(0, height - h), random.randint(0, width - w), h, w  # noqa: S311
    in_ratio = width / height
    if in_ratio < ratio[0]:
        w, h = width, round(width / ratio[0])
    elif in_ratio > ratio[1]:
        h, w = height, round(height * ratio[1])
    else:
        w, h = width, height
    return (height - h) // 2, (width - w) // 2, h, w


def _cap_posterize(augment: object) -> None:
    # timm's PosterizeIncreasing maps magnitude 10 (mstd noise clipped at the max) to 0 bits, which
    # PIL rejects ("bits must be between 1 and 8") and crashes ~0.3% of samples; cap just below 10.
    for op in getattr(augment, "ops", []):
        if getattr(op, "name", "") == "PosterizeIncreasing":
            op.magnitude_max = 9.99


class ImageSource(Protocol):
    """Where training images come from: raw files (decoded every time) or a prepared dataset."""

    def __len__(self) -> int: ...

    def image(self, i: int) -> np.ndarray: ...


class RawImages:
    """Decode the file every time (JPEG draft mode keeps it at least ``draft_size``)."""

    def __init__(self, files: Sequence[Path], draft_size: int | None = None) -> None:
        self.files = list(files)
        self.draft_size = draft_size

    def __len__(self) -> int:
        return len(self.files)

    def image(self, i: int) -> np.ndarray:
        """[H, W, 3] uint8."""
        # Files were probed at scan time; if one changed since, fall back to a neighbour rather than
        # killing the run.
        for k in range(len(self.files)):
            path = self.files[(i + k) % len(self.files)]
            try:
                return np.array(load_image(path, self.draft_size))
            except Exception as exc:
                _logger.warning("cannot decode %s during training: %s", path, exc)
        raise EmptyDatasetError("no image in the dataset can be decoded any more")


@contextlib.contextmanager
def seeded_transforms(seed: int) -> Iterator[None]:
    """Seed the RNGs that timm/torchvision transforms draw from (python, numpy for RandAugment's op
    choice, torch's CPU generator) and restore the caller's states afterwards, so that a view is a
    function of ``seed`` alone and the caller's RNG stream is untouched. Without numpy here the op
    choice depended on the process's history (and repeated across loader workers, which PyTorch does
    not reseed for numpy)."""
    py_state, np_state = random.getstate(), np.random.get_state()
    try:
        with torch.random.fork_rng(devices=[]):
            random.seed(seed)
            np.random.seed(seed % 2**32)
            # The CPU generator only: the transforms run on CPU, and torch.manual_seed would also
            # queue a CUDA re-seed that formats a stack trace per call (~1 ms per sample).
            torch.default_generator.manual_seed(seed)
            yield
    finally:
        random.setstate(py_state)
        np.random.set_state(np_state)


class MustTrainDataset(Dataset[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]):
    """(weak view, strong view, token mask) per image as uint8, seeded by (seed, epoch, index)."""

    def __init__(
        self,
        source: ImageSource,
        weak: WeakView,
        strong: StrongView,
        masks: MaskGenerator,
        seed: int,
    ) -> None:
        self.source = source
        self.weak, self.strong, self.masks = weak, strong, masks
        self.seed = seed

    def __len__(self) -> int:
        return len(self.source)

    def __getitem__(self, key: SampleKey) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        epoch, idx = key
        img = self.source.image(idx)
        sample_seed = [self.seed, epoch, idx]
        rng = np.random.default_rng(sample_seed)
        torch_seed = int(rng.integers(0, 2**62))
        with seeded_transforms(torch_seed):
            weak = self.weak(img)
            strong = self.strong(img)
        mask = torch.from_numpy(self.masks(rng))
        return weak, strong, mask


def normalize_on_device(x: torch.Tensor, mean: torch.Tensor, std: torch.Tensor) -> torch.Tensor:
    """uint8 [B, 3, H, W] → normalised float32 (the loader's views arrive as uint8)."""
    return (x.float().div_(255.0) - mean) / std


class EvalDataset(Dataset[tuple[torch.Tensor, int]]):
    """Labelled images (label = class index) with the eval transform."""

    def __init__(self, items: Sequence[tuple[Path, int]], transform: T.Compose) -> None:
        self.items = list(items)
        self.transform = transform

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
        path, label = self.items[i]
        return self.transform(load_image(path)), label


def normalize_class_key(name: str) -> str:
    """Folder ↔ class-name matching key: case-insensitive, '_' and '-' count as spaces."""
    return " ".join(name.replace("_", " ").replace("-", " ").split()).casefold()


def scan_labelled(
    root: Path, class_names: Sequence[str]
) -> tuple[list[tuple[Path, int]], ScanResult]:
    """Eval folder with one subfolder per class, matched to ``class_names`` by name (spec §10.7).

    Raises:
        DatasetError: missing folder, no class subfolders, or subfolders that match no class.
    """
    if not root.is_dir():
        raise DatasetError(f"eval folder not found or not a directory: {root}")
    index = {normalize_class_key(c): i for i, c in enumerate(class_names)}
    subdirs = sorted(d for d in root.iterdir() if d.is_dir() and not d.name.startswith("."))
    if not subdirs:
        raise DatasetError(f"eval folder {root} has no class subfolders")
    unknown = [d.name for d in subdirs if normalize_class_key(d.name) not in index]
    if unknown:
        raise DatasetError(
            f"eval subfolders do not match any class name: {unknown[:10]}"
            + (f" (+{len(unknown) - 10} more)" if len(unknown) > 10 else "")
        )
    items: list[tuple[Path, int]] = []
    all_files: list[Path] = []
    skipped: list[tuple[str, str]] = []
    for d in subdirs:
        scan = scan_images(d)
        label = index[normalize_class_key(d.name)]
        items.extend((f, label) for f in scan.files)
        all_files.extend(scan.files)
        skipped.extend((f"{d.name}/{s}", r) for s, r in scan.skipped)
    if not items:
        raise EmptyDatasetError(f"no decodable images found under eval folder {root}")
    return items, ScanResult(files=all_files, skipped=skipped)
