"""Load an exported adapted classifier and predict; no text tower, optimizer or download needed."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from PIL import Image

from must_core.errors import ModelLoadError
from must_core.ml.checkpoint import read_classifier
from must_core.ml.data import eval_transform, to_rgb
from must_core.ml.model import Preprocess, _check_visual, build_visual_from_cfg


@dataclass
class Prediction:
    label: str
    index: int
    score: float
    top_k: list[dict[str, Any]]  # [{label, index, score}]


class AdaptedClassifier(torch.nn.Module):
    """Vision tower + cosine classifier from a ``must-classifier/1`` safetensors file."""

    def __init__(
        self,
        visual: torch.nn.Module,
        classifier: torch.Tensor,
        class_names: list[str],
        preprocess: Preprocess,
        logit_scale: float,
        extra: dict[str, Any] | None = None,
    ) -> None:
        super().__init__()
        _check_visual(visual)
        self.visual = visual
        self.classifier = torch.nn.Parameter(classifier, requires_grad=False)
        self.class_names = class_names
        self.preprocess = preprocess
        self.logit_scale = logit_scale
        self.extra = extra or {}
        self.transform = eval_transform(preprocess)

    @classmethod
    def load(cls, path: Path, device: str | torch.device = "cpu") -> AdaptedClassifier:
        tensors, meta = read_classifier(path)
        try:
            visual = build_visual_from_cfg(meta["model_cfg"])
            vis_state = {
                k[len("visual.") :]: v for k, v in tensors.items() if k.startswith("visual.")
            }
            visual.load_state_dict(vis_state, strict=True)
        except (KeyError, RuntimeError, TypeError, ValueError) as exc:
            raise ModelLoadError(
                f"adapted model {path} does not match its model config: {exc}"
            ) from exc
        model = cls(
            visual,
            tensors["classifier"],
            list(meta["class_names"]),
            Preprocess.from_dict(meta["preprocess"]),
            float(meta["logit_scale"]),
            meta["extra"],
        )
        for p in model.parameters():
            p.requires_grad_(False)
        return model.to(device).eval()

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Logits [B, K] = scale · normalize(visual(x)) @ W (identical to MUST's unmasked head)."""
        z = F.normalize(self.visual(x), dim=-1)
        return self.logit_scale * (z @ self.classifier.to(z.dtype))

    def preprocess_images(self, images: Sequence[Image.Image]) -> torch.Tensor:
        return torch.stack([self.transform(to_rgb(img)) for img in images])

    @torch.inference_mode()
    def predict(self, images: Sequence[Image.Image], top_k: int = 5) -> list[Prediction]:
        device = self.classifier.device
        x = self.preprocess_images(images).to(device)
        return self.predictions_from_logits(self(x), top_k)

    def predictions_from_logits(self, logits: torch.Tensor, top_k: int = 5) -> list[Prediction]:
        probs = logits.float().softmax(-1).cpu()
        k = max(1, min(top_k, self.num_classes))
        scores, idx = probs.topk(k, dim=-1)
        out = []
        for s_row, i_row in zip(scores.tolist(), idx.tolist(), strict=True):
            top = [
                {"label": self.class_names[i], "index": i, "score": s}
                for s, i in zip(s_row, i_row, strict=True)
            ]
            out.append(
                Prediction(
                    label=top[0]["label"], index=top[0]["index"], score=top[0]["score"], top_k=top
                )
            )
        return out
