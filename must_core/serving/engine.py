"""Serving engine: cached adapted and zero-shot classifiers behind per-model micro-batchers."""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import threading
from collections import OrderedDict
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from PIL import Image

from must_core.ml.config import BaseModelSpec
from must_core.ml.inference import AdaptedClassifier, Prediction
from must_core.ml.templates import DEFAULT_TEMPLATES, validate_class_names, validate_templates
from must_core.serving.batcher import MicroBatcher
from must_core.serving.cache import ModelCache

_logger = logging.getLogger(__name__)


@dataclass
class ServingOptions:
    memory_budget_bytes: int = 2 * 2**30
    batching: bool = True
    max_batch: int = 32
    max_wait_ms: float = 5.0
    device: str = "cpu"
    # CUDA inference precision; CPU always runs fp32 (bf16 is ~14× slower on CPUs without native bf16).
    cuda_dtype: str = "bfloat16"
    text_cache_entries: int = 256


@dataclass
class Served:
    key: str
    classifier: AdaptedClassifier
    batcher: MicroBatcher

    def logits(self, images: Sequence[Image.Image]) -> torch.Tensor:
        x = self.classifier.preprocess_images(images)  # in the request thread, off the event loop
        return self.batcher(x)

    def classify(self, images: Sequence[Image.Image], top_k: int) -> list[Prediction]:
        return self.classifier.predictions_from_logits(self.logits(images), top_k)

    def classify_encoded(
        self, raws: Sequence[bytes], decode: Callable[[bytes, int], Image.Image], top_k: int
    ) -> list[Prediction]:
        """Decode one image at a time straight into the input batch: only one decoded image is
        alive at once. ``decode(raw, side)`` gets the model's input side for early reduction."""
        side = self.classifier.preprocess.image_size
        x = torch.stack([self.classifier.transform(decode(raw, side)) for raw in raws])
        return self.classifier.predictions_from_logits(self.batcher(x), top_k)


def module_bytes(module: torch.nn.Module) -> int:
    return sum(t.numel() * t.element_size() for t in module.state_dict().values())


class ServingEngine:
    """Owns the model cache; thread-safe. ``on_batch(size)`` lets the API record batch sizes."""

    def __init__(
        self, options: ServingOptions, on_batch: Callable[[int], None] | None = None
    ) -> None:
        self.options = options
        self.device = torch.device(options.device)
        self.on_batch = on_batch
        self.cache: ModelCache[Served] = ModelCache(
            options.memory_budget_bytes, on_evict=lambda _k, s: s.batcher.close()
        )
        self._bases: ModelCache[Any] = ModelCache(options.memory_budget_bytes)
        self._text: OrderedDict[str, torch.Tensor] = OrderedDict()
        self._text_lock = threading.Lock()
        self.text_hits = 0
        self.text_misses = 0

    # ---- forward -----------------------------------------------------------------------------
    def _forward_fn(self, clf: AdaptedClassifier) -> Callable[[torch.Tensor], torch.Tensor]:
        device = self.device
        amp = device.type == "cuda"
        dtype = getattr(torch, self.options.cuda_dtype) if amp else None

        def forward(x: torch.Tensor) -> torch.Tensor:
            with torch.inference_mode():
                x = x.to(device, non_blocking=True)
                ctx = (
                    torch.autocast(device_type="cuda", dtype=dtype)
                    if amp
                    else contextlib.nullcontext()
                )
                with ctx:
                    out: torch.Tensor = clf(x)
                return out.float().cpu()

        return forward

    def _serve(self, key: str, clf: AdaptedClassifier) -> tuple[Served, int]:
        clf = clf.to(self.device).eval()
        batcher = MicroBatcher(
            self._forward_fn(clf),
            max_batch=self.options.max_batch,
            max_wait_ms=self.options.max_wait_ms,
            enabled=self.options.batching,
            on_batch=self.on_batch,
            name=key[:24],
        )
        return Served(key, clf, batcher), module_bytes(clf)

    # ---- adapted models -----------------------------------------------------------------------
    def adapted(self, model_id: str, fetch: Callable[[], Path]) -> Served:
        """The adapted classifier for ``model_id``; ``fetch()`` returns a local path on a miss."""
        key = f"adapted:{model_id}"
        return self.cache.get(key, lambda: self._serve(key, AdaptedClassifier.load(fetch())))

    def evict_adapted(self, model_id: str) -> bool:
        return self.cache.evict(f"adapted:{model_id}")

    # ---- zero-shot ----------------------------------------------------------------------------
    def zero_shot(
        self, spec: BaseModelSpec, class_names: list[str], templates: list[str] | None = None
    ) -> Served:
        """Zero-shot classifier; text embeddings cached per (base model, classes, templates)."""
        from must_core.ml.model import build_classifier_weights, load_base_model

        class_names = validate_class_names(class_names)
        templates = validate_templates(list(templates) if templates else list(DEFAULT_TEMPLATES))
        base_key = "base:" + json.dumps(spec.model_dump(), sort_keys=True)
        base = self._bases.get(base_key, lambda: self._load_base(spec, load_base_model))
        text_key = hashlib.sha256(
            json.dumps([base_key, class_names, templates]).encode()
        ).hexdigest()
        with self._text_lock:
            weights = self._text.get(text_key)
            if weights is not None:
                self._text.move_to_end(text_key)
                self.text_hits += 1
        if weights is None:
            weights = build_classifier_weights(base, class_names, templates)
            with self._text_lock:
                self.text_misses += 1
                self._text[text_key] = weights
                while len(self._text) > self.options.text_cache_entries:
                    self._text.popitem(last=False)
        key = f"zeroshot:{text_key}"

        def make() -> tuple[Served, int]:
            clf = AdaptedClassifier(
                base.clip.visual,
                weights,
                class_names,
                base.preprocess,
                100.0,
                {"weights": "zero_shot", "base_model": spec.model_dump()},
            )
            served, _ = self._serve(key, clf)
            return served, int(weights.numel() * 4)  # the visual tower is counted with its base

        return self.cache.get(key, make)

    def _load_base(
        self, spec: BaseModelSpec, loader: Callable[[BaseModelSpec], Any]
    ) -> tuple[Any, int]:
        base = loader(spec)
        base.clip.to(self.device).eval()
        for p in base.clip.parameters():
            p.requires_grad_(False)
        return base, module_bytes(base.clip)

    def close(self) -> None:
        self.cache.clear()
        self._bases.clear()
