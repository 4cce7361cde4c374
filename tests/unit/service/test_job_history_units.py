"""What the worker keeps of a job, on a real SQLite database (migrated with Alembic): curve events
replaced on replay and refused after a lost claim, log capture (other jobs' lines left out, the
per-attempt cap, lines kept through a database error), cascade on delete."""

from __future__ import annotations

import logging
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
from sqlalchemy import func, select, update
from sqlalchemy.orm import Session, sessionmaker

from must_core.cli.service import upgrade_database
from must_core.db.models import Job, JobEvent, JobLog
from must_core.db.session import make_engine, make_sessionmaker, session_scope
from must_core.jobs import history, queries
from must_core.logging import bind
from worker.joblog import JobLogCapture


@pytest.fixture
def db(tmp_path: Path) -> Iterator[sessionmaker[Session]]:
    url = f"sqlite:///{tmp_path / 'must.db'}"
    upgrade_database(url)
    engine = make_engine(url)
    yield make_sessionmaker(engine)
    engine.dispose()


def _job(db: sessionmaker[Session], attempt: int = 1) -> uuid.UUID:
    with session_scope(db) as s:
        tenant = queries.get_or_create_tenant(s, "t")
        job = queries.create_job(s, tenant.id, {"class_names": ["a", "b"]})
        job.attempt = attempt
        return job.id


def _points(steps: range, **extra: object) -> list[dict[str, object]]:
    return [{"type": "progress", "step": k, "losses": {"loss": 1.0 / k}, **extra} for k in steps]


def test_events_replayed_after_resume_replace_and_lost_claims_refused(
    db: sessionmaker[Session],
) -> None:
    jid = _job(db)
    with session_scope(db) as s:
        assert history.record_events(s, jid, 1, _points(range(1, 6), a=1))
        s.execute(update(Job).where(Job.id == jid).values(attempt=2))
    with session_scope(db) as s:  # attempt 2 resumed from the step-3 checkpoint: 4, 5 again
        assert history.record_events(s, jid, 2, _points(range(4, 8), a=2))
        assert not history.record_events(s, jid, 1, _points(range(8, 9), a=1))  # lost claim
        health = [{"type": "health", "step": 5, "entropy": 1.0}]
        assert history.record_events(s, jid, 2, health)
    with session_scope(db) as s:
        curve = history.events(s, jid, history.PROGRESS)
        assert [p["step"] for p in curve] == list(range(1, 8))
        assert [p["a"] for p in curve] == [1, 1, 1, 2, 2, 2, 2]
        assert history.events(s, jid, history.HEALTH) == [{"step": 5, "entropy": 1.0}]


def test_log_capture_keeps_its_job_only_and_caps_lines(db: sessionmaker[Session]) -> None:
    jid, other = _job(db), _job(db)
    log = logging.getLogger("test.joblog")
    log.setLevel(logging.INFO)
    with JobLogCapture(db, jid, 1, max_lines=3):
        with bind(job_id=str(jid)):
            log.info("mine %d", 1)
        with bind(job_id=str(other)):
            log.info("another job's line")
        log.info("unbound thread line")  # e.g. the trainer-output relay thread
        log.debug("below INFO")
        for i in range(5):
            log.warning("burst %d", i)
    with session_scope(db) as s:
        rows, total = history.logs(s, jid, after=None, limit=100)
        assert [r.message for r in rows] == [
            "mine 1",
            "unbound thread line",
            "burst 0",
            "4 more log lines dropped (over 3 per attempt)",
        ]
        assert total == 4 and rows[2].level == "warning" and rows[0].attempt == 1
        tail, _ = history.logs(s, jid, after=None, limit=2, tail=True)
        assert tail == rows[2:]
        after, _ = history.logs(s, jid, after=rows[1].id, limit=100)
        assert after == rows[2:]
        assert history.logs(s, other, after=None, limit=10)[1] == 0


def test_log_lines_survive_a_database_error(db: sessionmaker[Session], tmp_path: Path) -> None:
    jid = _job(db)
    broken = make_sessionmaker(make_engine(f"sqlite:///{tmp_path / 'missing' / 'x.db'}"))
    cap = JobLogCapture(broken, jid, 1, max_lines=10)
    cap.handle(
        logging.makeLogRecord({"name": "t", "msg": "kept", "levelno": 20, "levelname": "INFO"})
    )
    cap.flush()  # fails: the line stays buffered
    cap.sessions = db
    cap.flush()
    with session_scope(db) as s:
        assert [r.message for r in history.logs(s, jid, after=None, limit=10)[0]] == ["kept"]


def test_events_and_logs_go_with_the_job(db: sessionmaker[Session]) -> None:
    jid = _job(db)
    with session_scope(db) as s:
        history.record_events(s, jid, 1, _points(range(1, 3)))
        history.record_logs(s, jid, [history.log_line(1, queries.utcnow(), "info", "x", "m")])
    with session_scope(db) as s:
        job = s.get(Job, jid)
        job.status = "failed"
        queries.delete_job(s, job)
    with session_scope(db) as s:
        for table in (JobEvent, JobLog):
            assert s.scalar(select(func.count()).select_from(table)) == 0
