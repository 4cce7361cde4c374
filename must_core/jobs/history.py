"""What a job leaves to look at: its events (training curve, health intervals), its log lines and
its model's sample gallery. Writes come from the worker, reads from the API; functions only flush.
"""

from __future__ import annotations

import uuid
from collections.abc import Iterable, Sequence
from datetime import datetime
from typing import Any

from sqlalchemy import delete, func, select, tuple_
from sqlalchemy.orm import Session

from must_core.db.models import Job, JobEvent, JobLog, ModelSample

PROGRESS, HEALTH = "progress", "health"


# ---- events ----------------------------------------------------------------------------------------
def record_events(
    session: Session, job_id: uuid.UUID, attempt: int, events: Sequence[dict[str, Any]]
) -> bool:
    """Store trainer events (each with ``type`` and ``step``) unless the attempt lost its claim.
    A step already stored for that kind (replayed after a resume) is replaced."""
    current = session.scalar(select(Job.attempt).where(Job.id == job_id))
    if current != attempt:
        return False
    keys = {(str(e["type"]), int(e["step"])) for e in events}
    if not keys:
        return True
    session.execute(
        delete(JobEvent).where(
            JobEvent.job_id == job_id, tuple_(JobEvent.kind, JobEvent.step).in_(list(keys))
        )
    )
    latest = {(str(e["type"]), int(e["step"])): e for e in events}  # the last of a repeated step
    session.add_all(
        JobEvent(
            job_id=job_id,
            kind=kind,
            step=step,
            attempt=attempt,
            data={k: v for k, v in e.items() if k != "type"},
        )
        for (kind, step), e in latest.items()
    )
    session.flush()
    return True


def events(
    session: Session, job_id: uuid.UUID, kind: str, after_step: int | None = None
) -> list[dict[str, Any]]:
    """Every stored event of one kind (after ``after_step``, when given), by step."""
    where = [JobEvent.job_id == job_id, JobEvent.kind == kind]
    if after_step is not None:
        where.append(JobEvent.step > after_step)
    rows = session.scalars(select(JobEvent.data).where(*where).order_by(JobEvent.step))
    return [dict(r) for r in rows]


# ---- logs ------------------------------------------------------------------------------------------
def record_logs(session: Session, job_id: uuid.UUID, lines: Iterable[dict[str, Any]]) -> int:
    """Append log lines ``{attempt, created_at, level, logger, message}``."""
    rows = [JobLog(job_id=job_id, **line) for line in lines]
    session.add_all(rows)
    session.flush()
    return len(rows)


def logs(
    session: Session,
    job_id: uuid.UUID,
    *,
    after: int | None,
    limit: int,
    attempt: int | None = None,
    tail: bool = False,
) -> tuple[list[JobLog], int]:
    """A page of log lines in write order: those after the line id ``after``, or the last ``limit``
    (``tail``). Returns the page and the count of lines matching the filter."""
    where = [JobLog.job_id == job_id]
    if attempt is not None:
        where.append(JobLog.attempt == attempt)
    total = session.scalar(select(func.count()).select_from(JobLog).where(*where)) or 0
    if after is not None:
        where.append(JobLog.id > after)
    query = select(JobLog).where(*where)
    if tail:
        rows = list(session.scalars(query.order_by(JobLog.id.desc()).limit(limit)))
        return rows[::-1], total
    return list(session.scalars(query.order_by(JobLog.id).limit(limit))), total


# ---- samples ---------------------------------------------------------------------------------------
def sample_rows(model_id: uuid.UUID, gallery: dict[str, list[dict[str, Any]]]) -> list[ModelSample]:
    """Rows for a ``gallery.json`` (class name → best-first images)."""
    return [
        ModelSample(
            model_id=model_id,
            class_name=name,
            rank=rank,
            path=str(item["path"]),
            score=float(item["score"]),
            thumbnail=str(item["thumbnail"]),
        )
        for name, items in gallery.items()
        for rank, item in enumerate(items)
    ]


def samples(
    session: Session, model_id: uuid.UUID, class_name: str | None, limit: int
) -> list[ModelSample]:
    """The gallery of a model, best first per class: one class, or the first ``limit`` of each."""
    query = select(ModelSample).where(ModelSample.model_id == model_id, ModelSample.rank < limit)
    if class_name is not None:
        query = query.where(ModelSample.class_name == class_name)
    return list(session.scalars(query.order_by(ModelSample.class_name, ModelSample.rank)))


def delete_samples(session: Session, model_id: uuid.UUID) -> None:
    session.execute(delete(ModelSample).where(ModelSample.model_id == model_id))


def log_line(
    attempt: int, created_at: datetime, level: str, logger: str, message: str
) -> dict[str, Any]:
    return {
        "attempt": attempt,
        "created_at": created_at,
        "level": level,
        "logger": logger[:200],
        "message": message,
    }
