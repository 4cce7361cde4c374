"""Base-model loading, the zero-shot classifier and the masked ViT used by MUST (spec §1, §2).

The MUST wrapper keeps only open_clip's vision tower plus four MUST modules (classifier, mask token,
``ln_patch``, pixel decoder). The text tower is used once to build the classifier and then dropped, so
it never reaches the optimizer or the EMA (spec §1.2).
"""

from __future__ import annotations

import json
import logging
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import open_clip
import torch
import torch.nn.functional as F
from torch import nn

from must_core.errors import InvalidConfigError, ModelLoadError
from must_core.ml.config import BaseModelSpec

_logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class Preprocess:
    """The eval preprocessing of a base model (from open_clip's preprocess config)."""

    image_size: int
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    interpolation: str = "bicubic"
    resize_mode: str = "shortest"

    def to_dict(self) -> dict[str, Any]:
        return {
            "image_size": self.image_size,
            "mean": list(self.mean),
            "std": list(self.std),
            "interpolation": self.interpolation,
            "resize_mode": self.resize_mode,
        }

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Preprocess:
        return cls(
            image_size=int(d["image_size"]),
            mean=tuple(float(x) for x in d["mean"]),  # type: ignore[arg-type]
            std=tuple(float(x) for x in d["std"]),  # type: ignore[arg-type]
            interpolation=str(d.get("interpolation", "bicubic")),
            resize_mode=str(d.get("resize_mode", "shortest")),
        )


@dataclass
class BaseModel:
    """A loaded open_clip CLIP plus what MUST needs to know about it."""

    clip: Any  # open_clip CLIP (nn.Module); submodule attributes are dynamic
    tokenizer: Any
    preprocess: Preprocess
    # The open_clip model config (embed_dim, vision_cfg, quick_gelu, ...): enough to rebuild the vision
    # tower without the text tower or any download (used by the inference export).
    model_cfg: dict[str, Any] = field(default_factory=dict)


def _read_json(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise ModelLoadError(f"cannot read model config {path}: {exc}") from exc
    if not isinstance(data, dict):
        raise ModelLoadError(f"model config {path} is not a JSON object")
    return data


def load_base_model(spec: BaseModelSpec) -> BaseModel:
    """Build the base CLIP from an architecture name, a checkpoint, a config JSON or a local-dir folder.

    Nothing is downloaded unless ``spec.pretrained`` is a registry tag (e.g. ``"openai"``), which needs
    internet. Every failure becomes a :class:`ModelLoadError` with a readable message.
    """
    arch = spec.arch
    model_cfg: dict[str, Any] | None = None
    if spec.config is not None:
        cfg_path = Path(spec.config)
        data = _read_json(cfg_path)
        model_cfg = data.get("model_cfg", data)
        # open_clip registers configs by file stem; a dedicated name avoids clobbering built-ins.
        name = cfg_path.stem if arch in ("", "ViT-B-16") else arch
        if name in open_clip.list_models() and open_clip.get_model_config(name) != model_cfg:
            name = f"must-custom-{abs(hash(json.dumps(model_cfg, sort_keys=True))) % 10**10}"
        _register_config(name, model_cfg)
        arch = name

    pretrained: str | None = spec.pretrained
    openai_state: dict[str, torch.Tensor] | None = None
    if spec.checkpoint is not None:
        ckpt = Path(spec.checkpoint)
        if not ckpt.is_file():
            raise ModelLoadError(f"checkpoint file not found: {ckpt}")
        pretrained = str(ckpt)
        openai_state = read_openai_checkpoint(ckpt)
        if openai_state is not None:
            pretrained = None  # loaded below, without OpenAI's extra entries

    if arch.startswith("local-dir:"):
        folder = Path(arch.split(":", 1)[1])
        if not (folder / "open_clip_config.json").is_file():
            raise ModelLoadError(f"local-dir model folder {folder} has no open_clip_config.json")
        model_cfg = _read_json(folder / "open_clip_config.json").get("model_cfg")
        pretrained = None
    elif model_cfg is None:
        model_cfg = open_clip.get_model_config(arch)
        if model_cfg is None:
            raise ModelLoadError(
                f"unknown open_clip architecture {arch!r}; see open_clip.list_models() or pass a "
                "config JSON"
            )

    if spec.random_init and not spec.allow_random_init:
        raise ModelLoadError(random_init_message(spec), code="invalid_base_model")
    quick_gelu = _quick_gelu_from_weights(spec, arch, model_cfg, openai_state is not None)
    if spec.pretrained and spec.checkpoint is None and not arch.startswith("local-dir:"):
        tag_cfg = open_clip.get_pretrained_cfg(arch, spec.pretrained)
        if not tag_cfg:
            raise ModelLoadError(
                f"unknown pretrained tag {spec.pretrained!r} for {arch!r}; known tags: "
                f"{open_clip.list_pretrained_tags_by_model(arch)}"
            )
        if spec.force_quick_gelu is None:  # OpenAI weights need QuickGELU (spec §1.2)
            quick_gelu = bool(tag_cfg.get("quick_gelu", False))

    try:
        clip, _, preprocess_val = open_clip.create_model_and_transforms(
            arch,
            pretrained=pretrained,
            precision="fp32",
            device="cpu",
            force_quick_gelu=bool(quick_gelu),
            weights_only=True,
        )
        if openai_state is not None:
            clip.load_state_dict(openai_state, strict=True)
        tokenizer = open_clip.get_tokenizer(arch)
    except ModelLoadError:
        raise
    except Exception as exc:  # open_clip raises RuntimeError/ValueError/OSError/HF errors
        raise ModelLoadError(
            f"cannot build base model {arch!r} (pretrained={spec.pretrained!r}, "
            f"checkpoint={spec.checkpoint!r}): {exc}. Pretrained tags need internet access; "
            "offline, pass a local checkpoint path or a local-dir: folder."
        ) from exc

    visual = getattr(clip, "visual", None)
    if visual is None or not hasattr(visual, "conv1") or not hasattr(visual, "transformer"):
        raise ModelLoadError(f"{arch!r} has no open_clip ViT vision tower; MUST needs a ViT")
    pp = open_clip.get_model_preprocess_cfg(clip)
    size = pp.get("size", visual.image_size)
    if isinstance(size, list | tuple):
        if size[0] != size[-1]:
            raise ModelLoadError(f"non-square image size {size} is not supported")
        size = size[0]
    preprocess = Preprocess(
        image_size=int(size),
        mean=tuple(pp.get("mean", open_clip.OPENAI_DATASET_MEAN)),  # type: ignore[arg-type]
        std=tuple(pp.get("std", open_clip.OPENAI_DATASET_STD)),  # type: ignore[arg-type]
        interpolation=str(pp.get("interpolation", "bicubic")),
        resize_mode=str(pp.get("resize_mode", "shortest")),
    )
    del preprocess_val
    cfg = dict(model_cfg or {})
    if quick_gelu:
        cfg["quick_gelu"] = True
    return BaseModel(clip=clip.eval(), tokenizer=tokenizer, preprocess=preprocess, model_cfg=cfg)


# Entries OpenAI's CLIP checkpoints carry besides the weights (open_clip's CLIP has no such buffers).
_OPENAI_EXTRA_KEYS = ("input_resolution", "context_length", "vocab_size")


def check_base_model_names(spec: BaseModelSpec, *, custom_config: bool) -> None:
    """Submission-time check of a base model, without building or downloading anything: a known
    architecture (unless a custom config or local-dir folder names it), a known pretrained tag for it,
    and weights unless ``allow_random_init``.

    Raises:
        ModelLoadError (code ``invalid_base_model``): with the known names in the message.
    """
    if spec.random_init and not spec.allow_random_init:
        raise ModelLoadError(random_init_message(spec), code="invalid_base_model")
    if custom_config or spec.arch.startswith("local-dir:"):
        return
    if open_clip.get_model_config(spec.arch) is None:
        close = [m for m in open_clip.list_models() if m.lower().startswith(spec.arch[:5].lower())]
        raise ModelLoadError(
            f"unknown open_clip architecture {spec.arch!r}"
            + (f"; similar: {close[:10]}" if close else "")
            + "; see open_clip.list_models(), or pass config_uri",
            code="invalid_base_model",
        )
    if spec.pretrained and spec.checkpoint is None:
        tags = _known_tags(spec.arch)
        if spec.pretrained not in tags:
            raise ModelLoadError(
                f"unknown pretrained tag {spec.pretrained!r} for {spec.arch!r}; known tags: {tags}",
                code="invalid_base_model",
            )


def random_init_message(spec: BaseModelSpec) -> str:
    return (
        f"base model {spec.arch!r} names no weights (no pretrained tag, checkpoint or local-dir "
        "folder): it would run on random weights and return confident nonsense. Give weights, or "
        "set allow_random_init: true for tests"
    )


def read_openai_checkpoint(path: Path) -> dict[str, torch.Tensor] | None:
    """The state dict of a checkpoint in OpenAI's own format (their TorchScript archive, or a state
    dict with their ``input_resolution``/``context_length``/``vocab_size`` entries), without those
    entries; None for any other checkpoint (open_clip loads it).

    OpenAI's weights were trained with QuickGELU, so such a file decides the activation (spec §1.2).
    """
    import zipfile

    try:
        if path.suffix == ".safetensors":
            from safetensors import safe_open

            with safe_open(str(path), framework="pt") as f:  # type: ignore[no-untyped-call]
                keys = set(f.keys())
                if not any(k in keys for k in _OPENAI_EXTRA_KEYS):
                    return None
            from safetensors.torch import load_file

            state: Any = load_file(str(path))
        elif zipfile.is_zipfile(path) and any(
            n.endswith("constants.pkl") for n in zipfile.ZipFile(path).namelist()
        ):
            state = torch.jit.load(str(path), map_location="cpu").state_dict()  # type: ignore[no-untyped-call]
        else:
            try:
                state = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
            except RuntimeError:  # legacy (non-zip) serialisation cannot be memory-mapped
                state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # unreadable: open_clip's loader reports it with its own message
        _logger.debug("checkpoint %s not inspected: %s", path, exc)
        return None
    if not isinstance(state, dict) or not any(k in state for k in _OPENAI_EXTRA_KEYS):
        return None
    return {k: v for k, v in state.items() if k not in _OPENAI_EXTRA_KEYS}


def _quick_gelu_from_weights(
    spec: BaseModelSpec, arch: str, model_cfg: dict[str, Any] | None, openai_file: bool
) -> bool:
    """QuickGELU for OpenAI weights however they are given: explicit choice first, then an
    OpenAI-format checkpoint file, then the model config (a local-dir folder or config JSON that
    says ``quick_gelu``); a pretrained tag's own setting is applied by the caller."""
    if spec.force_quick_gelu is not None:
        return spec.force_quick_gelu
    if openai_file or bool((model_cfg or {}).get("quick_gelu", False)):
        return True
    if spec.checkpoint is not None and "openai" in _known_tags(arch):
        _logger.warning(
            "checkpoint %s for %s is not in OpenAI's format: building it with GELU. If these are "
            "OpenAI's weights converted to open_clip's format, set force_quick_gelu: true",
            spec.checkpoint,
            arch,
        )
    return False


def _known_tags(arch: str) -> list[str]:
    try:
        return list(open_clip.list_pretrained_tags_by_model(arch))
    except Exception:  # unknown architecture: no tags
        return []


def _register_config(name: str, model_cfg: dict[str, Any]) -> None:
    """Register an open_clip model config under ``name`` (in-process registry)."""
    from open_clip import factory

    factory._MODEL_CONFIGS[name] = model_cfg


@torch.no_grad()
def build_classifier_weights(
    base: BaseModel, class_names: list[str], templates: list[str], batch_size: int = 256
) -> torch.Tensor:
    """Zero-shot classifier W ∈ R^{D×K}: per template normalise, average, renormalise (spec §1.1.3)."""
    clip = base.clip
    device = next(clip.parameters()).device
    columns = []
    for name in class_names:
        texts = [t.format(name) for t in templates]
        feats = []
        for i in range(0, len(texts), batch_size):
            tokens = base.tokenizer(texts[i : i + batch_size]).to(device)
            feats.append(clip.encode_text(tokens).float())
        emb = F.normalize(torch.cat(feats), dim=-1)
        columns.append(F.normalize(emb.mean(dim=0), dim=-1))
    return torch.stack(columns, dim=1)


def default_mask_patch_size(image_size: int, patch_size: int) -> int:
    """Default mask block: 2×2 model patches (the reference's 32 px for 224/16) when that still leaves a
    masking grid of at least 4×4 cells and divides the image size; otherwise one model patch (small
    models, e.g. 64 px / 16 px, would otherwise mask in 25 % steps).
    """
    m = 2 * patch_size
    if image_size % m == 0 and image_size // m >= 4:
        return m
    return patch_size


class MustModel(nn.Module):
    """Student/teacher network: open_clip vision tower + classifier + MIM modules (spec §2.1).

    Parameter names (relative to this module): ``visual.*`` as in open_clip, ``classifier`` [D, K],
    ``mask_token_embedding`` [1, 1, W], ``ln_patch.*``, ``decoder.0.*``.
    """

    visual: Any  # open_clip VisionTransformer (dynamic submodule attributes)

    def __init__(
        self,
        visual: nn.Module,
        classifier: torch.Tensor,
        logit_scale: float = 100.0,
    ) -> None:
        super().__init__()
        _check_visual(visual)
        self.visual = visual
        width = int(self.visual.conv1.out_channels)
        patch = int(_pair(visual.patch_size)[0])
        self.patch_size = patch
        self.image_size = int(_pair(visual.image_size)[0])
        self.grid_size = self.image_size // patch
        self.logit_scale = float(logit_scale)
        self.classifier = nn.Parameter(classifier.detach().clone().float())
        # Named like the reference so the layer-decay rule puts it in group 0 (spec §5, §10.11).
        self.mask_token_embedding = nn.Parameter(torch.zeros(1, 1, width))
        nn.init.normal_(self.mask_token_embedding, std=0.02)
        self.ln_patch = nn.LayerNorm(width)
        self.decoder = nn.Sequential(
            nn.Conv2d(width, 3 * patch * patch, kernel_size=1, bias=True), nn.PixelShuffle(patch)
        )

    @property
    def num_classes(self) -> int:
        return int(self.classifier.shape[1])

    @property
    def num_layers(self) -> int:
        return len(self.visual.transformer.resblocks)

    @torch.no_grad()
    def init_mask_token_from_images(self, x: torch.Tensor) -> None:
        """Set the mask token to the mean patch embedding (``conv1`` output) of images ``x`` [B, 3, H, W].

        A deviation from the reference's random init (see ``MustConfig.mask_token_init``).
        """
        conv = self.visual.conv1
        tokens = conv(x.to(device=conv.weight.device, dtype=conv.weight.dtype))  # [B, W, g, g]
        self.mask_token_embedding.copy_(tokens.mean(dim=(0, 2, 3)).view(1, 1, -1))

    def encode(self, x: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        """Encoder output S [B, N+1, W] with masked patch embeddings replaced by the mask token."""
        v = self.visual
        tokens = v.conv1(x)  # [B, W, g, g]
        b = tokens.shape[0]
        tokens = tokens.flatten(2).transpose(1, 2)  # [B, N, W], row-major like the mask
        if mask is not None:
            m = mask.reshape(b, -1, 1).bool()
            tokens = torch.where(m, self.mask_token_embedding.to(tokens.dtype), tokens)
        cls = v.class_embedding.to(tokens.dtype).expand(b, 1, -1)
        seq = torch.cat([cls, tokens], dim=1) + v.positional_embedding.to(tokens.dtype)
        seq = v.patch_dropout(seq)
        seq = v.ln_pre(seq)
        return v.transformer(seq)  # type: ignore[no-any-return]

    def head(self, z: torch.Tensor) -> torch.Tensor:
        """Cosine logits ``scale · z @ W`` for unit-norm features z, always in fp32.

        Under bf16 autocast a bf16 matmul would round 100·cos to steps of 0.125–0.25 (8 mantissa
        bits), coarser than the differences between classes; the head is tiny, so it runs in fp32.
        """
        with torch.autocast(device_type=z.device.type, enabled=False):
            return self.logit_scale * (z.float() @ self.classifier.float())

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """Unit-norm image embedding z_cls [B, D] (unmasked)."""
        seq = self.encode(x)
        return F.normalize(self.visual.ln_post(seq[:, 0]) @ self.visual.proj, dim=-1)

    def forward(
        self, x: torch.Tensor, mask: torch.Tensor | None = None
    ) -> torch.Tensor | MaskedOutput:
        """Unmasked: logits [B, K]. Masked (``mask`` [B, g, g] in {0,1}): :class:`MaskedOutput`."""
        seq = self.encode(x, mask)
        v = self.visual
        z_cls = F.normalize(v.ln_post(seq[:, 0]) @ v.proj, dim=-1)
        logits = self.head(z_cls)
        if mask is None:
            return logits
        b = x.shape[0]
        g = self.grid_size
        patches = self.ln_patch(seq[:, 1:])  # [B, N, W]: the new LayerNorm, not ln_post
        recon = self.decoder(patches.transpose(1, 2).reshape(b, -1, g, g))  # [B, 3, H, W]
        z_tok = F.normalize(patches @ v.proj, dim=-1)  # same proj as the class token
        # ||z_i - z_cls||^2 for every token; no stop-gradient on either side (spec §2.2.5).
        align = (z_tok - z_cls.unsqueeze(1)).pow(2).sum(-1)  # [B, N]
        p = self.patch_size
        mask_pix = mask.repeat_interleave(p, 1).repeat_interleave(p, 2).unsqueeze(1)
        return MaskedOutput(logits, recon, align, mask.reshape(b, -1), mask_pix.to(recon.dtype))


@dataclass
class MaskedOutput:
    """Masked-mode outputs.

    ``align`` holds the distance for *every* token [B, N]; the loss reduces it with the token mask
    (a masked-weighted mean with static shapes, spec §10 perf 4). :meth:`align_masked` gives the
    reference's [B, n_mask] layout.
    """

    logits: torch.Tensor
    recon: torch.Tensor
    align: torch.Tensor
    token_mask: torch.Tensor  # [B, N]
    mask_pix: torch.Tensor  # [B, 1, H, W]

    def align_masked(self) -> torch.Tensor:
        b = self.align.shape[0]
        return self.align[self.token_mask.bool()].reshape(b, -1)


def _pair(v: Any) -> tuple[int, int]:
    if isinstance(v, list | tuple):
        return int(v[0]), int(v[-1])
    return int(v), int(v)


def _check_visual(visual: Any) -> None:
    """MUST's forward reuses open_clip submodules; refuse towers that would silently differ."""
    problems = []
    if not isinstance(visual.patch_dropout, nn.Identity):
        problems.append("patch_dropout is active")
    if getattr(visual, "attn_pool", None) is not None:
        problems.append("attentional pooling")
    if getattr(visual, "pool_type", "tok") != "tok":
        problems.append(f"pool_type={visual.pool_type!r}")
    if getattr(visual, "final_ln_after_pool", False):
        problems.append("final_ln_after_pool")
    if getattr(visual, "proj", None) is None:
        problems.append("no projection")
    if not getattr(visual.transformer, "batch_first", True):
        problems.append("sequence-first transformer")
    h, w = _pair(visual.image_size)
    ph, pw = _pair(visual.patch_size)
    if h != w or ph != pw:
        problems.append("non-square image or patch size")
    if problems:
        raise ModelLoadError("unsupported vision tower for MUST: " + ", ".join(problems))


def base_image_size(spec: BaseModelSpec) -> int | None:
    """The input size of the base model, read from its config without building it (None: unknown
    here; building the model will say why)."""
    import open_clip

    try:
        if spec.config is not None:
            cfg = _read_json(Path(spec.config))
        elif spec.arch.startswith("local-dir:"):
            folder = Path(spec.arch.split(":", 1)[1])
            cfg = _read_json(folder / "open_clip_config.json").get("model_cfg") or {}
        else:
            cfg = open_clip.get_model_config(spec.arch) or {}
        size = cfg.get("vision_cfg", {}).get("image_size")
    except (OSError, ValueError, ModelLoadError):
        return None
    if isinstance(size, list | tuple):
        size = size[0]
    return int(size) if isinstance(size, int | float) else None


def build_must_model(
    base: BaseModel, class_names: list[str], templates: list[str], logit_scale: float = 100.0
) -> MustModel:
    """Zero-shot MUST model; the CLIP text side is dropped afterwards (spec §1.1.6)."""
    weights = build_classifier_weights(base, class_names, templates)
    model = MustModel(base.clip.visual, weights, logit_scale=logit_scale)
    return model


def resolve_mask_patch_size(model: MustModel, requested: int | None) -> int:
    """Validate the mask block size: a multiple of the model patch that divides the image size."""
    p, size = model.patch_size, model.image_size
    m = requested if requested is not None else default_mask_patch_size(size, p)
    if m % p != 0 or size % m != 0:
        raise InvalidConfigError(
            f"mask_patch_size={m} must be a multiple of the model patch size {p} and divide the "
            f"image size {size}"
        )
    return m


def build_visual_from_cfg(model_cfg: dict[str, Any]) -> nn.Module:
    """Rebuild an (untrained) open_clip vision tower from a model config; no text tower, no download."""
    from open_clip.model import CLIPVisionCfg, _build_vision_tower

    vision_cfg = dict(model_cfg["vision_cfg"])
    return _build_vision_tower(  # type: ignore[no-any-return]
        int(model_cfg["embed_dim"]),
        CLIPVisionCfg(**vision_cfg),
        quick_gelu=bool(model_cfg.get("quick_gelu", False)),
        cast_dtype=None,
    )


def count_params(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters() if p.requires_grad)


def ceil_mask_count(tokens: int, ratio: float) -> int:
    """Number of masked cells: numpy-ceil of the float product (spec §2.3)."""
    return math.ceil(tokens * ratio)
