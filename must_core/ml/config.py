"""One typed, validated configuration object for every MUST hyperparameter.

Defaults target an *unknown* dataset on one device (see docs/algorithm.md, "Defaults"). The reference's
per-dataset settings (spec §7) are available as named presets; a preset is applied first, then explicit
overrides.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from must_core.errors import InvalidConfigError


class BaseModelSpec(BaseModel):
    """Where the base CLIP comes from.

    Exactly one of these forms:
    - ``arch`` + ``pretrained`` tag: an open_clip architecture name; the tag downloads weights where the
      machine has internet;
    - ``arch`` + ``checkpoint``: a local checkpoint file (state dict, .pt/.bin/.safetensors);
    - ``config`` (+ ``checkpoint``): a custom open_clip model-config JSON file, registered under ``arch``
      (or the file stem) before the model is built;
    - ``arch="local-dir:/path"``: an open_clip folder with open_clip_config.json +
      open_clip_model.safetensors.
    """

    model_config = ConfigDict(frozen=True, extra="forbid")

    arch: str = Field("ViT-B-16", min_length=1, max_length=300)
    pretrained: str | None = Field(None, max_length=300)
    checkpoint: str | None = Field(None, max_length=4096)
    config: str | None = Field(None, max_length=4096)
    # OpenAI weights were trained with QuickGELU (spec §1.2); None = decide from the weights: the
    # pretrained tag's config, or for a checkpoint file / local dir its tensors and config.
    force_quick_gelu: bool | None = None
    # An architecture without weights (no tag, no checkpoint) builds a randomly initialised CLIP whose
    # zero-shot predictions are confident nonsense: refused unless asked for (tests, benchmarks).
    allow_random_init: bool = False

    @property
    def random_init(self) -> bool:
        """Whether this spec names no weights at all (a random-weight model)."""
        return not (self.pretrained or self.checkpoint or self.arch.startswith("local-dir:"))


class MustConfig(BaseModel):
    """Every MUST hyperparameter and runtime option. Immutable; build with :func:`make_config`."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    # --- schedule -------------------------------------------------------------------------
    epochs: int = Field(20, ge=1, le=10_000)  # passes over the unlabeled set
    # Small datasets give very few optimizer steps (spec §11); train at least this many.
    min_steps: int = Field(0, ge=0, le=10_000_000)
    # Global batch per optimizer step, over all processes and accumulated micro-batches: the fairness
    # marginal and every loss mean are taken over all of it (the reference: 1024 on 16 GPUs).
    batch_size: int = Field(64, ge=1, le=65_536)
    # Images per forward/backward pass on one process; None: the whole per-process share. Smaller
    # values accumulate gradients (batch_size / (processes × micro_batch_size) micro-steps per step).
    micro_batch_size: int | None = Field(None, ge=1, le=4096)
    # Per 256 images; scaled by batch_size/256 (spec §5). The generic default is 1e-4 (the reference's
    # SUN397 value; its ImageNet value 2e-5 is kept in the presets): on the shift benchmark's validation
    # split 2e-5 left the student short of the balanced solution in 400 steps. Deviation, documented.
    lr: float = Field(1e-4, gt=0, le=1.0)
    min_lr: float = Field(1e-6, ge=0, le=1.0)  # per 256 images
    weight_decay: float = Field(0.05, ge=0, le=1.0)
    layer_decay: float = Field(0.65, gt=0, le=1.0)
    betas: tuple[float, float] = (0.9, 0.999)
    eps: float = Field(1e-8, gt=0)

    # --- self-training --------------------------------------------------------------------
    conf_threshold: float = Field(0.5, ge=0.0, lt=1.0)  # strict '>' on teacher max-prob (tau)
    # "fixed": conf_threshold for every class (the reference). "adaptive": a self-adaptive per-class
    # threshold (FreeMatch; must_core.ml.step.AdaptiveThreshold) from moving averages of the teacher's
    # confidence with this momentum per step; conf_threshold is then unused in training.
    conf_threshold_mode: Literal["fixed", "adaptive"] = "fixed"
    adaptive_threshold_momentum: float = Field(0.99, ge=0.0, lt=1.0)
    logit_scale: float = Field(100.0, gt=0)  # constant scale of cosine logits (spec §1.1.5)

    # --- masking / MIM --------------------------------------------------------------------
    mask_ratio: float = Field(0.1, ge=0.0, le=1.0)
    # None: the smallest multiple of the model patch size that is >= 2 patches and divides the image size.
    mask_patch_size: int | None = Field(None, ge=1)
    mim_weight: float = Field(1.0, ge=0)  # fixed at 1 in the reference
    # "data_mean": the mask token starts as the mean patch embedding of (up to 256 of) the unlabeled
    # images, so a masked patch looks like an average patch to the pretrained encoder. "random": the
    # reference's N(0, 0.02²) init, which a pretrained ViT has never seen and which (with the
    # reference's tiny layer-0 lr, spec §10.11) stays out of distribution for the whole run.
    # Deviation, documented in docs/algorithm.md (measured in docs/benchmarks.md).
    mask_token_init: Literal["data_mean", "random"] = "data_mean"  # noqa: S105 - not a secret

    # --- regularisers ---------------------------------------------------------------------
    align_weight: float = Field(0.2, ge=0)
    # Generic default 4 (the reference uses 1, kept in the presets): the fairness term must outweigh
    # the class bias of a zero-shot teacher under domain shift; on the shift benchmark's validation
    # split weight 1 cost 4.5 points (62.9 vs 67.4 %, zero-shot 53.9 %). Deviation, documented.
    fair_weight: float = Field(4.0, ge=0)
    # K >= this uses the 2-step moving-average fairness variant (spec §3.2 variant B); "reference"
    # marginal only.
    fair_moving_average_min_classes: int = Field(512, ge=1)
    # Where the fairness term's class marginal comes from. "running": a detached running mean over
    # about ``fair_marginal_samples`` recent samples (the current global batch included), with the
    # gradient of the current batch: a balanced, confident student is no longer penalised for the
    # classes one batch happens to miss (at K=101, batch 64 the per-batch term caps confidence near
    # 0.4). At a global batch >= fair_marginal_samples it is the reference's batch term exactly.
    # "reference": the global batch (variant A), or variant B from fair_moving_average_min_classes.
    # Deviation, documented in docs/algorithm.md.
    fair_marginal: Literal["running", "reference"] = "running"
    fair_marginal_samples: int = Field(1024, ge=1, le=10_000_000)
    # The class prior the marginal is pulled towards: "uniform" (the reference) or "estimated" from
    # the unlabeled data before training, by EM re-estimation of the prior from zero-shot predictions
    # on up to ``probe_samples`` images (Saerens et al. 2002), without labels.
    fair_prior: Literal["uniform", "estimated"] = "uniform"

    # --- EMA teacher ----------------------------------------------------------------------
    ema_decay_init: float = Field(0.99, ge=0, lt=1)
    ema_decay_final: float = Field(0.9998, ge=0, lt=1)
    ema_warmup_steps: int = Field(100, ge=0)
    # The reference's EMA schedule is in iterations at a global batch of 1024. With
    # ema_batch_scaling, warm-up steps and decays are rescaled by k = reference_batch_size/batch_size
    # (warm·k, d^(1/k)) so the per-epoch dynamics match the reference (spec §11). Deviation, documented.
    ema_batch_scaling: bool = True
    reference_batch_size: int = Field(1024, ge=1)
    # Cap on the teacher's time constant 1/(1-d), as a fraction of the run's optimizer steps: every
    # decay is lowered to at most 1 - 1/(ema_horizon·total_steps). Long runs barely change (ImageNet
    # at the reference batch: cap 0.99973 vs 0.9998); on short runs the reference teacher would stay
    # zero-shot (spec §4, §11) and self-training never feeds back (400 steps: d <= 0.975).
    # 0: the reference (no cap; the presets use 0).
    # Deviation, documented in docs/algorithm.md (measured in docs/benchmarks.md).
    ema_horizon: float = Field(0.1, ge=0, le=10)

    # --- strong augmentation --------------------------------------------------------------
    randaug_num_ops: int = Field(2, ge=0, le=10)
    randaug_magnitude: float = Field(9.0, ge=0, le=10)
    randaug_magnitude_std: float = Field(0.5, ge=0)
    # Area range of the student's random resized crop. The reference's (0.3, 1) assumes object-centric
    # photos; with small objects anywhere in the frame a 30 % crop often loses the object while the
    # teacher labels the whole image. Generic default (0.8, 1); presets keep (0.3, 1). Deviation.
    strong_crop_scale: tuple[float, float] = (0.8, 1.0)
    # Probability of a horizontal flip of the student's view (the reference: 0.5). Classes that a
    # mirror changes (digits, letters, traffic signs, left/right) need 0. "auto": 0.5 unless the
    # zero-shot model's predictions on mirrored unlabeled images disagree with those on the
    # originals much more than under a small shift (must_core.ml.augment; needs probe_samples > 0).
    strong_hflip: float | Literal["auto"] = "auto"
    # Whether RandAugment may draw its geometric ops (rotate, shear, translate by up to 40 % of the
    # image at m9; the reference: yes). "auto": yes unless the zero-shot model's predictions survive
    # that translation much worse than a small shift (must_core.ml.augment; needs probe_samples > 0).
    randaug_geometric: bool | Literal["auto"] = "auto"
    # "auto": strong_crop_scale and randaug_magnitude are the strongest allowed; the crop narrows and
    # the magnitude drops where the zero-shot model's predictions on the student's views stop agreeing
    # with those on the eval view, and RandAugment is off on low-detail images (small crops enlarged
    # to the input size, blur) (must_core.ml.augment.choose_strength; needs probe_samples > 0).
    # "config": exactly as configured.
    strong_strength: Literal["auto", "config"] = "auto"

    # --- runtime --------------------------------------------------------------------------
    seed: int = 0
    device: str = "auto"  # "auto" | "cpu" | "cuda" | "cuda:N"
    precision: Literal["auto", "fp32", "bf16"] = "auto"  # auto: bf16 autocast on CUDA, fp32 on CPU
    num_threads: int | None = Field(None, ge=1, le=512)  # torch CPU threads; None: leave as is
    num_workers: int | None = Field(None, ge=0, le=64)  # loader workers; None: 0 on CPU, 8 on CUDA
    eval_batch_size: int = Field(128, ge=1, le=4096)
    checkpoint_every_steps: int = Field(200, ge=1)
    progress_every_steps: int = Field(10, ge=1)
    grad_checkpointing: bool = False
    # Training processes (DDP ranks) for the job on one machine: one per GPU on CUDA, gloo on CPU.
    # Read by the launcher (must_core.ml.launch / the worker), which starts them with torchrun.
    num_processes: int = Field(1, ge=1, le=64)
    # Under DDP rank 0 polls should_stop every this many steps and broadcasts it (one tiny all-reduce).
    stop_check_every_steps: int = Field(10, ge=1)
    # torch.compile of the student and teacher forward: "auto" compiles on CUDA only (on CPU the
    # compile time rarely pays back); a forward that cannot compile falls back to eager.
    torch_compile: Literal["auto", "on", "off"] = "auto"
    # Processes that decode the dataset once into its prepared form; None: all cores.
    prepare_workers: int | None = Field(None, ge=1, le=256)
    # Serialise checkpoints on a background thread (at most one in flight) instead of the training one.
    async_checkpoint: bool = True
    export_ema: bool = True  # also export the EMA teacher as model_ema.safetensors
    # Label-free spot checks (must_core.ml.gallery): a fixed random sample of this many unlabeled
    # images is classified by the zero-shot model before training and by the adapted one after it
    # (predicted-class histograms), and the served weights' most confident images per class become
    # the sample gallery (``gallery_per_class`` thumbnails of ``gallery_thumb_px``). 0: no pass.
    gallery_max_images: int = Field(2000, ge=0, le=10_000_000)
    gallery_per_class: int = Field(8, ge=0, le=100)
    gallery_thumb_px: int = Field(96, ge=16, le=512)
    # Label-free run health (must_core.ml.health): every this many steps and at the end, the student
    # and the teacher classify a fixed probe sample of up to probe_samples unlabeled images.
    health_every_steps: int = Field(100, ge=1)
    probe_samples: int = Field(512, ge=0, le=100_000)
    # Which weights become "the model" (model.safetensors): "auto" serves the student unless the
    # health rule flags it, then the EMA teacher unless flagged too, then the zero-shot model (see
    # docs/algorithm.md, "Run health"). The EMA export (model_ema.safetensors) is written either way.
    served_model: Literal["auto", "student", "ema", "zero_shot"] = "auto"

    @model_validator(mode="after")
    def _check(self) -> MustConfig:
        if self.min_lr > self.lr:
            raise ValueError("min_lr must not exceed lr")
        lo, hi = self.strong_crop_scale
        if not 0 < lo <= hi <= 1:
            raise ValueError("strong_crop_scale must satisfy 0 < lo <= hi <= 1")
        if not (0 <= self.betas[0] < 1 and 0 <= self.betas[1] < 1):
            raise ValueError("betas must lie in [0, 1)")
        if self.strong_hflip != "auto" and not 0 <= float(self.strong_hflip) <= 1:
            raise ValueError("strong_hflip must be 'auto' or lie in [0, 1]")
        return self


# Settings that change how a run executes, not what it computes (or only at rounding level): a run
# may resume from a checkpoint written with other values of these. Any other difference between the
# checkpoint's config and the resumed run's is refused (see ``resume_conflicts``).
RESUME_FREE_KEYS = frozenset(
    {
        "device",
        "precision",
        "num_threads",
        "num_workers",
        "eval_batch_size",
        "checkpoint_every_steps",
        "progress_every_steps",
        "grad_checkpointing",
        "num_processes",
        "micro_batch_size",
        "stop_check_every_steps",
        "torch_compile",
        "prepare_workers",
        "async_checkpoint",
        "export_ema",
        "served_model",
    }
)


def resume_conflicts(saved: dict[str, Any], current: MustConfig) -> dict[str, tuple[Any, Any]]:
    """Hyperparameters that differ between a checkpoint's config and this run's: {key: (saved, now)}.

    Keys missing from an older checkpoint count as its defaults (they did not exist, so the run used
    what is now the default behaviour only if the value equals it; otherwise they conflict).
    """
    now = current.model_dump(mode="json")
    defaults = MustConfig().model_dump(mode="json")
    out = {}
    for key, value in now.items():
        if key in RESUME_FREE_KEYS:
            continue
        before = saved.get(key, defaults.get(key))
        if before != value:
            out[key] = (before, value)
    return out


# Reference settings per dataset (spec §7, salesforce/MUST train_configs.json), expressed at the
# reference global batch of 1024 (lr values are per 256, as in the reference). Running them at a smaller
# batch keeps the lr rule (lr·N/256) and, with ema_batch_scaling, the EMA per-epoch dynamics.
# They also pin the reference's values of the knobs whose generic defaults deviate for small custom
# datasets (crop scale, EMA horizon; lr and w_fair are set per preset anyway).
_REF_COMMON: dict[str, Any] = {
    "batch_size": 1024,
    "min_lr": 1e-6,
    "ema_decay_final": 0.9998,
    "strong_crop_scale": (0.3, 1.0),
    "ema_horizon": 0.0,
    "fair_marginal": "reference",
    "strong_hflip": 0.5,
    "randaug_geometric": True,
}
PRESETS: dict[str, dict[str, Any]] = {
    "default": {},
    "imagenet_vit_b16": {
        "mask_patch_size": 32,
        "mask_ratio": 0.3,
        "ema_decay_init": 0.999,
        "ema_warmup_steps": 2000,
        "align_weight": 0.2,
        "fair_weight": 1.0,
        "conf_threshold": 0.7,
        "lr": 2e-5,
        "epochs": 30,
    },
    "imagenet_vit_l14": {
        "mask_patch_size": 56,
        "mask_ratio": 0.3,
        "ema_decay_init": 0.999,
        "ema_warmup_steps": 2000,
        "align_weight": 0.5,
        "fair_weight": 1.0,
        "conf_threshold": 0.5,
        "lr": 4e-5,
        "epochs": 20,
    },
    "sun397_vit_b16": {
        "mask_patch_size": 32,
        "mask_ratio": 0.1,
        "ema_decay_init": 0.99,
        "ema_warmup_steps": 500,
        "align_weight": 1.0,
        "fair_weight": 0.2,
        "conf_threshold": 0.4,
        "lr": 1e-4,
        "epochs": 20,
    },
    "sun397_vit_l14": {
        "mask_patch_size": 28,
        "mask_ratio": 0.2,
        "ema_decay_init": 0.99,
        "ema_warmup_steps": 500,
        "align_weight": 0.5,
        "fair_weight": 0.2,
        "conf_threshold": 0.3,
        "lr": 2e-4,
        "epochs": 20,
    },
    "food101_vit_b16": {
        "mask_patch_size": 32,
        "mask_ratio": 0.1,
        "ema_decay_init": 0.999,
        "ema_warmup_steps": 2000,
        "align_weight": 0.1,
        "fair_weight": 1.0,
        "conf_threshold": 0.7,
        "lr": 2e-5,
        "epochs": 40,
    },
    "food101_vit_l14": {
        "mask_patch_size": 56,
        "mask_ratio": 0.1,
        "ema_decay_init": 0.999,
        "ema_warmup_steps": 2000,
        "align_weight": 0.1,
        "fair_weight": 1.0,
        "conf_threshold": 0.7,
        "lr": 4e-5,
        "epochs": 40,
    },
    "gtsrb_vit_b16": {
        "mask_patch_size": 32,
        "mask_ratio": 0.5,
        "ema_decay_init": 0.99,
        "ema_warmup_steps": 500,
        "align_weight": 0.5,
        "fair_weight": 1.0,
        "conf_threshold": 0.3,
        "lr": 2e-5,
        "epochs": 20,
    },
    "gtsrb_vit_l14": {
        "mask_patch_size": 56,
        "mask_ratio": 0.3,
        "ema_decay_init": 0.99,
        "ema_warmup_steps": 500,
        "align_weight": 0.5,
        "fair_weight": 1.0,
        "conf_threshold": 0.2,
        "lr": 4e-5,
        "epochs": 20,
    },
    "dtd_vit_b16": {
        "mask_patch_size": 32,
        "mask_ratio": 0.1,
        "ema_decay_init": 0.99,
        "ema_warmup_steps": 100,
        "align_weight": 0.2,
        "fair_weight": 1.0,
        "conf_threshold": 0.4,
        "lr": 2e-5,
        "epochs": 60,
    },
    "dtd_vit_l14": {
        "mask_patch_size": 56,
        "mask_ratio": 0.1,
        "ema_decay_init": 0.99,
        "ema_warmup_steps": 100,
        "align_weight": 0.5,
        "fair_weight": 1.0,
        "conf_threshold": 0.5,
        "lr": 4e-5,
        "epochs": 60,
    },
    "ucf101_vit_b16": {
        "mask_patch_size": 16,
        "mask_ratio": 0.1,
        "ema_decay_init": 0.99,
        "ema_warmup_steps": 500,
        "align_weight": 0.5,
        "fair_weight": 1.0,
        "conf_threshold": 0.5,
        "lr": 1e-5,
        "epochs": 60,
    },
    "ucf101_vit_l14": {
        "mask_patch_size": 28,
        "mask_ratio": 0.1,
        "ema_decay_init": 0.99,
        "ema_warmup_steps": 500,
        "align_weight": 0.5,
        "fair_weight": 1.0,
        "conf_threshold": 0.6,
        "lr": 2e-5,
        "epochs": 60,
    },
    "pets_vit_b16": {
        "mask_patch_size": 32,
        "mask_ratio": 0.1,
        "ema_decay_init": 0.99,
        "ema_warmup_steps": 100,
        "align_weight": 0.2,
        "fair_weight": 1.0,
        "conf_threshold": 0.7,
        "lr": 1e-5,
        "epochs": 60,
    },
    "caltech101_vit_b16": {
        "mask_patch_size": 32,
        "mask_ratio": 0.1,
        "ema_decay_init": 0.99,
        "ema_warmup_steps": 100,
        "align_weight": 0.2,
        "fair_weight": 1.0,
        "conf_threshold": 0.7,
        "lr": 1e-5,
        "epochs": 60,
    },
}
for _name, _vals in PRESETS.items():
    if _name != "default":
        _vals.update(_REF_COMMON)


def make_config(preset: str | None = None, **overrides: Any) -> MustConfig:
    """Build a validated config from a preset name plus overrides.

    Raises:
        InvalidConfigError: unknown preset, unknown key or out-of-range value (message lists every problem).
    """
    name = preset or "default"
    if name not in PRESETS:
        raise InvalidConfigError(f"unknown preset {name!r}; choose one of {sorted(PRESETS)}")
    values = {**PRESETS[name], **{k: v for k, v in overrides.items() if v is not None}}
    try:
        return MustConfig(**values)
    except ValueError as exc:  # pydantic.ValidationError is a ValueError
        raise InvalidConfigError(_format_validation(exc)) from exc


def _format_validation(exc: ValueError) -> str:
    errors = getattr(exc, "errors", None)
    if callable(errors):
        parts = []
        for err in errors():
            loc = ".".join(str(p) for p in err.get("loc", ())) or "config"
            parts.append(f"{loc}: {err.get('msg')}")
        return "; ".join(parts)
    return str(exc)


def ema_schedule_params(
    cfg: MustConfig, total_steps: int | None = None
) -> tuple[float, float, int]:
    """(d_init, d_final, warm_it) at this config's batch size (see ``ema_batch_scaling``), with both
    decays capped by ``ema_horizon`` when the run's ``total_steps`` is given."""
    if not cfg.ema_batch_scaling or cfg.batch_size == cfg.reference_batch_size:
        d_init, d_final, warm = cfg.ema_decay_init, cfg.ema_decay_final, cfg.ema_warmup_steps
    else:
        k = cfg.reference_batch_size / cfg.batch_size
        d_init = cfg.ema_decay_init ** (1.0 / k)
        d_final = cfg.ema_decay_final ** (1.0 / k)
        warm = round(cfg.ema_warmup_steps * k)
    if cfg.ema_horizon > 0 and total_steps:
        cap = max(0.0, 1.0 - 1.0 / (cfg.ema_horizon * total_steps))
        d_init, d_final = min(d_init, cap), min(d_final, cap)
    return d_init, d_final, warm


@dataclass(frozen=True)
class BatchLayout:
    """How one optimizer step's global batch splits into ranks and micro-batches.

    global = world_size × accum_steps × micro_batch. The fairness marginal, the confident-sample count and
    every loss mean are taken over the global batch, so the step is the same whatever the split.
    """

    global_batch: int
    world_size: int
    micro_batch: int

    @property
    def per_rank(self) -> int:
        return self.global_batch // self.world_size

    @property
    def accum_steps(self) -> int:
        return self.per_rank // self.micro_batch


def batch_layout(global_batch: int, world_size: int, micro_batch: int | None) -> BatchLayout:
    """Validate the split: the global batch must divide evenly into ranks and micro-batches."""
    if global_batch % world_size:
        raise InvalidConfigError(
            f"batch_size {global_batch} is not divisible by the {world_size} training processes"
        )
    per_rank = global_batch // world_size
    micro = per_rank if micro_batch is None else min(micro_batch, per_rank)
    if per_rank % micro:
        raise InvalidConfigError(
            f"the per-process batch {per_rank} is not a multiple of micro_batch_size {micro}"
        )
    return BatchLayout(global_batch, world_size, micro)
