"""/v1/jobs: submit, read, list and cancel adaptation jobs."""

from __future__ import annotations

import logging
import uuid
from typing import Any, Literal

from fastapi import APIRouter, Header, Query, Request, Response, status
from sqlalchemy.orm import Session

from api.deps import QueueDep, SessionDep, SettingsDep, StoreDep, TenantDep
from api.downloads import stream_object
from api.errors import ApiError
from api.queue import JobQueue
from must_core.db.models import Job
from must_core.jobs import queries
from must_core.jobs.dispatch import job_processes
from must_core.jobs.inputs import INT64_MAX
from must_core.jobs.schemas import JobCreate, JobList, JobRead, StatusFilter
from must_core.jobs.states import JobKind, JobStatus
from must_core.jobs.validate import validate_job
from must_core.jobs.views import job_view
from must_core.storage.keys import job_prefix, predictions_key

_logger = logging.getLogger(__name__)
router = APIRouter(prefix="/jobs", tags=["jobs"])

_PROBLEMS: dict[int | str, dict[str, Any]] = {
    401: {"description": "Missing or invalid API key (problem+json)"}
}


@router.post(
    "",
    status_code=status.HTTP_202_ACCEPTED,
    response_model=JobRead,
    responses={
        **_PROBLEMS,
        403: {"description": "URI refused by policy (uri_forbidden)"},
        409: {"description": "Idempotency-Key reused with a different body"},
        422: {"description": "invalid_uri, invalid_config or validation_error"},
    },
)
def submit_job(
    body: JobCreate,
    session: SessionDep,
    tenant: TenantDep,
    settings: SettingsDep,
    queue: QueueDep,
    idempotency_key: str | None = Header(
        None,
        min_length=1,
        max_length=200,
        pattern=r"^[\x21-\x7e]+$",
        description="Retries with the same key (and body) return the same job",
    ),
) -> JobRead:
    """Submit an adaptation job. Returns at once with status ``queued``; poll ``GET /v1/jobs/{id}``.

    With ``Idempotency-Key`` a retried submission returns the job the first one created (409 if
    the key comes with a different body).
    """
    spec = validate_job(body, settings, lambda jid: queries.owns_job(session, tenant, jid))
    job, created = queries.create_job_once(session, tenant, spec, idempotency_key)
    if not created:
        return job_view(job)
    return commit_and_send(session, queue, job)


def commit_and_send(session: Session, queue: JobQueue, job: Job) -> JobRead:
    """The row is the truth: commit before sending, so the worker always finds it; a failed send
    leaves the row to the outbox relay."""
    session.commit()
    try:
        queue.send_job(str(job.id), job_processes(job.spec))
        queries.mark_enqueued(session, job.id)
        session.commit()
    except Exception:
        _logger.exception("could not enqueue job %s; the sweeper will re-send it", job.id)
    return job_view(job)


@router.get("", response_model=JobList, responses=_PROBLEMS)
def list_jobs(
    session: SessionDep,
    tenant: TenantDep,
    settings: SettingsDep,
    status_: StatusFilter | None = Query(None, alias="status"),
    limit: int = Query(20, ge=1, le=1000),
    offset: int = Query(0, ge=0, le=INT64_MAX),
) -> JobList:
    """The caller's jobs, newest first, optionally filtered by status."""
    limit = min(limit, settings.api.max_page_size)
    items, total = queries.list_jobs(session, tenant, status=status_, limit=limit, offset=offset)
    return JobList(items=[job_view(j) for j in items], total=total, limit=limit, offset=offset)


@router.get(
    "/{job_id}",
    response_model=JobRead,
    responses={**_PROBLEMS, 404: {"description": "No such job for this tenant"}},
)
def get_job(job_id: uuid.UUID, session: SessionDep, tenant: TenantDep) -> JobRead:
    """Status, progress, metrics, model id (when succeeded) and error (when failed)."""
    return job_view(queries.get_job(session, tenant, job_id))


@router.delete(
    "/{job_id}",
    status_code=status.HTTP_204_NO_CONTENT,
    responses={
        **_PROBLEMS,
        404: {"description": "No such job for this tenant"},
        409: {"description": "The job has not finished (job_not_finished)"},
        503: {"description": "Object store unavailable; nothing was deleted"},
    },
)
def delete_job(
    job_id: uuid.UUID, request: Request, session: SessionDep, tenant: TenantDep, store: StoreDep
) -> Response:
    """Delete a finished job: its row, its model and every stored artifact (checkpoint, model,
    metrics). Artifacts go first, so a storage failure leaves the job as it was (503)."""
    job = queries.get_job(session, tenant, job_id)
    queries.require_finished(job)
    store.delete_prefix(job_prefix(job_id))
    model_id = queries.delete_job(session, job)
    session.commit()
    if model_id is not None:
        request.app.state.serving.evict(model_id)
    return Response(status_code=status.HTTP_204_NO_CONTENT)


@router.post(
    "/{job_id}/cancel",
    response_model=JobRead,
    responses={
        **_PROBLEMS,
        404: {"description": "No such job for this tenant"},
        409: {"description": "Job already succeeded or failed"},
    },
)
def cancel_job(job_id: uuid.UUID, session: SessionDep, tenant: TenantDep) -> JobRead:
    """Idempotent: a queued job never starts; a running one stops at its next step."""
    job = queries.request_cancel(session, queries.get_job(session, tenant, job_id))
    return job_view(job)


@router.post(
    "/{job_id}/resume",
    status_code=status.HTTP_202_ACCEPTED,
    response_model=JobRead,
    responses={
        **_PROBLEMS,
        404: {"description": "No such job for this tenant"},
        409: {"description": "The job is not failed or cancelled (job_not_resumable)"},
    },
)
def resume_job(
    job_id: uuid.UUID, session: SessionDep, tenant: TenantDep, queue: QueueDep
) -> JobRead:
    """Queue a cancelled or failed job again. It continues from its last stored checkpoint
    (``checkpoint_step``; a predictions job from the files it had done) rather than from 0;
    ``resumed_from_step`` shows where it picked up."""
    job = queries.resume_job(session, queries.get_job(session, tenant, job_id))
    return commit_and_send(session, queue, job)


@router.get(
    "/{job_id}/predictions",
    responses={
        **_PROBLEMS,
        200: {
            "description": "JSONL (one object per image: path, label, score, top_k) or CSV",
            "content": {"application/x-ndjson": {}, "text/csv": {}},
        },
        404: {"description": "No such job for this tenant"},
        409: {"description": "The job has no predictions (yet) (predictions_not_ready)"},
    },
)
def download_predictions(
    job_id: uuid.UUID,
    session: SessionDep,
    tenant: TenantDep,
    store: StoreDep,
    format: Literal["jsonl", "csv"] = Query("jsonl", description="jsonl or csv"),
) -> Response:
    """The predictions of a succeeded predictions job (or of an adaptation job run with
    ``params.predict_dataset``), streamed. Paths are relative to the dataset URI."""
    job = queries.get_job(session, tenant, job_id)
    summary = (job.metrics or {}).get("predictions") or {}
    if job.status != JobStatus.SUCCEEDED or summary.get("status") != "completed":
        raise ApiError(
            "predictions_not_ready",
            f"job {job_id} ({job.kind}, {job.status}) has no completed predictions",
        )
    media = "application/x-ndjson" if format == "jsonl" else "text/csv"
    kind = "predictions" if job.kind == JobKind.PREDICT else "dataset-predictions"
    return stream_object(
        store, predictions_key(job.id, format), media, f"{kind}-{job.id}.{format}", digest=None
    )
