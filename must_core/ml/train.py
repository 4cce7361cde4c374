"""The MUST training loop (spec §0): resumable, label-free, with progress/stop hooks.

Entry point: :func:`adapt`. It takes local paths only (the service downloads datasets and base weights
first) and plain callables (``on_progress``, ``should_stop``, ``on_checkpoint``), so it needs no queue or
web code. The same loop runs as one process or as DDP ranks under ``torchrun`` (see
:mod:`must_core.ml.launch`): a :class:`TrainRun` holds the run's state and four phases act on it —
prepare, restore, train steps, finalize.
"""

from __future__ import annotations

import contextlib
import copy
import functools
import json
import logging
import math
import os
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader, Sampler

from must_core.errors import (
    CheckpointError,
    DatasetError,
    EmptyDatasetError,
    InvalidConfigError,
    TrainingDivergedError,
)
from must_core.fsutil import atomic_write
from must_core.ml import checkpoint as ckpt
from must_core.ml import gallery
from must_core.ml.augment import choose_recipe
from must_core.ml.config import (
    BaseModelSpec,
    MustConfig,
    ema_schedule_params,
    resume_conflicts,
)
from must_core.ml.data import (
    EpochSampler,
    ImageSource,
    MustTrainDataset,
    PreparedOrderSampler,
    RawImages,
    SampleKey,
    ScanResult,
    StrongView,
    WeakView,
    eval_transform,
    load_image,
    normalize_on_device,
    require_images,
    scan_images,
    scan_labelled,
)
from must_core.ml.distributed import BatchLayout, DistContext, batch_layout, rank_device
from must_core.ml.ema import EmaUpdater, ema_decay, make_teacher
from must_core.ml.evaluate import evaluate_folder
from must_core.ml.health import (
    COLLAPSE_ENTROPY_RATIO,
    Probe,
    entropy,
    estimate_prior,
    health_warnings,
    predict_probs,
    sample_images,
    snapshot,
)
from must_core.ml.losses import LossWeights, running_keep
from must_core.ml.masking import MaskGenerator
from must_core.ml.model import (
    MustModel,
    Preprocess,
    base_image_size,
    build_must_model,
    load_base_model,
    resolve_mask_patch_size,
)
from must_core.ml.optim import build_optimizer, cosine_lr, scaled_lrs, set_lr
from must_core.ml.prepared import (
    CHUNK,
    Preparation,
    PreparedDataset,
    open_prepared,
    prepared_dir,
    short_side_for,
)
from must_core.ml.step import (
    LOSS_KEYS,
    AdaptiveThreshold,
    CompiledOrEager,
    GlobalStep,
    MicroBatch,
)
from must_core.ml.step import must_step_losses as must_step_losses
from must_core.ml.templates import DEFAULT_TEMPLATES, validate_class_names, validate_templates

_logger = logging.getLogger(__name__)

CHECKPOINT_NAME = "last.pt"
MODEL_NAME = "model.safetensors"
EMA_MODEL_NAME = "model_ema.safetensors"


@dataclass
class ProgressEvent:
    """Training progress, emitted every ``progress_every_steps`` steps and at the end."""

    step: int  # optimizer steps done
    total_steps: int
    epoch: int  # 0-based epoch of the last step
    losses: dict[str, float]  # mean over the interval: loss, st, fair, mim, align
    conf_ratio: float  # fraction of confident pseudo-labels over the interval
    lr: float  # head-group learning rate at the last step
    ema_decay: float
    images_per_second: float
    eta_seconds: float
    phase: str = "train"  # "scan" | "zero_shot_eval" | "train" | "final_eval"

    @property
    def fraction(self) -> float:
        return self.step / self.total_steps if self.total_steps else 0.0

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["fraction"] = self.fraction
        return d


@dataclass
class AdaptationResult:
    status: Literal["completed", "stopped"]
    step: int
    total_steps: int
    output_dir: Path
    checkpoint_path: Path
    model_path: Path | None  # student export (None when stopped early)
    ema_model_path: Path | None
    num_images: int
    num_skipped: int
    skipped: list[tuple[str, str]] = field(default_factory=list)
    metrics: dict[str, Any] = field(default_factory=dict)  # eval metrics + last training losses
    history: list[dict[str, Any]] = field(default_factory=list)  # progress events
    resumed_from_step: int | None = None  # the step of the checkpoint this run continued from


def _init_mask_token(
    model: MustModel, source: list[Path] | PreparedDataset, preprocess: Preprocess
) -> None:
    """Mask token := mean patch embedding of up to 256 unlabeled images (eval view): evenly spaced
    files, or the first prepared images (preparation order is random, and they are ready first).

    Files that fail to decode are skipped here (the loader counts and reports them later); with no
    decodable file the random init stays.
    """
    tf = eval_transform(preprocess)
    if isinstance(source, PreparedDataset):
        picks = range(min(256, source.wait_for(256)))
    else:
        picks = range(0, len(source), max(1, len(source) // 256))[:256]
    xs = []
    for i in picks:
        try:
            img = source.load(i) if isinstance(source, PreparedDataset) else load_image(source[i])
            xs.append(tf(img))
        except Exception as exc:  # any undecodable file is skipped, as in the loader
            _logger.debug("mask-token init skips image %d: %s", i, exc)
    if xs:
        model.init_mask_token_from_images(torch.stack(xs))


def select_device(cfg: MustConfig) -> torch.device:
    if cfg.device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dev = torch.device(cfg.device)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise DatasetError(
            "device 'cuda' requested but CUDA is not available", code="invalid_config"
        )
    return dev


def autocast_dtype(cfg: MustConfig, device: torch.device) -> torch.dtype | None:
    """bf16 autocast on CUDA by default; fp32 on CPU (bf16 autocast is ~14× slower on these CPUs)."""
    if cfg.precision == "fp32":
        return None
    if cfg.precision == "bf16":
        return torch.bfloat16
    return torch.bfloat16 if device.type == "cuda" else None


def _autocast(
    device: torch.device, dtype: torch.dtype | None
) -> contextlib.AbstractContextManager[Any]:
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=dtype)


def apply_threads(cfg: MustConfig) -> None:
    """Size torch's CPU threads from the config: oversubscribed cores make torch 20–60× slower."""
    if cfg.num_threads is not None:
        torch.set_num_threads(cfg.num_threads)
        with contextlib.suppress(RuntimeError):  # only settable before inter-op work starts
            torch.set_num_interop_threads(max(1, min(cfg.num_threads, 4)))


def _loader_workers(cfg: MustConfig, device: torch.device) -> int:
    """Explicit, or on CUDA up to 8 per rank from this machine's cores shared by its ranks."""
    if cfg.num_workers is not None:
        return cfg.num_workers
    local_ranks = int(os.environ.get("LOCAL_WORLD_SIZE", "1"))
    spare = max(1, ((os.cpu_count() or 2) - local_ranks) // local_ranks)
    return min(8, spare) if device.type == "cuda" else 0


class _NullHook:
    @staticmethod
    def progress(_: ProgressEvent) -> None:
        return None

    @staticmethod
    def stop() -> bool:
        return False


@dataclass
class RunHooks:
    """What the caller sees of a run. Called on rank 0 only (``should_stop`` is broadcast)."""

    on_progress: Callable[[ProgressEvent], None] = _NullHook.progress
    should_stop: Callable[[], bool] = _NullHook.stop
    on_checkpoint: Callable[[Path, int], None] | None = None
    on_health: Callable[[dict[str, Any]], None] | None = None


@dataclass
class RunInputs:
    """The local inputs of a run (see :func:`adapt` for each)."""

    images_dir: Path
    class_names: list[str]
    output_dir: Path
    base_model: BaseModelSpec
    templates: list[str]
    eval_dir: Path | None
    resume: bool
    prepared_cache: Path | None = None


@dataclass
class TrainRun:
    """Everything a run owns between phases: data, model, optimizer, schedule and loop state."""

    cfg: MustConfig
    inputs: RunInputs
    dist: DistContext
    device: torch.device
    amp_dtype: torch.dtype | None
    scan: ScanResult | None  # a prepared dataset: None until final_scan() (after its pass)
    layout: BatchLayout
    steps_per_epoch: int
    total_steps: int
    epochs: int
    model: MustModel
    student: torch.nn.Module  # the forward path: DDP wrapper under torchrun, else ``model``
    teacher: torch.nn.Module
    ema: EmaUpdater
    optimizer: torch.optim.Optimizer
    masks: MaskGenerator
    preprocess: Preprocess
    model_cfg: dict[str, Any]
    identity: dict[str, Any]
    checkpointer: ckpt.AsyncCheckpointer
    t_start: float
    resuming: bool
    prepared: PreparedDataset | None
    preparation: Preparation | None  # rank 0's running preparation pass, if it started one
    data_stats: dict[str, Any]
    step: int = 0
    fair_state: torch.Tensor | None = None
    fair_prior: torch.Tensor | None = None  # the fairness target prior on the device; None: uniform
    threshold: AdaptiveThreshold | None = None  # conf_threshold_mode="adaptive": its running state
    metrics: dict[str, Any] = field(default_factory=dict)
    history: list[dict[str, Any]] = field(default_factory=list)
    eval_items: list[tuple[Path, int]] | None = None
    resumed_from_step: int | None = None
    probe: Probe | None = None  # label-free health probe (None: probe_samples = 0)
    # the student view's recipe (crop_scale, randaug_num_ops/_magnitude, hflip, geometric), resolved
    # from the config and the label-free rules (augment.choose_recipe)
    augmentation: dict[str, Any] = field(default_factory=dict)
    health: list[dict[str, Any]] = field(default_factory=list)  # one entry per health interval
    zero_shot_state: dict[str, torch.Tensor] | None = None  # CPU copy, for served_model
    # the zero-shot model's (top-1 index, score) per gallery sample image, when this process
    # predicted them before training (not after a resume)
    zero_shot_top1: tuple[list[int], list[float]] | None = None
    _pixel_stats: tuple[torch.Tensor, torch.Tensor] | None = None

    @property
    def ckpt_path(self) -> Path:
        return self.inputs.output_dir / CHECKPOINT_NAME

    @property
    def n(self) -> int:
        """Images the schedule is sized for: a prepared dataset counts every file it was given (known
        before its pass ends, the same on a resumed attempt), a scan the decodable ones."""
        if self.prepared is not None:
            return self.prepared.num_candidates
        assert self.scan is not None
        return len(self.scan.files)

    def final_scan(self) -> ScanResult:
        """The usable images and skipped files, once the preparation pass (if any) has finished."""
        if self.preparation is not None:
            self.preparation.join()
            self.data_stats["prepare_seconds"] = self.preparation.seconds
        if self.scan is None:
            assert self.prepared is not None
            self.prepared.wait_complete()
            self.scan = self.prepared.scan(self.inputs.images_dir)
        return self.scan

    def unlabeled_sample(self, limit: int) -> list[Path]:
        """Up to ``limit`` decodable images, the same whenever asked: the first prepared ones (the
        preparation order is random, and they are ready first), else a seeded sample of the scan."""
        if self.prepared is not None:
            have = min(limit, self.prepared.wait_for(limit))
            return [self.inputs.images_dir / f for f in self.prepared.files[:have]]
        return gallery.sample_files(self.final_scan().files, limit, self.cfg.seed)

    def stop_preparation(self) -> None:
        """A stopped or failed run does not wait for the pass: its folder stays incomplete."""
        if self.preparation is not None:
            self.preparation.cancel()

    def autocast(self) -> contextlib.AbstractContextManager[Any]:
        return _autocast(self.device, self.amp_dtype)

    @property
    def pixel_stats(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Normalisation mean and std as [1, 3, 1, 1] tensors on the device (cached)."""
        if self._pixel_stats is None:
            shape = (1, 3, 1, 1)
            mean = torch.tensor(self.preprocess.mean, device=self.device).view(shape)
            std = torch.tensor(self.preprocess.std, device=self.device).view(shape)
            self._pixel_stats = (mean, std)
        return self._pixel_stats

    def payload(self) -> dict[str, Any]:
        """The resumable state (tensors still live: the checkpointer snapshots them)."""
        return {
            "student": self.model.state_dict(),
            "ema": self.teacher.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "step": self.step,
            "total_steps": self.total_steps,
            "fair_state": self.fair_state,
            "threshold_state": None if self.threshold is None else self.threshold.state,
            "rng": ckpt.rng_state(),
            "config": self.cfg.model_dump(mode="json"),
            "identity": self.identity,
            "metrics": self.metrics,
            "history": self.history[-1000:],
            "health": self.health[-1000:],
        }

    def save(self, *, wait: bool = False) -> None:
        """Checkpoint on rank 0; in the background unless ``wait`` (the last one of a run)."""
        if self.dist.is_main:
            self.checkpointer.save(self.payload(), self.step, wait=wait)


def adapt(
    cfg: MustConfig,
    *,
    images_dir: Path,
    class_names: list[str],
    output_dir: Path,
    base_model: BaseModelSpec,
    templates: list[str] | None = None,
    eval_dir: Path | None = None,
    resume: bool = True,
    on_progress: Callable[[ProgressEvent], None] | None = None,
    should_stop: Callable[[], bool] | None = None,
    on_checkpoint: Callable[[Path, int], None] | None = None,
    dist: DistContext | None = None,
    prepared_cache: Path | None = None,
    on_health: Callable[[dict[str, Any]], None] | None = None,
) -> AdaptationResult:
    """Adapt a CLIP zero-shot classifier to the unlabeled images in ``images_dir`` with MUST.

    Args:
        cfg: hyperparameters and runtime options.
        images_dir: local folder of unlabeled images (flat or class subfolders; names ignored).
        class_names: the K class names, in output order.
        output_dir: receives ``last.pt`` (resumable checkpoint), ``model.safetensors`` (student export),
            ``model_ema.safetensors`` (teacher export, if ``cfg.export_ema``) and ``metrics.json``.
        base_model: where the base CLIP comes from.
        templates: prompt templates with one ``{}``; default: a generic ensemble.
        eval_dir: optional labelled folder (subfolders named by class) for zero-shot vs adapted accuracy.
        resume: continue from ``output_dir/last.pt`` when it exists (EMA, optimizer, schedule and RNG
            restored).
        on_progress: called with a :class:`ProgressEvent` every ``cfg.progress_every_steps`` steps.
        should_stop: polled every step (every ``cfg.stop_check_every_steps`` under DDP); True saves a
            checkpoint and returns with status "stopped".
        on_checkpoint: called with (path, step) once each checkpoint is completely written (from the
            checkpoint thread when ``cfg.async_checkpoint``).
        dist: the process group this rank belongs to (default: one process). Every rank calls
            ``adapt`` with the same arguments; rank 0 writes the output directory.
        prepared_cache: a folder for the prepared (decoded once, resized) form of ``images_dir``:
            reused when it holds one for this model's input size, else built there first
            (:mod:`must_core.ml.prepared`). None: decode the raw files every epoch.
        on_health: called (rank 0) with each label-free health entry (:mod:`must_core.ml.health`).

    Raises:
        MustError subclasses with stable codes (dataset_empty, model_load_failed, invalid_config,
        checkpoint_invalid, training_diverged).
    """
    hooks = RunHooks(
        on_progress or _NullHook.progress, should_stop or _NullHook.stop, on_checkpoint, on_health
    )
    inputs = RunInputs(
        images_dir=images_dir,
        class_names=validate_class_names(class_names),
        output_dir=output_dir,
        base_model=base_model,
        templates=validate_templates(list(templates) if templates else list(DEFAULT_TEMPLATES)),
        eval_dir=eval_dir,
        resume=resume,
        prepared_cache=prepared_cache,
    )
    run = prepare(cfg, inputs, dist or DistContext(), hooks)
    try:
        if run.resuming:
            restore(run)
        evaluate_zero_shot(run)
        spot_check(run, "zero_shot")
        stopped = train_steps(run, hooks)
        return finalize(run, stopped, hooks)
    except BaseException:
        run.stop_preparation()
        raise
    finally:
        run.checkpointer.close()


# ---- phase 1: prepare --------------------------------------------------------------------------------
def prepare(cfg: MustConfig, inputs: RunInputs, dist: DistContext, hooks: RunHooks) -> TrainRun:
    """Scan the data, size the schedule, build student/teacher/optimizer at the zero-shot init."""
    t_start = time.monotonic()
    apply_threads(cfg)
    device = rank_device(dist, select_device(cfg))
    if dist.is_main:
        inputs.output_dir.mkdir(parents=True, exist_ok=True)
    # The data first: an empty or undecodable dataset fails before any model is built.
    data = _open_data(cfg, inputs, dist, base_image_size(inputs.base_model))
    try:
        return _build_run(cfg, inputs, dist, hooks, data, device, t_start)
    except BaseException:
        if data.preparation is not None:
            data.preparation.cancel()
        raise


def _build_run(
    cfg: MustConfig,
    inputs: RunInputs,
    dist: DistContext,
    hooks: RunHooks,
    data: RunData,
    device: torch.device,
    t_start: float,
) -> TrainRun:
    """Size the schedule; build student, teacher and optimizer at the zero-shot init."""
    n = data.prepared.num_candidates if data.prepared is not None else len(data.files())
    cfg, layout = _fit_batch(cfg, n, dist.world_size)
    steps_per_epoch = n // layout.global_batch
    total_steps = max(cfg.epochs * steps_per_epoch, cfg.min_steps)

    # Seed first: random-weight bases (tests, benchmarks) and the mask-token init are then reproducible.
    torch.manual_seed(cfg.seed)
    base = load_base_model(inputs.base_model)
    base.clip.to(device)  # the class prompts are encoded on the training device, in batches
    model = build_must_model(
        base, inputs.class_names, inputs.templates, logit_scale=cfg.logit_scale
    ).cpu()
    preprocess, model_cfg = base.preprocess, base.model_cfg
    del base  # drop the text tower (spec §1.1.6)
    if device.type == "cuda":
        torch.cuda.empty_cache()
    resuming = _resuming(inputs, dist, device)
    # A resumed run loads the trained token from the checkpoint: no need to decode images for it.
    if cfg.mask_token_init == "data_mean" and cfg.mask_ratio > 0 and not resuming:  # noqa: S105
        _init_mask_token(model, data.prepared or data.files(), preprocess)
    masks = MaskGenerator(
        model.image_size,
        resolve_mask_patch_size(model, cfg.mask_patch_size),
        model.patch_size,
        cfg.mask_ratio,
    )
    if cfg.grad_checkpointing:
        model.visual.set_grad_checkpointing(True)
    model.to(device)
    amp_dtype = autocast_dtype(cfg, device)
    # Before any update (and before a resume loads trained weights): the zero-shot reference.
    probe = _build_probe(cfg, model, data.prepared or data.files(), preprocess, device, amp_dtype)
    augmentation = choose_recipe(
        cfg, model, probe, device, functools.partial(_autocast, device, amp_dtype), preprocess
    )
    _logger.info("augmentation: %s", augmentation)
    zero_shot_state = (
        {k: v.detach().cpu().clone() for k, v in model.state_dict().items()}
        if cfg.served_model in ("auto", "zero_shot") and dist.is_main
        else None
    )
    student = _wrap_ddp(model, dist, device)  # DDP broadcasts rank 0's weights to every rank
    teacher = make_teacher(model)
    optimizer = build_optimizer(
        model,
        model.num_layers,
        weight_decay=cfg.weight_decay,
        layer_decay=cfg.layer_decay,
        betas=cfg.betas,
        eps=cfg.eps,
        fused=device.type == "cuda",
    )
    identity = {
        "class_names": inputs.class_names,
        "templates": inputs.templates,
        "base_model": inputs.base_model.model_dump(),
        "num_images": n,
    }
    return TrainRun(
        cfg=cfg,
        inputs=inputs,
        dist=dist,
        device=device,
        amp_dtype=amp_dtype,
        scan=data.scan,
        layout=layout,
        steps_per_epoch=steps_per_epoch,
        total_steps=total_steps,
        epochs=math.ceil(total_steps / steps_per_epoch),
        model=model,
        student=student,
        teacher=teacher,
        ema=EmaUpdater(teacher, model),
        optimizer=optimizer,
        masks=masks,
        preprocess=preprocess,
        model_cfg=model_cfg,
        identity=identity,
        checkpointer=ckpt.AsyncCheckpointer(
            inputs.output_dir / CHECKPOINT_NAME,
            on_written=hooks.on_checkpoint,
            background=cfg.async_checkpoint,
        ),
        t_start=t_start,
        resuming=resuming,
        prepared=data.prepared,
        preparation=data.preparation,
        data_stats=data.stats,
        probe=probe,
        augmentation=augmentation,
        metrics={"augmentation": augmentation},
        zero_shot_state=zero_shot_state,
        fair_prior=_fair_prior(cfg, probe, inputs.class_names, device),
        threshold=(
            AdaptiveThreshold.start(
                len(inputs.class_names), cfg.adaptive_threshold_momentum, device
            )
            if cfg.conf_threshold_mode == "adaptive"
            else None
        ),
    )


def _build_probe(
    cfg: MustConfig,
    model: MustModel,
    source: list[Path] | PreparedDataset,
    preprocess: Preprocess,
    device: torch.device,
    amp_dtype: torch.dtype | None,
) -> Probe | None:
    """The health probe: up to ``probe_samples`` unlabeled images and their zero-shot predictions."""
    if cfg.probe_samples == 0:
        return None

    def load(i: int) -> Any:
        return source.load(i) if isinstance(source, PreparedDataset) else load_image(source[i])

    # a prepared dataset may still be growing: its first images are a random sample, ready first
    n = (
        min(cfg.probe_samples, source.wait_for(cfg.probe_samples))
        if isinstance(source, PreparedDataset)
        else len(source)
    )
    images = sample_images(load, n, cfg.probe_samples)
    if not images:
        return None
    tf = eval_transform(preprocess)
    x = torch.stack([tf(img) for img in images])
    probs = predict_probs(
        model, x, device, cfg.eval_batch_size, lambda: _autocast(device, amp_dtype)
    )
    return Probe(x=x, zero_shot_probs=probs, images=images)


def _fair_prior(
    cfg: MustConfig, probe: Probe | None, class_names: list[str], device: torch.device
) -> torch.Tensor | None:
    """The fairness target prior: None (uniform) or the EM estimate from the probe."""
    if cfg.fair_prior == "uniform":
        return None
    if probe is None:
        raise InvalidConfigError('fair_prior="estimated" needs probe_samples > 0')
    prior = estimate_prior(probe.zero_shot_probs)
    _logger.info("estimated class prior: %s", dict(zip(class_names, prior.tolist(), strict=True)))
    return prior.to(device)


@dataclass
class RunData:
    """The training images: a scan of the raw files, or a prepared dataset (perhaps still growing)."""

    scan: ScanResult | None
    prepared: PreparedDataset | None
    preparation: Preparation | None
    stats: dict[str, Any]

    def files(self) -> list[Path]:
        assert self.scan is not None
        return self.scan.files


def _open_data(
    cfg: MustConfig, inputs: RunInputs, dist: DistContext, image_size: int | None
) -> RunData:
    """A plain scan without a cache; else the prepared dataset, reused from the cache or prepared now
    by rank 0 in the background: training starts once the first images are ready."""
    cache = inputs.prepared_cache
    if cache is None or image_size is None:
        scan = scan_images(inputs.images_dir)
        require_images(scan, inputs.images_dir)
        return RunData(scan, None, None, {"prepared": False})
    folder = prepared_dir(cache, short_side_for(image_size))
    t0 = time.monotonic()
    prepared = open_prepared(folder)
    preparation = None
    if prepared is None and dist.is_main:
        workers = cfg.prepare_workers or os.cpu_count() or 1
        _logger.info("preparing the dataset (%d processes) into %s", workers, folder)
        preparation = Preparation(inputs.images_dir, folder, short_side_for(image_size), workers)
    dist.barrier()  # the other ranks read what rank 0 writes (a shared folder on one node)
    reused = prepared is not None
    stats: dict[str, Any] = {"prepared": True, "reused": reused, "prepare_seconds": 0.0}
    try:
        prepared = prepared or open_prepared(folder, partial=True)
        if prepared is None:
            raise DatasetError(f"the prepared dataset {folder} is missing on rank {dist.rank}")
        if prepared.wait_for(1) == 0:  # the pass is over and nothing decoded
            require_images(prepared.scan(inputs.images_dir), inputs.images_dir)
    except BaseException:
        if preparation is not None:
            preparation.cancel()
        raise
    stats["short_side"] = prepared.short_side
    stats["first_images_seconds"] = round(time.monotonic() - t0, 3)
    return RunData(None, prepared, preparation, stats)  # the file list is built at the end


def _resuming(inputs: RunInputs, dist: DistContext, device: torch.device) -> bool:
    """Whether every rank resumes: they must agree, or their weights and steps would diverge."""
    has = inputs.resume and (inputs.output_dir / CHECKPOINT_NAME).exists()
    some, not_all = dist.any(has, device), dist.any(not has, device)
    if some and not_all:
        raise CheckpointError(
            f"{inputs.output_dir / CHECKPOINT_NAME} exists on some ranks only: every node needs it"
        )
    return has


def _fit_batch(cfg: MustConfig, n: int, world_size: int) -> tuple[MustConfig, BatchLayout]:
    """The global batch split over ranks and micro-batches; smaller datasets shrink the batch."""
    if n < world_size:
        raise EmptyDatasetError(f"{n} images cannot feed {world_size} training processes")
    batch, micro = cfg.batch_size, cfg.micro_batch_size
    if n < batch:
        batch = n // world_size * world_size
        _logger.warning(
            "only %d images: batch size reduced from %d to %d", n, cfg.batch_size, batch
        )
        cfg = cfg.model_copy(update={"batch_size": batch})
        if micro is not None:  # the largest micro-batch that still divides the shrunk share
            micro = math.gcd(batch // world_size, micro)
    return cfg, batch_layout(batch, world_size, micro)


def _wrap_ddp(model: MustModel, dist: DistContext, device: torch.device) -> torch.nn.Module:
    if not dist.enabled:
        return model
    ids = [device.index] if device.type == "cuda" else None
    return DistributedDataParallel(model, device_ids=ids, broadcast_buffers=False)


# ---- phase 2: restore --------------------------------------------------------------------------------
def restore(run: TrainRun) -> None:
    """Continue from ``last.pt``: weights, EMA, optimizer, step, fairness state, metrics, RNG."""
    state = ckpt.load_training_checkpoint(run.ckpt_path)
    for key in ("class_names", "templates", "base_model"):
        if state["identity"].get(key) != run.identity[key]:
            raise CheckpointError(
                f"checkpoint {run.ckpt_path} belongs to a different run ({key} differs); "
                "use another output directory or resume=False"
            )
    conflicts = resume_conflicts(dict(state.get("config") or {}), run.cfg)
    if conflicts:  # the schedule, losses or data would silently change mid-run
        raise CheckpointError(
            f"checkpoint {run.ckpt_path} was written with other hyperparameters: "
            + "; ".join(f"{k}: {a!r} there, {b!r} now" for k, (a, b) in sorted(conflicts.items()))
            + ". Resume with the same ones, or start over (resume=False / another output directory)"
        )
    run.model.load_state_dict(state["student"])
    run.teacher.load_state_dict(state["ema"])  # the reference forgot this (spec §10.3)
    run.optimizer.load_state_dict(state["optimizer"])
    run.step = run.resumed_from_step = int(state["step"])
    fair_state = state.get("fair_state")
    run.fair_state = fair_state.to(run.device) if fair_state is not None else None
    threshold_state = state.get("threshold_state")
    if run.threshold is not None and threshold_state is not None:
        run.threshold.state = threshold_state.to(run.device)
    run.metrics = dict(state.get("metrics", {}))
    run.history = list(state.get("history", []))
    run.health = list(state.get("health", []))
    ckpt.set_rng_state(state["rng"])
    if state["identity"].get("num_images") != run.n:
        _logger.warning(
            "dataset changed since the checkpoint (%s → %d images); continuing",
            state["identity"].get("num_images"),
            run.n,
        )
    _logger.info("resumed from %s at step %d/%d", run.ckpt_path, run.step, run.total_steps)


# ---- evaluation (rank 0; the other ranks wait) ----------------------------------------------------------
def evaluate_zero_shot(run: TrainRun) -> None:
    """Zero-shot accuracy on the labelled eval folder, once per run (before any update)."""
    if run.inputs.eval_dir is None:
        return
    run.eval_items, eval_scan = scan_labelled(run.inputs.eval_dir, run.inputs.class_names)
    run.metrics["eval_num_images"] = len(run.eval_items)
    run.metrics["eval_num_skipped"] = eval_scan.num_skipped
    if "zero_shot" not in run.metrics and run.dist.is_main:
        run.metrics["zero_shot"] = _evaluate(run, run.model)
    run.dist.barrier()


def spot_check(run: TrainRun, which: Literal["zero_shot", "adapted"]) -> None:
    """Predicted-class histogram of the fixed unlabeled sample (:mod:`must_core.ml.gallery`) under
    the zero-shot model (before any update, once per run) or the adapted student and teacher (at
    the end, with the sample gallery of the served weights written to the output folder). Rank 0;
    the others wait."""
    cfg = run.cfg
    done = which in run.metrics.get("predicted_classes", {})
    if cfg.gallery_max_images and run.dist.is_main and (which == "adapted" or not done):
        files = run.unlabeled_sample(cfg.gallery_max_images)
        hist = run.metrics.setdefault("predicted_classes", {"num_images": len(files)})
        if which == "zero_shot":
            run.zero_shot_top1 = _top1(run, run.model, files)
            hist["zero_shot"] = gallery.class_histogram(
                run.zero_shot_top1[0], run.inputs.class_names
            )
        else:
            _spot_check_adapted(run, files, hist)
    run.dist.barrier()


def _spot_check_adapted(run: TrainRun, files: list[Path], hist: dict[str, Any]) -> None:
    """The student's and the teacher's histograms; the gallery of the served weights."""
    top1 = {"student": _top1(run, run.model, files), "ema": _top1(run, run.teacher, files)}
    hist["adapted"] = gallery.class_histogram(top1["student"][0], run.inputs.class_names)
    hist["adapted_ema"] = gallery.class_histogram(top1["ema"][0], run.inputs.class_names)
    served = str(run.metrics.get("served_model", {}).get("weights", "student"))
    if served == "zero_shot" and run.zero_shot_state is None:
        served = "student"  # not kept (another served_model); cannot happen under "auto"
    if served == "zero_shot":
        # the start-of-run pass predicted the sample already, unless this run was resumed since
        top1["zero_shot"] = run.zero_shot_top1 or _top1(run, _zero_shot_copy(run), files)
    _write_gallery(run, files, *top1[served])
    run.metrics["gallery_weights"] = served


def _zero_shot_copy(run: TrainRun) -> torch.nn.Module:
    """The model with its zero-shot weights, beside the trained one (for the served gallery)."""
    net = copy.deepcopy(run.model)
    assert run.zero_shot_state is not None
    net.load_state_dict(run.zero_shot_state)
    return net.eval()


def _top1(run: TrainRun, net: torch.nn.Module, files: list[Path]) -> tuple[list[int], list[float]]:
    return gallery.predict_top1(
        net,
        files,
        run.preprocess,
        device=run.device,
        batch_size=run.cfg.eval_batch_size,
        amp_dtype=run.amp_dtype,
        num_workers=_loader_workers(run.cfg, run.device),
    )


def _write_gallery(run: TrainRun, files: list[Path], idx: list[int], scores: list[float]) -> None:
    cfg = run.cfg
    samples = gallery.build_gallery(
        files,
        idx,
        scores,
        run.inputs.class_names,
        root=run.inputs.images_dir,
        per_class=cfg.gallery_per_class,
        thumb_px=cfg.gallery_thumb_px,
    )
    path = run.inputs.output_dir / gallery.GALLERY_FILE
    atomic_write(path, lambda tmp: tmp.write_text(json.dumps(samples)))


def _evaluate(run: TrainRun, net: torch.nn.Module) -> dict[str, Any]:
    assert run.eval_items is not None
    res = evaluate_folder(
        net,
        run.eval_items,
        run.preprocess,
        num_classes=run.model.num_classes,
        class_names=run.inputs.class_names,
        device=run.device,
        batch_size=run.cfg.eval_batch_size,
        amp_dtype=run.amp_dtype,
        num_workers=_loader_workers(run.cfg, run.device),
    )
    return res.to_dict()


# ---- phase 3: train steps ---------------------------------------------------------------------------
def _make_loader(run: TrainRun) -> DataLoader[Any]:
    cfg, aug = run.cfg, run.augmentation
    sampler: Sampler[SampleKey]
    source: ImageSource
    if run.prepared is not None:
        source = run.prepared
        sampler = PreparedOrderSampler(
            run.prepared,
            run.layout.global_batch,
            cfg.seed,
            run.step,
            run.total_steps,
            window=CHUNK,
            rank=run.dist.rank,
            world_size=run.dist.world_size,
        )
    else:
        source = RawImages(run.final_scan().files, draft_size=run.preprocess.image_size * 2)
        start_epoch, start_in_epoch = divmod(run.step, run.steps_per_epoch)
        sampler = EpochSampler(
            run.n,
            run.layout.global_batch,
            cfg.seed,
            start_epoch,
            start_in_epoch,
            run.epochs,
            rank=run.dist.rank,
            world_size=run.dist.world_size,
        )
    dataset = MustTrainDataset(
        source,
        WeakView(run.preprocess.image_size),
        StrongView(
            run.preprocess,
            tuple(aug["crop_scale"]),
            aug["randaug_num_ops"],
            aug["randaug_magnitude"],
            cfg.randaug_magnitude_std,
            hflip=aug["hflip"],
            geometric=aug["geometric"],
        ),
        run.masks,
        seed=cfg.seed,
    )
    workers = _loader_workers(cfg, run.device)
    return DataLoader(
        dataset,
        batch_size=run.layout.micro_batch,
        sampler=sampler,
        drop_last=True,
        num_workers=workers,
        pin_memory=run.device.type == "cuda",
        persistent_workers=workers > 0,
        prefetch_factor=4 if workers > 0 else None,
    )


def _next_global_batch(run: TrainRun, batches: Iterator[Any]) -> list[MicroBatch] | None:
    """The rank's ``accum_steps`` micro-batches of the next step, on the device (None: exhausted)."""
    micro = []
    for _ in range(run.layout.accum_steps):
        try:
            weak, strong, mask = next(batches)
        except StopIteration:  # sampler exhausted (cannot happen unless the dataset shrank)
            return None
        weak, strong, mask = (t.to(run.device, non_blocking=True) for t in (weak, strong, mask))
        mean, std = run.pixel_stats
        micro.append(
            (normalize_on_device(weak, mean, std), normalize_on_device(strong, mean, std), mask)
        )
    return micro


def _stop_requested(run: TrainRun, hooks: RunHooks) -> bool:
    """Single process: every step. DDP: rank 0 decides every few steps and every rank follows."""
    if not run.dist.enabled:
        return hooks.should_stop()
    if run.step % run.cfg.stop_check_every_steps:
        return False
    return run.dist.any(run.dist.is_main and hooks.should_stop(), run.device)


def train_steps(run: TrainRun, hooks: RunHooks) -> bool:
    """Run optimizer steps until the schedule ends or a stop is requested. Returns True if stopped."""
    cfg = run.cfg
    base_lr, final_lr = scaled_lrs(cfg.lr, cfg.min_lr, run.layout.global_batch)
    d_init, d_final, warm = ema_schedule_params(cfg, run.total_steps)
    step_fn = GlobalStep(
        student=run.student,
        model=run.model,
        teacher=run.teacher,
        layout=run.layout,
        dist=run.dist,
        conf_threshold=cfg.conf_threshold,
        weights=LossWeights(fair=cfg.fair_weight, mim=cfg.mim_weight, align=cfg.align_weight),
        moving_average_fairness=run.model.num_classes >= cfg.fair_moving_average_min_classes,
        autocast=run.autocast,
        running_keep=(
            running_keep(run.layout.global_batch, cfg.fair_marginal_samples)
            if cfg.fair_marginal == "running"
            else None
        ),
        prior=run.fair_prior,
        threshold=run.threshold,
        **_compiled_forwards(run),
    )
    loader = _make_loader(run)
    batches: Iterator[Any] = iter(loader)
    meter = _IntervalMeter(run)
    run.model.train()
    stopped = False
    while run.step < run.total_steps:
        if _stop_requested(run, hooks):
            stopped = True
            break
        micro = _next_global_batch(run, batches)
        if micro is None:
            break
        if run.step % run.steps_per_epoch == 0 and cfg.fair_marginal == "reference":
            run.fair_state = None  # the reference resets the moving average every epoch
        lr_now = cosine_lr(run.step, run.total_steps, base_lr, final_lr)
        set_lr(run.optimizer, lr_now)
        d_now = ema_decay(run.step, d_init, d_final, warm)
        run.optimizer.zero_grad(set_to_none=True)
        shares, run.fair_state = step_fn(micro, run.fair_state)
        run.optimizer.step()
        run.ema.update(d_now)
        run.step += 1
        meter.add(shares)
        last = run.step == run.total_steps
        if run.step % cfg.progress_every_steps == 0 or last:
            meter.emit(hooks, lr_now, d_now)
        if run.step % cfg.health_every_steps == 0 and not last:
            record_health(run, hooks)
        if run.step % cfg.checkpoint_every_steps == 0 and not last:
            meter.require_finite()  # a diverged run must not overwrite the last good checkpoint
            run.save()
    meter.require_finite()  # the steps since the last progress event, before the last checkpoint
    del loader, batches
    return stopped or run.step < run.total_steps


def _compiled_forwards(run: TrainRun) -> dict[str, Any]:
    mode = run.cfg.torch_compile
    if mode == "off" or (mode == "auto" and run.device.type != "cuda"):
        return {}
    return {
        "student_forward": CompiledOrEager(run.student),
        "teacher_forward": CompiledOrEager(run.teacher),
    }


class _IntervalMeter:
    """Loss sums kept on the device; one all-reduce and one host sync per progress interval."""

    def __init__(self, run: TrainRun) -> None:
        self.run = run
        self.acc = torch.zeros(len(LOSS_KEYS), device=run.device)
        self.steps = 0
        self.t0 = time.monotonic()

    def add(self, shares: torch.Tensor) -> None:
        with torch.no_grad():
            self.acc += shares
        self.steps += 1

    def _values(self) -> list[float]:
        """Interval means, all-reduced; raises when any is not finite (the run diverged)."""
        run = self.run
        values: list[float] = (run.dist.all_reduce_sum(self.acc) / self.steps).tolist()
        if not all(math.isfinite(v) for v in values):
            raise TrainingDivergedError(
                f"non-finite loss by step {run.step}: "
                + ", ".join(f"{k}={v}" for k, v in zip(LOSS_KEYS, values, strict=True))
            )
        return values

    def require_finite(self) -> None:
        """Check the steps since the last event (one host sync); every rank calls it."""
        if self.steps:
            self._values()

    def emit(self, hooks: RunHooks, lr_now: float, d_now: float) -> None:
        run = self.run
        values = self._values()
        now = time.monotonic()
        ips = self.steps * run.layout.global_batch / max(now - self.t0, 1e-9)
        event = ProgressEvent(
            step=run.step,
            total_steps=run.total_steps,
            epoch=(run.step - 1) // run.steps_per_epoch,
            losses=dict(zip(LOSS_KEYS[:5], values[:5], strict=True)),
            conf_ratio=values[5],
            lr=lr_now,
            ema_decay=d_now,
            images_per_second=ips,
            eta_seconds=(run.total_steps - run.step) * run.layout.global_batch / max(ips, 1e-9),
        )
        run.history.append(event.to_dict())
        run.metrics["train"] = {**event.losses, "conf_ratio": event.conf_ratio}
        if run.dist.is_main:
            hooks.on_progress(event)
        self.acc.zero_()
        self.steps = 0
        self.t0 = now


def _health_entry(run: TrainRun, net: torch.nn.Module, which: str) -> dict[str, Any] | None:
    """Health of ``net`` (the student or the teacher) on the probe, with the teacher's confidence."""
    probe = run.probe
    if probe is None:
        return None
    bs = run.cfg.eval_batch_size
    probs = predict_probs(net, probe.x, run.device, bs, run.autocast)
    teacher = (
        probs
        if net is run.teacher
        else predict_probs(run.teacher, probe.x, run.device, bs, run.autocast)
    )
    prior = run.fair_prior
    k = run.model.num_classes
    h_prior = entropy(prior.cpu()) if prior is not None else math.log(k)
    entry = snapshot(
        probe,
        probs,
        teacher,
        class_names=run.inputs.class_names,
        conf_threshold=run.cfg.conf_threshold,
        prior_entropy=h_prior,
        step=run.step,
    )
    return {"kind": "health", "model": which, **entry}


def record_health(run: TrainRun, hooks: RunHooks) -> dict[str, Any] | None:
    """One health entry for the student (rank 0; the other ranks go on to the next collective)."""
    if not run.dist.is_main:
        return None
    entry = _health_entry(run, run.model, "student")
    if entry is None:
        return None
    entry["warnings"] = health_warnings(entry, run.model.num_classes)
    run.health.append(entry)
    run.metrics["health"] = entry
    if hooks.on_health is not None:
        hooks.on_health(entry)
    return entry


def choose_served(run: TrainRun, student: dict[str, Any] | None) -> tuple[str, str, list[Any]]:
    """(weights served as the model, why, warnings) under ``cfg.served_model`` (label-free)."""
    k = run.model.num_classes
    warnings = list(student["warnings"]) if student else []
    choice = run.cfg.served_model
    if choice != "auto":
        return choice, "requested (served_model)", warnings
    if student is None or not warnings:
        return "student", "the student passed the health rule", warnings
    ema = _health_entry(run, run.teacher, "ema")
    ema_warn = health_warnings(ema, k, "EMA teacher") if ema else []
    if ema is not None:
        run.metrics["health_ema"] = {**ema, "warnings": ema_warn}
    if not ema_warn:
        return "ema", "the student was flagged, the EMA teacher was not", warnings
    warnings += ema_warn
    if run.zero_shot_state is None:
        return "student", "flagged, but no zero-shot copy was kept", warnings
    if float(student["zero_shot_entropy_ratio"]) < COLLAPSE_ENTROPY_RATIO:
        return "student", "flagged, but the zero-shot predictions are as concentrated", warnings
    return "zero_shot", "both the student and the EMA teacher were flagged", warnings


# ---- phase 4: finalize --------------------------------------------------------------------------------
def finalize(run: TrainRun, stopped: bool, hooks: RunHooks | None = None) -> AdaptationResult:
    """Stopped: save and return. Completed: final eval, last checkpoint, exports (rank 0)."""
    if stopped:
        run.stop_preparation()
        run.save(wait=True)
        _logger.info(
            "stopped at step %d/%d; checkpoint %s", run.step, run.total_steps, run.ckpt_path
        )
        return _result(run, "stopped", {})
    run.model.eval()
    if run.eval_items is not None and run.dist.is_main:
        for name, net in (("adapted", run.model), ("adapted_ema", run.teacher)):
            run.metrics[name] = _evaluate(run, net)
    run.metrics["total_steps"] = run.total_steps
    scan = run.final_scan()
    run.metrics["num_images"] = len(scan.files)
    run.metrics["num_skipped"] = scan.num_skipped
    run.metrics["dataset_cache"] = run.data_stats
    entry = run.health[-1] if run.health and run.health[-1]["step"] == run.step else None
    entry = entry or record_health(run, hooks or RunHooks())
    if run.dist.is_main:
        served, why, warnings = choose_served(run, entry)
        run.metrics["served_model"] = {"weights": served, "reason": why}
        run.metrics["warnings"] = warnings
        for w in warnings:
            _logger.warning("run health: %s", w["message"])
    spot_check(run, "adapted")
    run.metrics["train_seconds"] = time.monotonic() - run.t_start
    run.save(wait=True)
    paths = _export(run) if run.dist.is_main else {}
    run.dist.barrier()
    return _result(run, "completed", paths)


def _export(run: TrainRun) -> dict[str, Path]:
    cfg, out = run.cfg, run.inputs.output_dir
    extra = {
        "config": cfg.model_dump(mode="json"),
        "base_model": run.inputs.base_model.model_dump(),
        "templates": run.inputs.templates,
        "steps": run.step,
    }
    served = str(run.metrics.get("served_model", {}).get("weights", "student"))
    states = {"student": run.model.state_dict(), "ema": run.teacher.state_dict()}
    if run.zero_shot_state is not None:
        states["zero_shot"] = run.zero_shot_state
    exports: list[tuple[str, dict[str, torch.Tensor], str]] = [
        (
            served if served in states else "student",
            states[served if served in states else "student"],
            MODEL_NAME,
        )
    ]
    if cfg.export_ema:
        exports.append(("ema", states["ema"], EMA_MODEL_NAME))
    paths: dict[str, Path] = {}
    for which, state, filename in exports:
        key = "student" if filename == MODEL_NAME else which
        paths[key] = out / filename
        ckpt.export_classifier(
            paths[key],
            state,
            class_names=run.inputs.class_names,
            preprocess=run.preprocess.to_dict(),
            model_cfg=run.model_cfg,
            logit_scale=cfg.logit_scale,
            extra={**extra, "weights": which},
        )
    history = run.history
    atomic_write(
        out / "metrics.json",
        lambda tmp: tmp.write_text(
            json.dumps({"metrics": run.metrics, "history": history, "health": run.health}, indent=2)
        ),
    )
    return paths


def _result(
    run: TrainRun, status: Literal["completed", "stopped"], paths: dict[str, Path]
) -> AdaptationResult:
    scan = run.scan or ScanResult([])  # a stopped run may not have finished preparing its data
    return AdaptationResult(
        status=status,
        step=run.step,
        total_steps=run.total_steps,
        output_dir=run.inputs.output_dir,
        checkpoint_path=run.ckpt_path,
        model_path=paths.get("student"),
        ema_model_path=paths.get("ema"),
        num_images=len(scan.files),
        num_skipped=scan.num_skipped,
        skipped=scan.skipped,
        metrics=run.metrics,
        history=run.history,
        resumed_from_step=run.resumed_from_step,
    )
