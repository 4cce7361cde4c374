"""Deterministic object keys per job: a re-run overwrites instead of duplicating."""

from __future__ import annotations

import uuid


def job_prefix(job_id: uuid.UUID | str) -> str:
    return f"jobs/{job_id}/"


def checkpoint_prefix(job_id: uuid.UUID | str) -> str:
    return f"jobs/{job_id}/checkpoints/"


def checkpoint_key(job_id: uuid.UUID | str) -> str:
    return f"jobs/{job_id}/checkpoints/last.pt"


def model_key(job_id: uuid.UUID | str, ema: bool = False) -> str:
    name = "model_ema.safetensors" if ema else "model.safetensors"
    return f"jobs/{job_id}/model/{name}"


def onnx_key(job_id: uuid.UUID | str) -> str:
    return f"jobs/{job_id}/model/model.onnx"


def predictions_key(job_id: uuid.UUID | str, fmt: str) -> str:
    """``fmt``: jsonl | csv."""
    return f"jobs/{job_id}/predictions/predictions.{fmt}"


def model_prefix(job_id: uuid.UUID | str) -> str:
    return f"jobs/{job_id}/model/"


def metrics_key(job_id: uuid.UUID | str) -> str:
    return f"jobs/{job_id}/metrics.json"


def prepared_prefix(tenant_id: uuid.UUID | str, content_key: str) -> str:
    """The prepared (decoded once) form of a dataset, per tenant, named by the dataset's content."""
    return f"prepared/{tenant_id}/{content_key}/"
