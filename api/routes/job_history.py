"""/v1/jobs/{id}/history, /logs and /samples: what a job leaves to look at (the console draws them)."""

from __future__ import annotations

import uuid
from typing import Any

from fastapi import APIRouter, Query

from api.deps import SessionDep, TenantDep
from api.errors import ApiError
from must_core.jobs import history, queries
from must_core.jobs.history import HEALTH, PROGRESS
from must_core.jobs.inputs import INT64_MAX
from must_core.jobs.schemas import HistoryPoint, JobHistory, LogLine, LogPage, Sample, SampleList
from must_core.jobs.states import JobStatus

router = APIRouter(prefix="/jobs", tags=["jobs"])
INT32_MAX = 2**31 - 1
_404: dict[int | str, dict[str, Any]] = {404: {"description": "No such job for this tenant"}}


@router.get("/{job_id}/history", response_model=JobHistory, responses=_404)
def job_history(
    job_id: uuid.UUID,
    session: SessionDep,
    tenant: TenantDep,
    after_step: int | None = Query(
        None,
        ge=0,
        le=INT32_MAX,  # steps are 32-bit integer columns
        description="only points (and health intervals) after this step: poll a running job "
        "with the last step you have",
    ),
) -> JobHistory:
    """The training curve (every progress event the trainer reported, also after the job ended),
    the label-free health intervals when the engine reports them, and the predicted-class
    histograms before and after adaptation (once the job has them)."""
    job = queries.get_job(session, tenant, job_id)
    points = history.events(session, job.id, PROGRESS, after_step)
    return JobHistory(
        job_id=job.id,
        status=JobStatus(job.status),
        points=[HistoryPoint.model_validate(e) for e in points],
        health=history.events(session, job.id, HEALTH, after_step),
        predicted_classes=(job.metrics or {}).get("predicted_classes"),
    )


@router.get("/{job_id}/logs", response_model=LogPage, responses=_404)
def job_logs(
    job_id: uuid.UUID,
    session: SessionDep,
    tenant: TenantDep,
    after: int | None = Query(
        None, ge=0, le=INT64_MAX, description="only lines after this line id (follow the log)"
    ),
    limit: int = Query(200, ge=1, le=1000),
    attempt: int | None = Query(None, ge=1, le=1_000_000, description="one attempt's lines"),
    tail: bool = Query(False, description="the last `limit` lines instead of the first"),
) -> LogPage:
    """The job's own log lines from its worker (runner and trainer, every attempt), in the order
    written. Page with ``after`` = the previous page's ``next_after``; poll the same way to tail."""
    job = queries.get_job(session, tenant, job_id)
    rows, total = history.logs(
        session, job.id, after=after, limit=limit, attempt=attempt, tail=tail
    )
    items = [
        LogLine(
            id=r.id,
            attempt=r.attempt,
            ts=r.created_at,
            level=r.level,
            logger=r.logger,
            message=r.message,
        )
        for r in rows
    ]
    return LogPage(items=items, total=total, next_after=items[-1].id if items else after)


@router.get(
    "/{job_id}/samples",
    response_model=SampleList,
    responses={
        **_404,
        409: {"description": "The job has not succeeded (job_not_finished)"},
        422: {"description": "Unknown class name (validation_error)"},
    },
)
def job_samples(
    job_id: uuid.UUID,
    session: SessionDep,
    tenant: TenantDep,
    class_: str | None = Query(
        None, alias="class", min_length=1, max_length=200, description="one class name"
    ),
    limit: int = Query(8, ge=1, le=100, description="images per class"),
) -> SampleList:
    """Label-free spot check: the dataset images the adapted model is most confident about, per
    predicted class (thumbnails with scores), computed at the end of the job over a fixed sample
    of its unlabeled set and stored with the model; with the predicted-class histograms."""
    job = queries.get_job(session, tenant, job_id)
    if job.status != JobStatus.SUCCEEDED.value:
        raise ApiError("job_not_finished", f"job is {job.status}: samples come at its end")
    if job.model_id is None:
        raise ApiError("not_found", "the job's model was deleted, and its samples with it")
    if class_ is not None and class_ not in (job.spec or {}).get("class_names", []):
        raise ApiError("validation_error", f"the job has no class named {class_!r}")
    rows = history.samples(session, job.model_id, class_, limit)
    return SampleList(
        job_id=job.id,
        model_id=job.model_id,
        class_name=class_,
        items=[
            Sample(
                class_name=r.class_name,
                rank=r.rank,
                path=r.path,
                score=r.score,
                thumbnail=r.thumbnail,
            )
            for r in rows
        ],
        predicted_classes=(job.metrics or {}).get("predicted_classes"),
    )
