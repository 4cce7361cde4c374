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

# Small enough for 2 CPU cores: 32 px input, 4 px patches (8x8 tokens), 3 blocks of width 64.
MODEL_CFG: dict[str, Any] = {
    "embed_dim": 64,
    "vision_cfg": {"image_size": IMAGE_SIZE, "layers": 3, "width": 64, "patch_size": 4, "head_width": 32},
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
PRETRAIN: dict[str, Any] = {
    "num_pairs": 24_000, "epochs": 10, "batch_size": 128, "lr": 1e-3, "weight_decay": 0.1,
    "warmup_steps": 100, "seed": 1234, "data_version": 2, "logit_scale": "1/0.07->100 @70%",
}


def fingerprint() -> str:
    blob = json.dumps({"model": MODEL_CFG, "pp": PREPROCESS_CFG, "train": PRETRAIN, "v": 1},
                      sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def _to_tensor(images: list[Any]) -> torch.Tensor:
    arr = np.stack([np.asarray(im, np.uint8) for im in images])  # [N, H, W, 3]
    x = torch.from_numpy(arr).permute(0, 3, 1, 2).float().div_(255)
    mean = torch.tensor(PREPROCESS_CFG["mean"]).view(1, 3, 1, 1)
    std = torch.tensor(PREPROCESS_CFG["std"]).view(1, 3, 1, 1)
    return (x - mean) / std


@torch.no_grad()
def _zero_shot_acc(model: CLIP, tok: SimpleTokenizer, x: torch.Tensor, y: torch.Tensor) -> float:
    model.eval()
    cols = []
    for name in CLASSES:
        t = F.normalize(model.encode_text(tok([t.format(name) for t in TEMPLATES])), dim=-1)
        cols.append(F.normalize(t.mean(0), dim=-1))
    w = torch.stack(cols, 1)
    f = F.normalize(torch.cat([model.encode_image(x[i:i + 512]) for i in range(0, len(x), 512)]), dim=-1)
    model.train()
    return 100.0 * float(((f @ w).argmax(-1) == y).float().mean())


def pretrain(out_dir: Path, *, log: Any = print) -> dict[str, Any]:
    """Pretrain (or reuse) the tiny CLIP in ``out_dir``; returns its info dict."""
    info_path = out_dir / "pretrain_info.json"
    fp = fingerprint()
    if info_path.exists() and (out_dir / "open_clip_model.safetensors").exists():
        info = json.loads(info_path.read_text())
        if info.get("fingerprint") == fp:
            info["cached"] = True
            return info
    p = PRETRAIN
    torch.manual_seed(p["seed"])
    t0 = time.monotonic()
    imgs, caps, labels = [], [], []
    for im, cap, lab in source_pairs(p["num_pairs"], p["seed"]):
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
    t_data = time.monotonic() - t0

    # The engine scores with the fixed scale 100 (spec §1.1.5: OpenAI CLIP's logit_scale ends at its
    # ln(100) clamp, and the confidence thresholds assume softmax(100·cos)). A learned scale only
    # reaches ~23 in this short run, so the temperature follows a fixed schedule instead: 1/0.07 (CLIP's
    # init) rising log-linearly to 100 by 70 % of training, then 100, so the tiny CLIP's confidences
    # mean what they mean for a real CLIP. (Starting at 100 learns much more slowly.)
    model = CLIP(**MODEL_CFG, output_dict=True)
    model.logit_scale.requires_grad_(False)
    model.train()
    params = [(n, q) for n, q in model.named_parameters() if q.requires_grad]
    decay = [q for n, q in params if q.ndim >= 2 and "embedding" not in n]
    no_decay = [q for n, q in params if not (q.ndim >= 2 and "embedding" not in n)]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": p["weight_decay"]},
                             {"params": no_decay, "weight_decay": 0.0}], lr=p["lr"], betas=(0.9, 0.98))
    loss_fn = ClipLoss()
    n = len(x_tr)
    steps_per_epoch = n // p["batch_size"]
    total = steps_per_epoch * p["epochs"]
    gen = torch.Generator().manual_seed(p["seed"])
    step = 0
    for epoch in range(p["epochs"]):
        perm = torch.randperm(n, generator=gen)
        for i in range(steps_per_epoch):
            idx = perm[i * p["batch_size"]:(i + 1) * p["batch_size"]]
            lr = p["lr"] * (step + 1) / p["warmup_steps"] if step < p["warmup_steps"] else \
                0.5 * p["lr"] * (1 + math.cos(math.pi * (step - p["warmup_steps"]) / (total - p["warmup_steps"])))
            for g in opt.param_groups:
                g["lr"] = lr
            frac = min(1.0, step / (0.7 * total))
            model.logit_scale.fill_(math.log(1 / 0.07) + frac * (math.log(100.0) - math.log(1 / 0.07)))
            out = model(x_tr[idx], t_tr[idx])
            loss = loss_fn(out["image_features"], out["text_features"], out["logit_scale"])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            step += 1
        log(f"pretrain epoch {epoch + 1}/{p['epochs']}: loss {float(loss.detach()):.3f} "
            f"source zero-shot {_zero_shot_acc(model, tok, x_ho, y_ho):.1f}% "
            f"({time.monotonic() - t0:.0f}s)")
    src_acc = _zero_shot_acc(model, tok, x_ho, y_ho)
    out_dir.mkdir(parents=True, exist_ok=True)
    model.eval()
    save_file({k: v.contiguous() for k, v in model.state_dict().items()},
              str(out_dir / "open_clip_model.safetensors"))
    (out_dir / "open_clip_config.json").write_text(
        json.dumps({"model_cfg": MODEL_CFG, "preprocess_cfg": PREPROCESS_CFG}, indent=2))
    info = {
        "fingerprint": fp, "seconds": time.monotonic() - t0, "data_seconds": t_data, "steps": total,
        "source_heldout_zero_shot_top1": src_acc, "final_loss": float(loss),
        "logit_scale": float(model.logit_scale.exp()),
        "num_params": sum(q.numel() for q in model.parameters()),
        "num_visual_params": sum(q.numel() for q in model.visual.parameters()),
        "threads": torch.get_num_threads(), "settings": p, "cached": False,
    }
    info_path.write_text(json.dumps(info, indent=2))
    return info
