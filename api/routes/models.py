"""/v1/models: adapted models produced by succeeded jobs."""

from __future__ import annotations

import logging
import uuid
from typing import Any, Literal

from fastapi import APIRouter, Path, Query, Request, Response, status

from api.deps import QueueDep, SessionDep, SettingsDep, StoreDep, TenantDep
from api.downloads import stream_object
from api.errors import ApiError
from api.routes.jobs import commit_and_send
from must_core.jobs import queries
from must_core.jobs.inputs import INT64_MAX
from must_core.jobs.schemas import (
    JobRead,
    ModelList,
    ModelRead,
    ModelTagsUpdate,
    PredictionsCreate,
)
from must_core.jobs.states import JobKind
from must_core.jobs.validate import validate_predictions
from must_core.jobs.views import model_view
from must_core.storage.keys import model_prefix

_logger = logging.getLogger(__name__)
router = APIRouter(prefix="/models", tags=["models"])
_404: dict[int | str, dict[str, Any]] = {404: {"description": "No such model for this tenant"}}


@router.get("", response_model=ModelList)
def list_models(
    session: SessionDep,
    tenant: TenantDep,
    settings: SettingsDep,
    limit: int = Query(20, ge=1, le=1000),
    offset: int = Query(0, ge=0, le=INT64_MAX),
) -> ModelList:
    """The caller's adapted models, newest first."""
    limit = min(limit, settings.api.max_page_size)
    items, total = queries.list_models(session, tenant, limit=limit, offset=offset)
    return ModelList(items=[model_view(m) for m in items], total=total, limit=limit, offset=offset)


@router.get("/{model_id}", response_model=ModelRead, responses=_404)
def get_model(model_id: uuid.UUID, session: SessionDep, tenant: TenantDep) -> ModelRead:
    """Classes, base model, source job, metrics and size of one adapted model."""
    return model_view(queries.get_model(session, tenant, model_id))


@router.delete("/{model_id}", status_code=status.HTTP_204_NO_CONTENT, responses=_404)
def delete_model(
    model_id: uuid.UUID, request: Request, session: SessionDep, tenant: TenantDep, store: StoreDep
) -> Response:
    """Delete the model row and its weight files (the job and its checkpoint stay); the model is
    evicted from this API process's classifier cache."""
    model = queries.get_model(session, tenant, model_id)
    job_id = model.job_id
    queries.delete_model(session, model)
    session.commit()
    request.app.state.serving.evict(model_id)
    try:
        store.delete_prefix(model_prefix(job_id))
    except Exception:
        _logger.exception(
            "model %s deleted but its files under %s remain", model_id, model_prefix(job_id)
        )
    return Response(status_code=status.HTTP_204_NO_CONTENT)


ModelRef = Path(
    ...,
    max_length=300,
    description="a model id, or a name: ``name`` / ``name:latest`` (newest version), "
    "``name:VERSION`` or ``name:TAG``",
    examples=["shelf-photos:latest"],
)


@router.get(
    "/{model_id}/download",
    responses={
        **_404,
        200: {
            "description": "The file, streamed, with Content-Length and Repr-Digest (SHA-256)",
            "content": {"application/octet-stream": {}},
        },
        409: {"description": "This model has no file in that format (format_not_available)"},
        503: {"description": "Object store unavailable"},
    },
)
def download_model(
    session: SessionDep,
    tenant: TenantDep,
    store: StoreDep,
    model_id: str = ModelRef,
    format: Literal["safetensors", "onnx", "safetensors_ema"] = Query(
        "safetensors",
        description="safetensors (what must predict/eval load), onnx (images → logits), "
        "or safetensors_ema (the EMA teacher)",
    ),
) -> Response:
    """Download an adapted model: the ``must-classifier/1`` safetensors file (vision tower +
    classifier, metadata with class names and preprocessing), its ONNX export, or the EMA
    teacher. ``Repr-Digest: sha-256=:BASE64:`` (and ``ETag``: the hex digest) let the client
    verify the bytes."""
    model = queries.resolve_model(session, tenant, model_id)
    choices = {
        "safetensors": (model.artifact_key, model.sha256),
        "onnx": (model.onnx_key, model.onnx_sha256),
        "safetensors_ema": (model.ema_artifact_key, None),
    }
    key, digest = choices[format]
    if key is None:
        raise ApiError("format_not_available", f"model {model.id} has no {format} file")
    ext = "onnx" if format == "onnx" else "safetensors"
    name = f"{model.name}-v{model.version}" if model.name else str(model.id)
    suffix = "-ema" if format == "safetensors_ema" else ""
    return stream_object(
        store, key, "application/octet-stream", f"{name}{suffix}.{ext}", digest=digest
    )


@router.patch(
    "/{model_id}",
    response_model=ModelRead,
    responses={**_404, 409: {"description": "The model has no name (model_not_named)"}},
)
def update_model(
    model_id: uuid.UUID, body: ModelTagsUpdate, session: SessionDep, tenant: TenantDep
) -> ModelRead:
    """Set a named model's tags. A tag points at one version of a name: setting it here moves
    it off any other version (``name:TAG`` then resolves to this model)."""
    model = queries.get_model(session, tenant, model_id)
    queries.set_model_tags(session, model, body.tags)
    session.commit()
    return model_view(model)


@router.post(
    "/{model_id}/predictions",
    status_code=status.HTTP_202_ACCEPTED,
    response_model=JobRead,
    responses={
        **_404,
        403: {"description": "URI refused by policy (uri_forbidden)"},
        422: {"description": "invalid_uri or validation_error"},
    },
)
def submit_predictions(
    body: PredictionsCreate,
    session: SessionDep,
    tenant: TenantDep,
    settings: SettingsDep,
    queue: QueueDep,
    model_id: str = ModelRef,
) -> JobRead:
    """Label every image under ``dataset_uri`` with this model, as a job (kind ``predict``) with
    progress, cancel and resume. When it succeeds, ``GET /v1/jobs/{id}/predictions?format=jsonl``
    (or ``csv``) streams one row per image: path (relative to the URI), label, score, top_k."""
    model = queries.resolve_model(session, tenant, model_id)
    spec = validate_predictions(
        body, model, settings, lambda jid: queries.owns_job(session, tenant, jid)
    )
    job = queries.create_job(session, tenant, spec, kind=JobKind.PREDICT)
    return commit_and_send(session, queue, job)
