"""A random-weight adapted-classifier file on the tiny config (no training needed)."""

from __future__ import annotations

import json
from pathlib import Path

from tests.conftest import TINY_CONFIG


def write_classifier(path: Path, class_names: list[str], seed: int = 0) -> Path:
    """Write a ``must-classifier/1`` safetensors file with seeded random weights; returns path."""
    import open_clip
    import torch
    import torch.nn.functional as F

    from must_core.ml.checkpoint import export_classifier
    from must_core.ml.model import MustModel, Preprocess, build_visual_from_cfg

    cfg = json.loads(TINY_CONFIG.read_text())
    torch.manual_seed(seed)
    visual = build_visual_from_cfg(cfg)
    head = F.normalize(torch.randn(int(cfg["embed_dim"]), len(class_names)), dim=0)
    size = int(cfg["vision_cfg"]["image_size"])
    pp = Preprocess(size, open_clip.OPENAI_DATASET_MEAN, open_clip.OPENAI_DATASET_STD)
    path.parent.mkdir(parents=True, exist_ok=True)
    export_classifier(
        path,
        MustModel(visual, head).state_dict(),
        class_names=class_names,
        preprocess=pp.to_dict(),
        model_cfg=cfg,
        logit_scale=100.0,
    )
    return path
