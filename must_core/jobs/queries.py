"""Every job/model query. Functions take a Session and only flush; the caller's unit of work commits.

Worker-side writes are conditional on ``(status='running', attempt=<the claim's attempt>)`` so a worker
that lost its claim (sweeper re-queued the job) can never overwrite the new attempt's row.
"""

from __future__ import annotations

import hashlib
import json
import uuid
from datetime import datetime, timedelta
from typing import Any

from sqlalchemy import delete, func, select, update
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from must_core.db.base import utcnow
from must_core.db.models import AdaptedModel, Job, Tenant
from must_core.errors import MustError
from must_core.jobs.states import RESUMABLE, TERMINAL, JobKind, JobStatus

DEFAULT_TENANT = "default"


class NotFoundError(MustError):
    code = "not_found"


class JobNotCancellableError(MustError):
    code = "job_not_cancellable"


class IdempotencyConflictError(MustError):
    code = "idempotency_conflict"


def _rows(result: Any) -> int:
    """Rows matched by an UPDATE (CursorResult.rowcount)."""
    return int(result.rowcount)


# ---- tenants ---------------------------------------------------------------------------------
def get_or_create_tenant(session: Session, name: str) -> Tenant:
    tenant = session.scalar(select(Tenant).where(Tenant.name == name))
    if tenant is None:
        tenant = Tenant(name=name)
        session.add(tenant)
        session.flush()
    return tenant


# ---- jobs: API side ------------------------------------------------------------------------------
def create_job(
    session: Session,
    tenant_id: uuid.UUID,
    spec: dict[str, Any],
    idempotency_key: str | None = None,
    kind: JobKind = JobKind.ADAPT,
) -> Job:
    now = utcnow()
    job = Job(
        tenant_id=tenant_id,
        kind=kind.value,
        idempotency_key=idempotency_key,
        request_hash=spec_hash(spec) if idempotency_key else None,
        status=JobStatus.QUEUED.value,
        spec=spec,
        progress={},
        metrics={},
        dataset_stats={},
        attempt=0,
        cancel_requested=False,
        created_at=now,
        updated_at=now,
    )
    session.add(job)
    session.flush()
    return job


def spec_hash(spec: dict[str, Any]) -> str:
    return hashlib.sha256(json.dumps(spec, sort_keys=True).encode()).hexdigest()


def job_for_key(
    session: Session, tenant_id: uuid.UUID, key: str, spec: dict[str, Any]
) -> Job | None:
    """The tenant's job created with this Idempotency-Key, or None; 409 if its body differed."""
    job = session.scalar(select(Job).where(Job.tenant_id == tenant_id, Job.idempotency_key == key))
    if job is not None and job.request_hash != spec_hash(spec):
        raise IdempotencyConflictError("this Idempotency-Key was used with a different body")
    return job


def create_job_once(
    session: Session,
    tenant_id: uuid.UUID,
    spec: dict[str, Any],
    key: str | None,
    kind: JobKind = JobKind.ADAPT,
) -> tuple[Job, bool]:
    """(job, created). With a key, a concurrent duplicate loses on the unique constraint and
    gets the winner's job."""
    if key is None:
        return create_job(session, tenant_id, spec, kind=kind), True
    existing = job_for_key(session, tenant_id, key, spec)
    if existing is not None:
        return existing, False
    try:
        with session.begin_nested():
            return create_job(session, tenant_id, spec, key, kind=kind), True
    except IntegrityError:
        winner = job_for_key(session, tenant_id, key, spec)
        if winner is None:
            raise
        return winner, False


def mark_enqueued(session: Session, job_id: uuid.UUID) -> None:
    session.execute(update(Job).where(Job.id == job_id).values(enqueued_at=utcnow()))


def get_job(session: Session, tenant_id: uuid.UUID, job_id: uuid.UUID) -> Job:
    """The tenant's job, or NotFoundError (also for other tenants' jobs: no existence leak)."""
    job = session.scalar(select(Job).where(Job.id == job_id, Job.tenant_id == tenant_id))
    if job is None:
        raise NotFoundError(f"job {job_id} not found")
    return job


def owns_job(session: Session, tenant_id: uuid.UUID, job_id: uuid.UUID) -> bool:
    return (
        session.scalar(select(Job.id).where(Job.id == job_id, Job.tenant_id == tenant_id))
        is not None
    )


def list_jobs(
    session: Session, tenant_id: uuid.UUID, *, status: str | None, limit: int, offset: int
) -> tuple[list[Job], int]:
    query = select(Job).where(Job.tenant_id == tenant_id)
    if status is not None:
        query = query.where(Job.status == status)
    total = session.scalar(select(func.count()).select_from(query.subquery())) or 0
    items = session.scalars(
        query.order_by(Job.created_at.desc(), Job.id.desc()).limit(limit).offset(offset)
    ).all()
    return list(items), int(total)


def request_cancel(session: Session, job: Job) -> Job:
    """Idempotent. A queued job is cancelled at once; a running one stops at its next step."""
    now = utcnow()
    if job.status == JobStatus.CANCELLED:
        return job
    if job.status in TERMINAL:
        raise JobNotCancellableError(f"job {job.id} already {job.status}")
    # Conditional: the worker may claim the job between our read and this write.
    res = session.execute(
        update(Job)
        .where(Job.id == job.id, Job.status == JobStatus.QUEUED.value)
        .values(
            status=JobStatus.CANCELLED.value, cancel_requested=True, finished_at=now, updated_at=now
        )
    )
    if _rows(res) == 0:
        session.execute(
            update(Job)
            .where(Job.id == job.id, Job.status == JobStatus.RUNNING.value)
            .values(cancel_requested=True, updated_at=now)
        )
    session.refresh(job)
    return job


# ---- jobs: worker side ---------------------------------------------------------------------------
def claim_job(session: Session, job_id: uuid.UUID, worker: str) -> int | None:
    """queued → running with attempt+1. Returns the new attempt, or None if someone else has it."""
    now = utcnow()
    res = session.execute(
        update(Job)
        .where(
            Job.id == job_id, Job.status == JobStatus.QUEUED.value, Job.cancel_requested.is_(False)
        )
        .values(
            status=JobStatus.RUNNING.value,
            attempt=Job.attempt + 1,
            heartbeat_at=now,
            started_at=func.coalesce(Job.started_at, now),
            worker=worker,
            updated_at=now,
            error_code=None,
            error_message=None,
        )
    )
    if _rows(res) != 1:
        return None
    attempt = session.scalar(select(Job.attempt).where(Job.id == job_id))
    return int(attempt) if attempt is not None else None


def _owned(job_id: uuid.UUID, attempt: int) -> Any:
    return (Job.id == job_id) & (Job.status == JobStatus.RUNNING.value) & (Job.attempt == attempt)


def heartbeat(session: Session, job_id: uuid.UUID, attempt: int) -> tuple[bool, bool]:
    """Touch heartbeat_at. Returns (still owned, cancel requested)."""
    now = utcnow()
    res = session.execute(update(Job).where(_owned(job_id, attempt)).values(heartbeat_at=now))
    cancel = session.scalar(select(Job.cancel_requested).where(Job.id == job_id))
    return _rows(res) == 1, bool(cancel)


def update_running(session: Session, job_id: uuid.UUID, attempt: int, **values: Any) -> bool:
    """Write progress/metrics/stats fields while the claim is ours (also refreshes the heartbeat)."""
    now = utcnow()
    res = session.execute(
        update(Job)
        .where(_owned(job_id, attempt))
        .values(heartbeat_at=now, updated_at=now, **values)
    )
    return _rows(res) == 1


def finish_job(
    session: Session,
    job_id: uuid.UUID,
    attempt: int,
    status: JobStatus,
    *,
    error_code: str | None = None,
    error_message: str | None = None,
    **values: Any,
) -> bool:
    now = utcnow()
    res = session.execute(
        update(Job)
        .where(_owned(job_id, attempt))
        .values(
            status=status.value,
            finished_at=now,
            updated_at=now,
            heartbeat_at=now,
            error_code=error_code,
            error_message=error_message,
            **values,
        )
    )
    return _rows(res) == 1


def release_job(session: Session, job_id: uuid.UUID, attempt: int) -> bool:
    """running → queued after a transient infrastructure error, so a retry can claim it again."""
    now = utcnow()
    res = session.execute(
        update(Job)
        .where(_owned(job_id, attempt))
        .values(
            status=JobStatus.QUEUED.value,
            updated_at=now,
            enqueued_at=now,
            transient_retries=Job.transient_retries + 1,
        )
    )
    return _rows(res) == 1


def complete_job(
    session: Session, job: Job, attempt: int, *, model: AdaptedModel, values: dict[str, Any]
) -> bool:
    """Record the model and mark the job succeeded in one transaction."""
    session.add(model)
    session.flush()
    return finish_job(session, job.id, attempt, JobStatus.SUCCEEDED, model_id=model.id, **values)


def load_job(session: Session, job_id: uuid.UUID) -> Job | None:
    return session.get(Job, job_id)


# ---- sweeper -------------------------------------------------------------------------------------
def sweep_stale(
    session: Session, *, now: datetime, stale_after_s: float, max_attempts: int
) -> tuple[list[uuid.UUID], list[uuid.UUID]]:
    """Running jobs whose heartbeat is older than ``stale_after_s``: re-queue them (they resume from
    their checkpoint) while attempts are left, else fail them with ``worker_lost``.

    Returns (re-queued ids, failed ids). Each row is updated conditionally, so concurrent sweepers in
    several workers cannot double-handle a job.
    """
    cutoff = now - timedelta(seconds=stale_after_s)
    stale = session.execute(
        select(Job.id, Job.attempt, Job.transient_retries, Job.cancel_requested).where(
            Job.status == JobStatus.RUNNING.value, Job.heartbeat_at < cutoff
        )
    ).all()
    requeued: list[uuid.UUID] = []
    failed: list[uuid.UUID] = []
    for job_id, attempt, transient, cancel in stale:
        cond = _owned(job_id, attempt) & (Job.heartbeat_at < cutoff)
        if cancel:
            values: dict[str, Any] = {"status": JobStatus.CANCELLED.value, "finished_at": now}
        elif attempt - (transient or 0) >= max_attempts:  # worker deaths, not transient retries
            values = {
                "status": JobStatus.FAILED.value,
                "finished_at": now,
                "error_code": "worker_lost",
                "error_message": f"worker stopped heartbeating {attempt} time(s); giving up",
            }
        else:
            values = {"status": JobStatus.QUEUED.value, "enqueued_at": now}
        res = session.execute(update(Job).where(cond).values(updated_at=now, **values))
        if _rows(res) == 1:
            (requeued if values["status"] == JobStatus.QUEUED.value else failed).append(job_id)
    return requeued, failed


def queued_due_for_resend(session: Session, *, now: datetime, after_s: float) -> list[uuid.UUID]:
    """Queued jobs whose message may be lost (never sent, expired): bump enqueued_at, return ids."""
    cutoff = now - timedelta(seconds=after_s)
    ids = list(
        session.scalars(
            select(Job.id)
            .where(
                Job.status == JobStatus.QUEUED.value,
                (Job.enqueued_at.is_(None) & (Job.created_at < cutoff))
                | (Job.enqueued_at < cutoff),
            )
            .limit(1000)
        )
    )
    if ids:
        session.execute(update(Job).where(Job.id.in_(ids)).values(enqueued_at=now))
    return ids


def unsent_jobs(session: Session, *, now: datetime, grace_s: float) -> list[uuid.UUID]:
    """The outbox: committed queued jobs whose message was never sent (``enqueued_at`` unset) and
    whose submitter had ``grace_s`` to send it; marked as sent here, in the relay's transaction."""
    cutoff = now - timedelta(seconds=grace_s)
    ids = list(
        session.scalars(
            select(Job.id)
            .where(
                Job.status == JobStatus.QUEUED.value,
                Job.enqueued_at.is_(None),
                Job.created_at <= cutoff,
            )
            .limit(1000)
        )
    )
    if ids:
        session.execute(
            update(Job).where(Job.id.in_(ids), Job.enqueued_at.is_(None)).values(enqueued_at=now)
        )
    return ids


def queued_sent_before(session: Session, *, cutoff: datetime) -> list[uuid.UUID]:
    """Queued jobs whose message was sent before ``cutoff`` (candidates for a lost message)."""
    return list(
        session.scalars(
            select(Job.id)
            .where(Job.status == JobStatus.QUEUED.value, Job.enqueued_at < cutoff)
            .limit(1000)
        )
    )


def mark_resent(session: Session, ids: list[uuid.UUID], *, now: datetime) -> list[uuid.UUID]:
    """Bump ``enqueued_at`` of jobs still queued; returns those this caller will send."""
    sent = []
    for job_id in ids:
        res = session.execute(
            update(Job)
            .where(Job.id == job_id, Job.status == JobStatus.QUEUED.value)
            .values(enqueued_at=now)
        )
        if _rows(res) == 1:
            sent.append(job_id)
    return sent


def processes_of(session: Session, ids: list[uuid.UUID]) -> dict[uuid.UUID, int]:
    """Training processes each job asked for (routes its message to a worker that has them)."""
    from must_core.jobs.dispatch import job_processes

    if not ids:
        return {}
    rows = session.execute(select(Job.id, Job.spec).where(Job.id.in_(ids))).all()
    return {job_id: job_processes(spec or {}) for job_id, spec in rows}


# ---- models --------------------------------------------------------------------------------------
def list_models(
    session: Session, tenant_id: uuid.UUID, *, limit: int, offset: int
) -> tuple[list[AdaptedModel], int]:
    query = select(AdaptedModel).where(AdaptedModel.tenant_id == tenant_id)
    total = session.scalar(select(func.count()).select_from(query.subquery())) or 0
    items = session.scalars(
        query.order_by(AdaptedModel.created_at.desc(), AdaptedModel.id.desc())
        .limit(limit)
        .offset(offset)
    ).all()
    return list(items), int(total)


def get_model(session: Session, tenant_id: uuid.UUID, model_id: uuid.UUID) -> AdaptedModel:
    model = session.scalar(
        select(AdaptedModel).where(AdaptedModel.id == model_id, AdaptedModel.tenant_id == tenant_id)
    )
    if model is None:
        raise NotFoundError(f"model {model_id} not found")
    return model


class JobNotFinishedError(MustError):
    code = "job_not_finished"


def require_finished(job: Job) -> None:
    if job.status not in TERMINAL:
        raise JobNotFinishedError(
            f"job {job.id} is {job.status}; cancel it and wait until it stops"
        )


def delete_job(session: Session, job: Job) -> uuid.UUID | None:
    """Delete a finished job and its model row; returns the model id (to evict) or None."""
    require_finished(job)
    model_id = job.model_id
    session.execute(delete(AdaptedModel).where(AdaptedModel.job_id == job.id))
    session.delete(job)
    session.flush()
    return model_id


def checkpoints_to_purge(session: Session, *, cutoff: datetime) -> list[uuid.UUID]:
    """Finished jobs (before ``cutoff``) that still have a stored checkpoint."""
    return list(
        session.scalars(
            select(Job.id)
            .where(
                Job.status.in_([s.value for s in TERMINAL]),
                Job.finished_at < cutoff,
                Job.checkpoint_step.is_not(None),
            )
            .limit(200)
        )
    )


def mark_checkpoint_purged(session: Session, job_id: uuid.UUID) -> None:
    session.execute(update(Job).where(Job.id == job_id).values(checkpoint_step=None))


def delete_model(session: Session, model: AdaptedModel) -> None:
    session.execute(update(Job).where(Job.model_id == model.id).values(model_id=None))
    session.delete(model)
    session.flush()


class JobNotResumableError(MustError):
    code = "job_not_resumable"


def resume_job(session: Session, job: Job) -> Job:
    """failed | cancelled → queued; the next claim continues from the stored checkpoint (if any).

    Conditional on the status read, so two concurrent resumes queue the job once.
    """
    if job.status not in RESUMABLE:
        raise JobNotResumableError(
            f"job {job.id} is {job.status}; only failed or cancelled jobs can be resumed"
        )
    now = utcnow()
    res = session.execute(
        update(Job)
        .where(Job.id == job.id, Job.status == job.status)
        .values(
            status=JobStatus.QUEUED.value,
            cancel_requested=False,
            error_code=None,
            error_message=None,
            finished_at=None,
            enqueued_at=None,
            updated_at=now,
        )
    )
    if _rows(res) == 0:
        session.refresh(job)
        raise JobNotResumableError(f"job {job.id} changed state concurrently ({job.status})")
    session.refresh(job)
    return job


# ---- model names, versions and tags -----------------------------------------------------------------
class ModelNotFoundError(NotFoundError):
    """No model for a reference (id, name, name:tag or name:VERSION) in this tenant."""


LATEST = "latest"


def name_model(session: Session, model: AdaptedModel, name: str | None, tags: list[str]) -> None:
    """Give a new model the next version of ``name`` and move ``tags`` onto it.

    The tenant row is locked first (PostgreSQL), so two jobs finishing together under one name get
    distinct versions; SQLite serialises writers anyway.
    """
    if name is None:
        return
    session.execute(select(Tenant.id).where(Tenant.id == model.tenant_id).with_for_update())
    latest = session.scalar(
        select(func.max(AdaptedModel.version)).where(
            AdaptedModel.tenant_id == model.tenant_id, AdaptedModel.name == name
        )
    )
    model.name, model.version, model.tags = name, int(latest or 0) + 1, []
    session.flush()
    set_model_tags(session, model, tags)


def set_model_tags(session: Session, model: AdaptedModel, tags: list[str]) -> None:
    """Replace ``model``'s tags; each tag leaves any other version of the same name (one target)."""
    if model.name is None and tags:
        raise ModelNotNamedError("only a named model can have tags (give the job a name)")
    wanted = sorted(set(tags))
    others = session.scalars(
        select(AdaptedModel).where(
            AdaptedModel.tenant_id == model.tenant_id,
            AdaptedModel.name == model.name,
            AdaptedModel.id != model.id,
        )
    ).all()
    for other in others:
        if set(other.tags or []) & set(wanted):
            other.tags = [t for t in other.tags if t not in wanted]
    model.tags = wanted
    session.flush()


class ModelNotNamedError(MustError):
    code = "model_not_named"


def resolve_model(session: Session, tenant_id: uuid.UUID, ref: str) -> AdaptedModel:
    """A model by id, ``name`` / ``name:latest`` (newest version), ``name:VERSION`` or ``name:TAG``."""
    try:
        return get_model(session, tenant_id, uuid.UUID(ref))
    except ValueError:
        pass
    name, _, tag = ref.partition(":")
    tag = tag or LATEST
    versions = session.scalars(
        select(AdaptedModel)
        .where(AdaptedModel.tenant_id == tenant_id, AdaptedModel.name == name)
        .order_by(AdaptedModel.version.desc())
    ).all()
    if tag == LATEST:
        found = versions[:1]
    elif tag.isdigit():
        found = [m for m in versions if m.version == int(tag)]
    else:
        found = [m for m in versions if tag in (m.tags or [])]
    if not found:
        raise ModelNotFoundError(f"model {ref!r} not found")
    return found[0]
