"""Submission-time checks (fast 4xx): URI syntax + policy and hyperparameters. No content is read."""

from __future__ import annotations

from typing import Any

from must_core.datasets.uris import validate_uri
from must_core.errors import InvalidConfigError
from must_core.jobs.schemas import JobCreate
from must_core.settings import Settings

# Runtime knobs the worker sets from settings; a job's params may not set them.
RUNTIME_KEYS = frozenset(
    {
        "device",
        "num_threads",
        "num_workers",
        "checkpoint_every_steps",
        "progress_every_steps",
        "stop_check_every_steps",
        "async_checkpoint",
        "prepare_workers",
    }
)


def validate_job(body: JobCreate, settings: Settings) -> dict[str, Any]:
    """Validate a submission and return the spec stored on the job row.

    Raises:
        InvalidUriError / UriPolicyError: a URI is malformed or refused by policy.
        InvalidConfigError: unknown preset/key, out-of-range value or a runtime-only key.
    """
    policy = settings.datasets
    validate_uri(body.dataset_uri, policy, kind="dir")
    if body.eval_dataset_uri:
        validate_uri(body.eval_dataset_uri, policy, kind="dir")
    if body.base_model.config_uri:
        validate_uri(body.base_model.config_uri, policy, kind="file")
    if body.base_model.checkpoint_uri:
        validate_uri(body.base_model.checkpoint_uri, policy, kind="file")
    if len(body.class_names) > settings.api.max_class_names:
        raise InvalidConfigError(f"at most {settings.api.max_class_names} class names")
    if body.templates and len(body.templates) > settings.api.max_templates:
        raise InvalidConfigError(f"at most {settings.api.max_templates} templates")

    params = body.params.model_dump(exclude_none=True)
    reserved = sorted(RUNTIME_KEYS & params.keys())
    if reserved:
        raise InvalidConfigError(f"params {reserved} are set by the server, not per job")
    from must_core.ml.config import batch_layout, make_config  # pydantic only; no torch import

    overrides = {k: v for k, v in params.items() if k != "preset"}
    cfg = make_config(params.get("preset"), **overrides)
    if cfg.num_processes > settings.api.max_processes_per_job:
        raise InvalidConfigError(
            f"num_processes {cfg.num_processes} is above this service's maximum "
            f"{settings.api.max_processes_per_job}"
        )
    batch_layout(cfg.batch_size, cfg.num_processes, cfg.micro_batch_size)  # the split must divide
    return body.model_dump(mode="json", exclude_none=True)
