"""The MUST training loop (spec §0): one process, resumable, label-free, with progress/stop hooks.

Entry point: :func:`adapt`. It takes local paths only (the service downloads datasets and base weights
first) and two plain callables, ``on_progress(ProgressEvent)`` and ``should_stop()``, so it needs no
queue or web code.
"""

from __future__ import annotations

import contextlib
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
from torch.utils.data import DataLoader

from must_core.errors import CheckpointError, DatasetError, TrainingDivergedError
from must_core.fsutil import atomic_write
from must_core.ml import checkpoint as ckpt
from must_core.ml.config import BaseModelSpec, MustConfig, ema_schedule_params
from must_core.ml.data import (
    EpochSampler,
    MustTrainDataset,
    eval_transform,
    load_image,
    require_images,
    scan_images,
    strong_transform,
    weak_transform,
)
from must_core.ml.ema import EmaUpdater, ema_decay, make_teacher
from must_core.ml.evaluate import EvalResult, evaluate_folder
from must_core.ml.losses import (
    LossWeights,
    align_loss,
    fairness_batch,
    fairness_moving_average,
    mim_loss,
    self_training_loss,
    total_loss,
)
from must_core.ml.masking import MaskGenerator
from must_core.ml.model import (
    MaskedOutput,
    MustModel,
    Preprocess,
    build_must_model,
    load_base_model,
    resolve_mask_patch_size,
)
from must_core.ml.optim import build_optimizer, cosine_lr, scaled_lrs, set_lr
from must_core.ml.templates import DEFAULT_TEMPLATES, validate_class_names, validate_templates

_logger = logging.getLogger(__name__)

CHECKPOINT_NAME = "last.pt"
MODEL_NAME = "model.safetensors"
EMA_MODEL_NAME = "model_ema.safetensors"
LOSS_KEYS = ("loss", "st", "fair", "mim", "align", "conf_ratio")


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


def must_step_losses(
    student: MustModel,
    teacher: torch.nn.Module,
    weak: torch.Tensor,
    strong: torch.Tensor,
    mask: torch.Tensor,
    *,
    conf_threshold: float,
    weights: LossWeights,
    moving_average_fairness: bool,
    fair_state: torch.Tensor | None,
) -> tuple[torch.Tensor, dict[str, torch.Tensor], torch.Tensor | None]:
    """One MUST objective evaluation (spec §0, §3). Returns (loss, detached parts, fairness state).

    The teacher sees the unmasked weak view under inference mode; the student sees the masked strong
    view. No host sync: the confident set is a weight, not a boolean index.
    """
    with torch.inference_mode():
        probs = teacher(weak).float().softmax(-1)
        conf, pseudo = probs.max(-1)
        confident = conf > conf_threshold  # strict '>' (spec §3.1)
    pseudo, confident = pseudo.clone(), confident.clone()  # plain tensors outside inference mode

    out = student(strong, mask)
    assert isinstance(out, MaskedOutput)
    l_st = self_training_loss(out.logits, pseudo, confident)
    p_mean = out.logits.float().softmax(-1).mean(0)
    if moving_average_fairness:
        l_fair, fair_state = fairness_moving_average(p_mean, fair_state)
    else:
        l_fair = fairness_batch(p_mean)
    l_mim = mim_loss(out.recon, strong, out.mask_pix)
    l_align = align_loss(out.align, out.token_mask)
    loss = total_loss(l_st, l_fair, l_mim, l_align, weights)
    parts = {
        "loss": loss.detach(),
        "st": l_st.detach(),
        "fair": l_fair.detach(),
        "mim": l_mim.detach(),
        "align": l_align.detach(),
        "conf_ratio": confident.float().mean(),
    }
    return loss, parts, fair_state


def _init_mask_token(model: MustModel, files: list[Path], preprocess: Preprocess) -> None:
    """Mask token := mean patch embedding of up to 256 evenly spaced unlabeled images (eval view).

    Files that fail to decode are skipped here (the loader counts and reports them later); with no
    decodable file the random init stays.
    """
    tf = eval_transform(preprocess)
    stride = max(1, len(files) // 256)
    xs = []
    for path in files[::stride][:256]:
        try:
            xs.append(tf(load_image(path)))
        except Exception as exc:  # any undecodable file is skipped, as in the loader
            _logger.debug("mask-token init skips %s: %s", path, exc)
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
    if cfg.num_workers is not None:
        return cfg.num_workers
    return min(8, max(1, (os.cpu_count() or 2) - 1)) if device.type == "cuda" else 0


class _NullHook:
    @staticmethod
    def progress(_: ProgressEvent) -> None:
        return None

    @staticmethod
    def stop() -> bool:
        return False


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
        should_stop: polled every step; True saves a checkpoint and returns with status "stopped".
        on_checkpoint: called with (path, step) after each checkpoint is atomically written.

    Raises:
        MustError subclasses with stable codes (dataset_empty, model_load_failed, invalid_config,
        checkpoint_invalid, training_diverged).
    """
    t_start = time.monotonic()
    progress = on_progress or _NullHook.progress
    stop = should_stop or _NullHook.stop
    class_names = validate_class_names(class_names)
    templates = validate_templates(list(templates) if templates else list(DEFAULT_TEMPLATES))
    apply_threads(cfg)
    device = select_device(cfg)
    amp_dtype = autocast_dtype(cfg, device)
    output_dir.mkdir(parents=True, exist_ok=True)
    ckpt_path = output_dir / CHECKPOINT_NAME

    # ---- data ------------------------------------------------------------------------------
    scan = scan_images(images_dir)
    require_images(scan, images_dir)
    n = len(scan.files)
    batch_size = min(cfg.batch_size, n)
    if batch_size < cfg.batch_size:
        _logger.warning("only %d images: batch size reduced from %d", n, cfg.batch_size)
        cfg = cfg.model_copy(update={"batch_size": batch_size})
    steps_per_epoch = n // batch_size
    total_steps = max(cfg.epochs * steps_per_epoch, cfg.min_steps)
    epochs = math.ceil(total_steps / steps_per_epoch)

    # ---- model (zero-shot init) -------------------------------------------------------------
    # Seed first: random-weight bases (tests, benchmarks) and the mask-token init are then reproducible.
    torch.manual_seed(cfg.seed)
    base = load_base_model(base_model)
    model = build_must_model(base, class_names, templates, logit_scale=cfg.logit_scale)
    preprocess, model_cfg = base.preprocess, base.model_cfg
    del base  # drop the text tower (spec §1.1.6)
    resuming = resume and ckpt_path.exists()
    # A resumed run loads the trained token from the checkpoint: no need to decode images for it.
    if cfg.mask_token_init == "data_mean" and cfg.mask_ratio > 0 and not resuming:  # noqa: S105
        _init_mask_token(model, scan.files, preprocess)
    mask_patch = resolve_mask_patch_size(model, cfg.mask_patch_size)
    masks = MaskGenerator(model.image_size, mask_patch, model.patch_size, cfg.mask_ratio)
    if cfg.grad_checkpointing:
        model.visual.set_grad_checkpointing(True)
    model.to(device)
    teacher = make_teacher(model)
    ema = EmaUpdater(teacher, model)
    optimizer = build_optimizer(
        model,
        model.num_layers,
        weight_decay=cfg.weight_decay,
        layer_decay=cfg.layer_decay,
        betas=cfg.betas,
        eps=cfg.eps,
        fused=device.type == "cuda",
    )
    base_lr, final_lr = scaled_lrs(cfg.lr, cfg.min_lr, batch_size)
    d_init, d_final, warm = ema_schedule_params(cfg, total_steps)
    weights = LossWeights(fair=cfg.fair_weight, mim=cfg.mim_weight, align=cfg.align_weight)
    use_ma_fair = model.num_classes >= cfg.fair_moving_average_min_classes

    identity = {
        "class_names": class_names,
        "templates": templates,
        "base_model": base_model.model_dump(),
        "num_images": n,
    }
    step = 0
    fair_state: torch.Tensor | None = None
    metrics: dict[str, Any] = {}
    history: list[dict[str, Any]] = []

    if resuming:
        state = ckpt.load_training_checkpoint(ckpt_path)
        for key in ("class_names", "templates", "base_model"):
            if state["identity"].get(key) != identity[key]:
                raise CheckpointError(
                    f"checkpoint {ckpt_path} belongs to a different run ({key} differs); "
                    "use another output directory or resume=False"
                )
        model.load_state_dict(state["student"])
        teacher.load_state_dict(state["ema"])  # the reference forgot this (spec §10.3)
        optimizer.load_state_dict(state["optimizer"])
        step = int(state["step"])
        fair_state = state.get("fair_state")
        if fair_state is not None:
            fair_state = fair_state.to(device)
        metrics = dict(state.get("metrics", {}))
        history = list(state.get("history", []))
        ckpt.set_rng_state(state["rng"])
        if state["identity"].get("num_images") != n:
            _logger.warning(
                "dataset changed since the checkpoint (%s → %d images); continuing",
                state["identity"].get("num_images"),
                n,
            )
        _logger.info("resumed from %s at step %d/%d", ckpt_path, step, total_steps)

    # ---- optional zero-shot eval (before any update) -------------------------------------------
    eval_items = None
    if eval_dir is not None:
        from must_core.ml.data import scan_labelled

        eval_items, eval_scan = scan_labelled(eval_dir, class_names)
        metrics["eval_num_images"] = len(eval_items)
        metrics["eval_num_skipped"] = eval_scan.num_skipped
        if "zero_shot" not in metrics:
            zs = evaluate_folder(
                model,
                eval_items,
                preprocess,
                num_classes=model.num_classes,
                device=device,
                batch_size=cfg.eval_batch_size,
                amp_dtype=amp_dtype,
                num_workers=0,
            )
            metrics["zero_shot"] = zs.to_dict()

    def save(step_now: int) -> None:
        payload = {
            "student": model.state_dict(),
            "ema": teacher.state_dict(),
            "optimizer": optimizer.state_dict(),
            "step": step_now,
            "total_steps": total_steps,
            "fair_state": fair_state,
            "rng": ckpt.rng_state(),
            "config": cfg.model_dump(mode="json"),
            "identity": identity,
            "metrics": metrics,
            "history": history[-1000:],
        }
        ckpt.save_training_checkpoint(ckpt_path, payload)
        if on_checkpoint is not None:
            on_checkpoint(ckpt_path, step_now)

    # ---- loader ----------------------------------------------------------------------------
    start_epoch, start_in_epoch = divmod(step, steps_per_epoch)
    sampler = EpochSampler(n, batch_size, cfg.seed, start_epoch, start_in_epoch, epochs)
    dataset = MustTrainDataset(
        scan.files,
        weak_transform(preprocess),
        strong_transform(
            preprocess,
            cfg.strong_crop_scale,
            cfg.randaug_num_ops,
            cfg.randaug_magnitude,
            cfg.randaug_magnitude_std,
        ),
        masks,
        seed=cfg.seed,
        draft_size=preprocess.image_size * 2,
    )
    workers = _loader_workers(cfg, device)
    loader = DataLoader(
        dataset,
        batch_size=batch_size,
        sampler=sampler,
        drop_last=True,
        num_workers=workers,
        pin_memory=device.type == "cuda",
        persistent_workers=workers > 0,
        prefetch_factor=4 if workers > 0 else None,
    )

    # ---- loop ------------------------------------------------------------------------------
    model.train()
    acc = torch.zeros(len(LOSS_KEYS), device=device)  # on-device sums: no per-step host sync
    acc_steps = 0
    interval_t0 = time.monotonic()
    stopped = False
    lr_now, d_now = base_lr, d_init
    batches: Iterator[Any] = iter(loader)
    while step < total_steps:
        if stop():
            stopped = True
            break
        try:
            weak, strong, mask = next(batches)
        except StopIteration:  # sampler exhausted (cannot happen unless the dataset shrank)
            break
        weak = weak.to(device, non_blocking=True)
        strong = strong.to(device, non_blocking=True)
        mask = mask.to(device, non_blocking=True)
        if step % steps_per_epoch == 0:
            fair_state = None  # the reference resets the moving average every epoch
        lr_now = cosine_lr(step, total_steps, base_lr, final_lr)
        set_lr(optimizer, lr_now)
        d_now = ema_decay(step, d_init, d_final, warm)

        with _autocast(device, amp_dtype):
            loss, parts, fair_state = must_step_losses(
                model,
                teacher,
                weak,
                strong,
                mask,
                conf_threshold=cfg.conf_threshold,
                weights=weights,
                moving_average_fairness=use_ma_fair,
                fair_state=fair_state,
            )

        optimizer.zero_grad(set_to_none=True)
        loss.backward()  # type: ignore[no-untyped-call]
        optimizer.step()
        ema.update(d_now)
        step += 1

        with torch.no_grad():
            acc += torch.stack([parts[k] for k in LOSS_KEYS])
        acc_steps += 1

        last = step == total_steps
        if step % cfg.progress_every_steps == 0 or last:
            values = (acc / acc_steps).tolist()  # the one host sync per interval
            if not all(math.isfinite(v) for v in values):
                raise TrainingDivergedError(
                    f"non-finite loss at step {step}: "
                    + ", ".join(f"{k}={v}" for k, v in zip(LOSS_KEYS, values, strict=True))
                )
            now = time.monotonic()
            ips = acc_steps * batch_size / max(now - interval_t0, 1e-9)
            event = ProgressEvent(
                step=step,
                total_steps=total_steps,
                epoch=(step - 1) // steps_per_epoch,
                losses=dict(zip(LOSS_KEYS[:5], values[:5], strict=True)),
                conf_ratio=values[5],
                lr=lr_now,
                ema_decay=d_now,
                images_per_second=ips,
                eta_seconds=(total_steps - step) * batch_size / max(ips, 1e-9),
            )
            history.append(event.to_dict())
            metrics["train"] = {**event.losses, "conf_ratio": event.conf_ratio}
            progress(event)
            acc.zero_()
            acc_steps = 0
            interval_t0 = now
        if step % cfg.checkpoint_every_steps == 0 and not last:
            save(step)

    del loader, batches

    def result(status: Literal["completed", "stopped"], paths: dict[str, Path]) -> AdaptationResult:
        return AdaptationResult(
            status=status,
            step=step,
            total_steps=total_steps,
            output_dir=output_dir,
            checkpoint_path=ckpt_path,
            model_path=paths.get("student"),
            ema_model_path=paths.get("ema"),
            num_images=n,
            num_skipped=scan.num_skipped,
            skipped=scan.skipped,
            metrics=metrics,
            history=history,
        )

    if stopped or step < total_steps:
        save(step)
        _logger.info("stopped at step %d/%d; checkpoint %s", step, total_steps, ckpt_path)
        return result("stopped", {})

    # ---- final eval + export ------------------------------------------------------------------
    model.eval()
    if eval_items is not None:
        for name, net in (("adapted", model), ("adapted_ema", teacher)):
            res: EvalResult = evaluate_folder(
                net,
                eval_items,
                preprocess,
                num_classes=model.num_classes,
                device=device,
                batch_size=cfg.eval_batch_size,
                amp_dtype=amp_dtype,
                num_workers=0,
            )
            metrics[name] = res.to_dict()
    metrics["total_steps"] = total_steps
    metrics["num_images"] = n
    metrics["num_skipped"] = scan.num_skipped
    metrics["train_seconds"] = time.monotonic() - t_start
    save(step)
    extra = {
        "config": cfg.model_dump(mode="json"),
        "base_model": base_model.model_dump(),
        "templates": templates,
        "steps": step,
    }
    exports: list[tuple[str, torch.nn.Module, str]] = [("student", model, MODEL_NAME)]
    if cfg.export_ema:
        exports.append(("ema", teacher, EMA_MODEL_NAME))
    paths: dict[str, Path] = {}
    for which, net, filename in exports:
        paths[which] = output_dir / filename
        ckpt.export_classifier(
            paths[which],
            net.state_dict(),
            class_names=class_names,
            preprocess=preprocess.to_dict(),
            model_cfg=model_cfg,
            logit_scale=cfg.logit_scale,
            extra={**extra, "weights": which},
        )
    atomic_write(
        output_dir / "metrics.json",
        lambda tmp: tmp.write_text(json.dumps({"metrics": metrics, "history": history}, indent=2)),
    )
    return result("completed", paths)
