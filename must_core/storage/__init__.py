"""Artifact storage: one interface (:class:`ArtifactStore`), S3 and local-disk backends."""

from must_core.storage.base import ArtifactStore, StorageError
from must_core.storage.factory import make_store
from must_core.storage.keys import (
    checkpoint_key,
    job_prefix,
    metrics_key,
    model_key,
    prepared_prefix,
)

__all__ = [
    "ArtifactStore",
    "StorageError",
    "checkpoint_key",
    "job_prefix",
    "make_store",
    "metrics_key",
    "model_key",
    "prepared_prefix",
]
