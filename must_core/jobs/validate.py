"""Submission-time checks (fast 4xx): URI syntax + policy and hyperparameters. No content is read."""

from __future__ import annotations

import re
import uuid
from collections.abc import Callable, Mapping
from typing import Any

from must_core.datasets.errors import UriPolicyError
from must_core.datasets.uris import Kind, check_local_dir, validate_uri
from must_core.db.models import AdaptedModel
from must_core.errors import InvalidConfigError
from must_core.jobs.schemas import JobCreate, PredictionsCreate
from must_core.settings import Settings
from must_core.webhooks.urls import validate_webhook_url

# Whether the caller's tenant owns a job id (artifact-bucket URIs are readable under own jobs only).
OwnsJob = Callable[[uuid.UUID], bool]

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


def validate_request_uri(uri: str, settings: Settings, owns_job: OwnsJob, kind: Kind) -> None:
    """The one URI policy for everything a request names: syntax, allowed roots/buckets/hosts, and
    the artifact bucket only under the caller's own jobs (one message either way: no existence
    leak about other tenants' jobs)."""
    parsed = validate_uri(uri, settings.datasets, kind=kind)
    if parsed.scheme != "s3" or parsed.bucket != settings.storage.bucket:
        return
    own = re.match(rf"^{re.escape(settings.storage.prefix)}jobs/([0-9a-f-]{{36}})/", parsed.key)
    if own is None or not owns_job(uuid.UUID(own.group(1))):
        raise UriPolicyError(
            "the artifact bucket may only be named under the prefixes of your own jobs"
        )


def validate_base_model(bm: Mapping[str, Any], settings: Settings, owns_job: OwnsJob) -> None:
    """``config_uri``/``checkpoint_uri`` and a ``local-dir:`` arch, for jobs and zero-shot alike."""
    check_local_dir(str(bm.get("arch") or ""), settings.datasets)
    for key in ("config_uri", "checkpoint_uri"):
        if bm.get(key):
            validate_request_uri(bm[key], settings, owns_job, "file")
    from must_core.ml.config import BaseModelSpec
    from must_core.ml.model import check_base_model_names  # open_clip's registry; no download

    spec = BaseModelSpec(
        arch=str(bm.get("arch") or "ViT-B-16"),
        pretrained=bm.get("pretrained"),
        checkpoint=bm.get("checkpoint_uri"),  # only whether one is given matters here
        allow_random_init=bool(bm.get("allow_random_init", False)),
    )
    check_base_model_names(spec, custom_config=bool(bm.get("config_uri")))


def validate_job(body: JobCreate, settings: Settings, owns_job: OwnsJob) -> dict[str, Any]:
    """Validate a submission and return the spec stored on the job row.

    Raises:
        InvalidUriError / UriPolicyError: a URI is malformed or refused by policy.
        InvalidConfigError: unknown preset/key, out-of-range value or a runtime-only key.
    """
    validate_request_uri(body.dataset_uri, settings, owns_job, "dir")
    if body.eval_dataset_uri:
        validate_request_uri(body.eval_dataset_uri, settings, owns_job, "dir")
    validate_base_model(body.base_model.model_dump(), settings, owns_job)
    if body.callback_url:
        validate_webhook_url(body.callback_url, settings.webhooks)
    if len(body.class_names) > settings.api.max_class_names:
        raise InvalidConfigError(f"at most {settings.api.max_class_names} class names")
    if body.templates and len(body.templates) > settings.api.max_templates:
        raise InvalidConfigError(f"at most {settings.api.max_templates} templates")

    params = body.params.model_dump(exclude_none=True)
    reserved = sorted(RUNTIME_KEYS & params.keys())
    if reserved:
        raise InvalidConfigError(f"params {reserved} are set by the server, not per job")
    from must_core.ml.config import batch_layout, make_config  # pydantic only; no torch import

    # not engine hyperparameters: the preset name and what to do after training
    overrides = {k: v for k, v in params.items() if k not in ("preset", "predict_dataset")}
    cfg = make_config(params.get("preset"), **overrides)
    if cfg.num_processes > settings.api.max_processes_per_job:
        raise InvalidConfigError(
            f"num_processes {cfg.num_processes} is above this service's maximum "
            f"{settings.api.max_processes_per_job}"
        )
    batch_layout(cfg.batch_size, cfg.num_processes, cfg.micro_batch_size)  # the split must divide
    return body.model_dump(mode="json", exclude_none=True)


def validate_predictions(
    body: PredictionsCreate, model: AdaptedModel, settings: Settings, owns_job: OwnsJob
) -> dict[str, Any]:
    """The spec of a predictions job: the dataset URI under the jobs' policy, plus what the worker
    needs of the model (its artifact and classes) so the job does not depend on the model row."""
    validate_request_uri(body.dataset_uri, settings, owns_job, "dir")
    if body.callback_url:
        validate_webhook_url(body.callback_url, settings.webhooks)
    return {
        **body.model_dump(mode="json", exclude_none=True),
        "model_id": str(model.id),
        "artifact_key": model.artifact_key,
        "class_names": list(model.class_names),
        "base_model": dict(model.base_model or {}),
    }
