"""Wires the framework-free serving core (must_core.serving) into the API process."""

from __future__ import annotations

import logging
import threading
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

from must_core.db.models import AdaptedModel
from must_core.errors import ModelLoadError, MustError
from must_core.jobs.base_models import base_model_key, resolve_base_model
from must_core.ml.config import BaseModelSpec
from must_core.serving.engine import Served, ServingEngine, ServingOptions
from must_core.settings import Settings
from must_core.storage import ArtifactStore

_logger = logging.getLogger(__name__)


class Serving:
    """The API's classifier cache: adapted models from storage, zero-shot models from base specs."""

    def __init__(
        self,
        settings: Settings,
        store: ArtifactStore,
        on_batch: Callable[[int], None] | None = None,
    ) -> None:
        c = settings.classify
        # The API process shares the machine with workers: size torch's threads from settings
        # (OMP_NUM_THREADS is read only when torch first loads, which may already have happened).
        import torch

        torch.set_num_threads(settings.api.num_threads)
        self.settings = settings
        self.store = store
        self.engine = ServingEngine(
            ServingOptions(
                memory_budget_bytes=c.cache_memory_mb * 2**20,
                batching=c.batching,
                max_batch=c.max_batch,
                max_wait_ms=c.max_wait_ms,
                device=c.device,
            ),
            on_batch=on_batch,
        )
        self.cache_dir = settings.model_cache_dir
        self._spec_lock = threading.Lock()
        self._specs: dict[str, BaseModelSpec] = {}

    def adapted(self, model: AdaptedModel) -> Served:
        model_id = model.id
        key = model.artifact_key

        def fetch() -> Path:
            # A fresh copy per load: a deleted-then-recreated id never serves stale weights.
            dest = self.cache_dir / "adapted" / f"{model_id}.safetensors"
            dest.parent.mkdir(parents=True, exist_ok=True)
            self.store.get_file(key, dest)
            _logger.info("loaded model %s from %s", model_id, key)
            return dest

        return self.engine.adapted(str(model_id), fetch)

    def evict(self, model_id: uuid.UUID) -> None:
        self.engine.evict_adapted(str(model_id))
        (self.cache_dir / "adapted" / f"{model_id}.safetensors").unlink(missing_ok=True)

    def zero_shot(
        self, base_model: dict[str, Any], class_names: list[str], templates: list[str] | None
    ) -> Served:
        key = base_model_key(base_model)
        with self._spec_lock:
            spec = self._specs.get(key)
        if spec is None:
            spec = resolve_base_model(base_model, self.cache_dir / "bases" / key, self.settings)
            with self._spec_lock:
                self._specs[key] = spec
        try:
            return self.engine.zero_shot(spec, class_names, templates)
        except ModelLoadError as exc:  # the caller named this model: their request, not our fault
            raise MustError(exc.message, code="invalid_base_model") from exc

    def close(self) -> None:
        self.engine.close()
