"""Contrastive pretraining of a tiny CLIP on the procedural source domain (cached on disk).

The result is an open_clip ``local-dir:`` folder (open_clip_config.json + open_clip_model.safetensors)
that the MUST engine loads as its base model. A fingerprint of every setting that changes the weights
is stored next to them, so a second run reuses the folder and a changed setting retrains.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import time
from pathlib import Path
from typing import Any

import numpy as np
import open_clip
import torch
import torch.nn.functional as F
from open_clip.loss import ClipLoss
from open_clip.model import CLIP
from open_clip.tokenizer import SimpleTokenizer
from safetensors.torch import save_file

from benchmarks.shift.data import CLASSES, IMAGE_SIZE, TEMPLATES, source_pairs

_logger = logging.getLogger(__name__)

# Small enough for 2 CPU cores: 64 px input, 8 px patches (8x8 tokens), 3 blocks of width 64.
MODEL_CFG: dict[str, Any] = {
    "embed_dim": 64,
    "vision_cfg": {
        "image_size": IMAGE_SIZE,
        "layers": 3,
        "width": 64,
        "patch_size": 8,
        "head_width": 32,
    },
    "text_cfg": {"context_length": 24, "vocab_size": 49408, "width": 64, "heads": 2, "layers": 2},
}
PREPROCESS_CFG: dict[str, Any] = {
    "size": IMAGE_SIZE,
    "mode": "RGB",
    "mean": list(open_clip.OPENAI_DATASET_MEAN),
    "std": list(open_clip.OPENAI_DATASET_STD),
    "interpolation": "bicubic",
    "resize_mode": "shortest",
}
# Stage 1 learns the shapes fast on clean icons with CLIP's learned temperature; stage 2 continues on
# colour-varied icons with light augmentation while the temperature is annealed to the engine's
# fixed 100 (spec §1.1.5), so confidences behave like a real CLIP's under softmax(100·cos).
STAGES: tuple[dict[str, Any], ...] = (
    {
        "name": "stage1",
        "clean": True,
        "num_pairs": 24_000,
        "epochs": 10,
        "batch_size": 128,
        "lr": 1e-3,
        "weight_decay": 0.1,
        "warmup_steps": 100,
        "seed": 1234,
        "augment": False,
        "logit_scale": "learned",
    },
    {
        "name": "stage2",
        "clean": False,
        # 48k pairs (24k until the third session): source held-out zero-shot 85.5 -> 93.3 %, and
        # 10-NN on the target validation features 67.2 -> 71.8 %.
        "num_pairs": 48_000,
        "epochs": 6,
        "batch_size": 128,
        "lr": 5e-4,
        "weight_decay": 0.1,
        "warmup_steps": 50,
        "seed": 1235,
        "augment": True,
        # Half of the batches' images get 10-40 % of their 16 px blocks flattened (erase_blocks).
        "erase_p": 0.5,
        "logit_scale": "anneal_to_100",
    },
)


# The shift suite's CLIP: stage 1 as above, then a one-epoch stage 2 (the same recipe on 48k pairs,
# temperature annealed to 100). The full stage 2 costs ~6x more; on the 2 shared cores of the
# fourth session it did not fit the session, so the suite's numbers come from this shorter model.
SUITE_STAGES: tuple[dict[str, Any], ...] = (
    STAGES[0],
    {**STAGES[1], "name": "stage2_short", "epochs": 1, "warmup_steps": 20},
)

# The side20 domain's CLIP: the suite's recipe on the "side" layout (benchmarks/shift/data.py), every
# caption naming the side (left/right) a mirror flip swaps, so its zero-shot model tells the side.
SIDE_STAGES: tuple[dict[str, Any], ...] = tuple({**s, "layout": "side"} for s in SUITE_STAGES)


def fingerprint(stage: int, stages: tuple[dict[str, Any], ...] = STAGES) -> str:
    blob = json.dumps(
        {"model": MODEL_CFG, "pp": PREPROCESS_CFG, "stages": stages[: stage + 1], "v": 2},
        sort_keys=True,
    )
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def _to_tensor(images: list[Any]) -> torch.Tensor:
    arr = np.stack([np.asarray(im, np.uint8) for im in images])  # [N, H, W, 3]
    x = torch.from_numpy(arr).permute(0, 3, 1, 2).float().div_(255)
    mean = torch.tensor(PREPROCESS_CFG["mean"]).view(1, 3, 1, 1)
    std = torch.tensor(PREPROCESS_CFG["std"]).view(1, 3, 1, 1)
    return (x - mean) / std


@torch.no_grad()
def augment(x: torch.Tensor, gen: torch.Generator, erase_p: float = 0.0) -> torch.Tensor:
    """Cheap batch augmentation that keeps captions true: small affine jitter, brightness/contrast,
    blur and pixel noise (normalised tensors). CLIP's web pretraining makes its features robust to
    such nuisances; without it the tiny model is brittle to anything but pristine renders."""
    b = x.shape[0]

    def u(lo: float, hi: float, *shape: int) -> torch.Tensor:
        return torch.rand(*(shape or (b,)), generator=gen) * (hi - lo) + lo

    ang = u(-0.25, 0.25)
    sc = u(0.85, 1.15)
    theta = torch.zeros(b, 2, 3)
    theta[:, 0, 0] = torch.cos(ang) / sc
    theta[:, 0, 1] = -torch.sin(ang) / sc
    theta[:, 1, 0] = torch.sin(ang) / sc
    theta[:, 1, 1] = torch.cos(ang) / sc
    theta[:, :, 2] = u(-0.1, 0.1, b, 2)
    grid = F.affine_grid(theta, list(x.shape), align_corners=False)
    x = F.grid_sample(x, grid, mode="bilinear", padding_mode="border", align_corners=False)
    mean = x.mean(dim=(1, 2, 3), keepdim=True)
    x = (x - mean) * u(0.6, 1.3).view(b, 1, 1, 1) + mean + u(-0.4, 0.4).view(b, 1, 1, 1)
    blur = torch.rand(b, generator=gen) < 0.3
    if blur.any():
        k = torch.tensor([1.0, 2.0, 1.0])
        k2 = (k[:, None] * k[None, :] / 16).expand(3, 1, 3, 3)
        xb = F.conv2d(F.pad(x[blur], (1, 1, 1, 1), mode="replicate"), k2, groups=3)
        x = x.clone()
        x[blur] = xb
    noise = (torch.rand(b, generator=gen) < 0.5).float() * u(0.0, 0.35)
    x = x + torch.randn(x.shape, generator=gen) * noise.view(b, 1, 1, 1)
    if erase_p > 0:
        x = erase_blocks(x, gen, erase_p)
    return x


@torch.no_grad()
def erase_blocks(x: torch.Tensor, gen: torch.Generator, p: float, block: int = 16) -> torch.Tensor:
    """Flatten random ``block``-px squares of a share ``p`` of the images to the image's mean colour
    (10-40 % of the blocks each). A web-scale CLIP tolerates missing patches; a 3-block ViT trained
    on pristine renders does not, and MUST trains its student on masked views."""
    b, _, h, w = x.shape
    gh, gw = h // block, w // block
    ratio = torch.rand(b, 1, 1, generator=gen) * 0.3 + 0.1
    chosen = (torch.rand(b, 1, 1, generator=gen) < p).float()
    m = (torch.rand(b, gh, gw, generator=gen) < ratio).float() * chosen
    m = m.repeat_interleave(block, 1).repeat_interleave(block, 2).unsqueeze(1)  # [B, 1, H, W]
    mean = x.mean(dim=(2, 3), keepdim=True)
    return x * (1 - m) + mean * m


@torch.no_grad()
def _zero_shot_acc(model: CLIP, tok: SimpleTokenizer, x: torch.Tensor, y: torch.Tensor) -> float:
    model.eval()
    cols = []
    for name in CLASSES:
        t = F.normalize(model.encode_text(tok([t.format(name) for t in TEMPLATES])), dim=-1)
        cols.append(F.normalize(t.mean(0), dim=-1))
    w = torch.stack(cols, 1)
    f = F.normalize(
        torch.cat([model.encode_image(x[i : i + 512]) for i in range(0, len(x), 512)]), dim=-1
    )
    model.train()
    return 100.0 * float(((f @ w).argmax(-1) == y).float().mean())


def _load(folder: Path) -> CLIP:
    from safetensors.torch import load_file

    model = CLIP(**MODEL_CFG, output_dict=True)
    model.load_state_dict(load_file(str(folder / "open_clip_model.safetensors")))
    return model


def _save(model: CLIP, folder: Path, info: dict[str, Any]) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    save_file(
        {k: v.contiguous() for k, v in model.state_dict().items()},
        str(folder / "open_clip_model.safetensors"),
    )
    (folder / "open_clip_config.json").write_text(
        json.dumps({"model_cfg": MODEL_CFG, "preprocess_cfg": PREPROCESS_CFG}, indent=2)
    )
    (folder / "pretrain_info.json").write_text(json.dumps(info, indent=2))


def _cached(folder: Path, fp: str) -> dict[str, Any] | None:
    info_path = folder / "pretrain_info.json"
    if info_path.exists() and (folder / "open_clip_model.safetensors").exists():
        info = json.loads(info_path.read_text())
        if info.get("fingerprint") == fp:
            return info  # type: ignore[no-any-return]
    return None


def _train_stage(model: CLIP | None, p: dict[str, Any], log: Any) -> tuple[CLIP, dict[str, Any]]:
    torch.manual_seed(p["seed"])
    if model is None:  # a fresh model, initialised right after seeding
        model = CLIP(**MODEL_CFG, output_dict=True)
    t0 = time.monotonic()
    imgs, caps, labels = [], [], []
    for im, cap, lab in source_pairs(
        p["num_pairs"], p["seed"], clean=p["clean"], layout=p.get("layout", "free")
    ):
        imgs.append(im)
        caps.append(cap)
        labels.append(lab)
    tok = SimpleTokenizer(context_length=MODEL_CFG["text_cfg"]["context_length"])
    x = _to_tensor(imgs)
    texts = tok(caps)
    del imgs
    held = 1000  # last pairs: source-domain zero-shot check, never trained on
    x_tr, t_tr = x[:-held], texts[:-held]
    x_ho, y_ho = x[-held:], torch.tensor(labels[-held:])
    learned = p["logit_scale"] == "learned"
    model.logit_scale.requires_grad_(learned)
    scale0 = float(model.logit_scale.detach())
    model.train()
    params = [(n, q) for n, q in model.named_parameters() if q.requires_grad]
    decay = [q for n, q in params if q.ndim >= 2 and "embedding" not in n]
    no_decay = [q for n, q in params if not (q.ndim >= 2 and "embedding" not in n)]
    opt = torch.optim.AdamW(
        [
            {"params": decay, "weight_decay": p["weight_decay"]},
            {"params": no_decay, "weight_decay": 0.0},
        ],
        lr=p["lr"],
        betas=(0.9, 0.98),
    )
    loss_fn = ClipLoss()
    n = len(x_tr)
    steps_per_epoch = n // p["batch_size"]
    total = steps_per_epoch * p["epochs"]
    warm = p["warmup_steps"]
    gen = torch.Generator().manual_seed(p["seed"])
    step = 0
    loss = torch.zeros(())
    for epoch in range(p["epochs"]):
        perm = torch.randperm(n, generator=gen)
        for i in range(steps_per_epoch):
            idx = perm[i * p["batch_size"] : (i + 1) * p["batch_size"]]
            lr = (
                p["lr"] * (step + 1) / warm
                if step < warm
                else 0.5 * p["lr"] * (1 + math.cos(math.pi * (step - warm) / (total - warm)))
            )
            for g in opt.param_groups:
                g["lr"] = lr
            if not learned:  # log-linear anneal to ln(100) by 70 % of the stage
                frac = min(1.0, step / (0.7 * total))
                with torch.no_grad():
                    model.logit_scale.fill_(scale0 + frac * (math.log(100.0) - scale0))
            xb = augment(x_tr[idx], gen, p.get("erase_p", 0.0)) if p["augment"] else x_tr[idx]
            out = model(xb, t_tr[idx])
            loss = loss_fn(out["image_features"], out["text_features"], out["logit_scale"])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            if learned:
                with torch.no_grad():
                    model.logit_scale.clamp_(0, math.log(100))
            step += 1
        log(
            f"pretrain {p['name']} epoch {epoch + 1}/{p['epochs']}: loss {float(loss.detach()):.3f} "
            f"held-out source zero-shot {_zero_shot_acc(model, tok, x_ho, y_ho):.1f}% "
            f"({time.monotonic() - t0:.0f}s)"
        )
    model.eval()
    return model, {
        "seconds": time.monotonic() - t0,
        "steps": total,
        "source_heldout_zero_shot_top1": _zero_shot_acc(model, tok, x_ho, y_ho),
        "final_loss": float(loss.detach()),
        "logit_scale": float(model.logit_scale.detach().exp()),
        "threads": torch.get_num_threads(),
        "settings": p,
    }


def pretrain(
    out_dir: Path, *, log: Any = print, stages: tuple[dict[str, Any], ...] = STAGES
) -> dict[str, Any]:
    """Pretrain (or reuse) the tiny CLIP; ``out_dir`` is the final local-dir folder, with each stage
    cached in ``out_dir/<stage>``. Returns the info dict of the final stage (plus all stages')."""
    model: CLIP | None = None
    infos = []
    cached_all = True
    for i, p in enumerate(stages):
        folder = out_dir / p["name"]
        fp = fingerprint(i, stages)
        info = _cached(folder, fp)
        if info is None:
            cached_all = False
            if model is None and i:
                model = _load(out_dir / stages[i - 1]["name"])
            model, stats = _train_stage(model, p, log)
            info = {"fingerprint": fp, **stats}
            _save(model, folder, info)
        else:
            model = None  # reload lazily if a later stage needs training
        infos.append(info)
    final = out_dir / stages[-1]["name"]
    last = infos[-1]
    base = CLIP(**MODEL_CFG)
    return {
        "path": str(final),
        "cached": cached_all,
        "seconds": sum(i["seconds"] for i in infos),
        "steps": sum(i["steps"] for i in infos),
        "source_heldout_zero_shot_top1": last["source_heldout_zero_shot_top1"],
        "num_params": sum(q.numel() for q in base.parameters()),
        "num_visual_params": sum(q.numel() for q in base.visual.parameters()),
        "threads": last["threads"],
        "settings": {"stages": list(stages)},
        "stages": [{k: v for k, v in i.items() if k != "settings"} for i in infos],
    }
