"""/v1/models: adapted models produced by succeeded jobs."""

from __future__ import annotations

import logging
import uuid
from typing import Any

from fastapi import APIRouter, Query, Request, Response, status

from api.deps import SessionDep, SettingsDep, StoreDep, TenantDep
from must_core.jobs import queries
from must_core.jobs.inputs import INT64_MAX
from must_core.jobs.schemas import ModelList, ModelRead
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
