"""Worker logic on a real SQLite database (migrated with Alembic): claim, sweeper, failure codes,
transient-error release. No broker needed: the runner is callable without Celery."""

from __future__ import annotations

import socket
from collections.abc import Iterator
from datetime import timedelta
from pathlib import Path

import pytest
from sqlalchemy import update
from sqlalchemy.orm import Session, sessionmaker

from must_core.cli.service import upgrade_database
from must_core.db.base import utcnow
from must_core.db.models import Job
from must_core.db.session import make_engine, make_sessionmaker, session_scope
from must_core.jobs import queries
from must_core.settings import Settings
from must_core.storage.local import LocalStore
from worker.runner import JobRunner, TransientJobError
from worker.sweeper import relay_once, sweep_once


@pytest.fixture
def db(tmp_path: Path) -> Iterator[sessionmaker[Session]]:
    url = f"sqlite:///{tmp_path / 'must.db'}"
    upgrade_database(url)
    engine = make_engine(url)
    yield make_sessionmaker(engine)
    engine.dispose()


def _settings(tmp_path: Path, **worker: object) -> Settings:
    return Settings.model_validate(
        {
            "data_dir": tmp_path,
            "db": {"url": f"sqlite:///{tmp_path / 'must.db'}"},
            "datasets": {"allowed_roots": [str(tmp_path)]},
            "worker": {
                "device": "cpu",
                "num_threads": 1,
                "stale_after_s": 5,
                "max_attempts": 2,
                "heartbeat_interval_s": 0.2,
                **worker,
            },
        }
    )


def _job(db: sessionmaker[Session], dataset_uri: str = "s3://bucket/none/") -> str:
    with session_scope(db) as s:
        tenant = queries.get_or_create_tenant(s, "t")
        job = queries.create_job(
            s,
            tenant.id,
            {
                "dataset_uri": dataset_uri,
                "class_names": ["a", "b"],
                "base_model": {"arch": "must-tiny"},
                "params": {"epochs": 1},
            },
        )
        return str(job.id)


def _get(db: sessionmaker[Session], job_id: str) -> Job:
    import uuid

    with session_scope(db) as s:
        job = queries.load_job(s, uuid.UUID(job_id))
        assert job is not None
        return job


def _age_heartbeat(db: sessionmaker[Session], job_id: str, seconds: float) -> None:
    import uuid

    with session_scope(db) as s:
        s.execute(
            update(Job)
            .where(Job.id == uuid.UUID(job_id))
            .values(heartbeat_at=utcnow() - timedelta(seconds=seconds))
        )


def test_claim_is_conditional(db: sessionmaker[Session]) -> None:
    import uuid

    jid = uuid.UUID(_job(db))
    with session_scope(db) as s:
        assert queries.claim_job(s, jid, "w1") == 1
    with session_scope(db) as s:
        assert queries.claim_job(s, jid, "w2") is None  # redelivery / second worker: no-op


def test_sweeper_requeues_then_gives_up(db: sessionmaker[Session], tmp_path: Path) -> None:
    import uuid

    settings = _settings(tmp_path)
    jid = _job(db)
    sent: list[str] = []

    def send(job_id: str, processes: int) -> None:
        assert processes == 1
        sent.append(job_id)

    with session_scope(db) as s:
        assert queries.claim_job(s, uuid.UUID(jid), "w1") == 1
    assert sweep_once(settings, db, send)["requeued"] == 0  # fresh heartbeat: left alone
    _age_heartbeat(db, jid, 60)
    assert sweep_once(settings, db, send)["requeued"] == 1
    assert sent == [jid] and _get(db, jid).status == "queued"
    with session_scope(db) as s:
        assert queries.claim_job(s, uuid.UUID(jid), "w2") == 2
    _age_heartbeat(db, jid, 60)
    assert sweep_once(settings, db, send)["failed"] == 1  # max_attempts=2 reached
    job = _get(db, jid)
    assert job.status == "failed" and job.error_code == "worker_lost"


def test_sweeper_finalises_cancel_of_dead_worker(db: sessionmaker[Session], tmp_path: Path) -> None:
    import uuid

    jid = _job(db)
    with session_scope(db) as s:
        queries.claim_job(s, uuid.UUID(jid), "w1")
        job = queries.load_job(s, uuid.UUID(jid))
        assert job is not None
        queries.request_cancel(s, job)
    _age_heartbeat(db, jid, 60)
    sweep_once(_settings(tmp_path), db, lambda _j, _p: None)
    assert _get(db, jid).status == "cancelled"


def test_runner_skips_cancelled_job(db: sessionmaker[Session], tmp_path: Path) -> None:
    import uuid

    jid = _job(db)
    with session_scope(db) as s:
        job = queries.load_job(s, uuid.UUID(jid))
        assert job is not None
        queries.request_cancel(s, job)
    runner = JobRunner(_settings(tmp_path), db, LocalStore(tmp_path / "store"))
    assert runner.run_job(jid) == "skipped"
    assert _get(db, jid).attempt == 0


def test_runner_records_failure_code(db: sessionmaker[Session], tmp_path: Path) -> None:
    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "x.png").write_bytes(b"not an image")
    jid = _job(db, f"file://{empty}")
    runner = JobRunner(_settings(tmp_path), db, LocalStore(tmp_path / "store"))
    assert runner.run_job(jid) == "failed"
    job = _get(db, jid)
    assert job.status == "failed" and job.error_code == "dataset_empty" and job.error_message


def test_transient_storage_error_releases_job_for_retry(
    db: sessionmaker[Session], tmp_path: Path
) -> None:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]  # closed once we leave: connection refused
    settings = Settings.model_validate(
        {
            **_settings(tmp_path).model_dump(),
            "storage": {
                "backend": "s3",
                "endpoint_url": f"http://127.0.0.1:{port}",
                "access_key_id": "k",
                "secret_access_key": "s",
                "max_attempts": 1,
                "connect_timeout_s": 1,
            },
        }
    )
    jid = _job(db, "s3://some-bucket/data/")
    runner = JobRunner(settings, db, LocalStore(tmp_path / "store"))
    with pytest.raises(TransientJobError):
        runner.run_job(jid)
    job = _get(db, jid)
    assert job.status == "queued" and job.attempt == 1  # a Celery retry can claim it again


def test_transient_retries_do_not_count_as_worker_deaths(
    db: sessionmaker[Session], tmp_path: Path
) -> None:
    import uuid

    settings = _settings(tmp_path)  # max_attempts=2
    jid = _job(db)
    for attempt in (1, 2, 3):  # three claims released by transient errors
        with session_scope(db) as s:
            assert queries.claim_job(s, uuid.UUID(jid), "w") == attempt
            assert queries.release_job(s, uuid.UUID(jid), attempt)
    with session_scope(db) as s:
        assert queries.claim_job(s, uuid.UUID(jid), "w") == 4
    _age_heartbeat(db, jid, 60)
    assert sweep_once(settings, db, lambda *_: None)["requeued"] == 1  # first death: resume
    job = _get(db, jid)
    assert job.status == "queued" and job.transient_retries == 3


def test_relay_sends_the_outbox_and_lost_messages(
    db: sessionmaker[Session], tmp_path: Path
) -> None:
    import uuid

    settings = _settings(tmp_path)
    unsent, sent_lost, sent_kept = _job(db), _job(db), _job(db)
    old = utcnow() - timedelta(seconds=60)
    with session_scope(db) as s:
        s.execute(update(Job).values(created_at=old))
        for jid in (sent_lost, sent_kept):
            s.execute(update(Job).where(Job.id == uuid.UUID(jid)).values(enqueued_at=old))
    sent: list[str] = []
    relay_once(settings, db, lambda j, _p: sent.append(j), lambda _queues: {sent_kept})
    assert sorted(sent) == sorted([unsent, sent_lost])
    sent.clear()
    relay_once(settings, db, lambda j, _p: sent.append(j), lambda _queues: {sent_kept})
    assert sent == []  # each is sent once, then waits LOST_MESSAGE_AFTER_S again


def test_checkpoint_retention_deletes_old_checkpoints_of_finished_jobs(
    db: sessionmaker[Session], tmp_path: Path
) -> None:
    import uuid

    from must_core.storage.keys import checkpoint_key, metrics_key
    from worker.sweeper import purge_checkpoints

    store = LocalStore(tmp_path / "store")
    settings = _settings(tmp_path, checkpoint_retention_s=3600)
    old, recent, running = _job(db), _job(db), _job(db)
    src = tmp_path / "blob"
    src.write_bytes(b"x")
    for jid in (old, recent, running):
        store.put_file(src, checkpoint_key(jid))
        store.put_file(src, metrics_key(jid))
    with session_scope(db) as s:
        for jid, status, age in (
            (old, "failed", 7200),
            (recent, "cancelled", 60),
            (running, "running", 7200),
        ):
            s.execute(
                update(Job)
                .where(Job.id == uuid.UUID(jid))
                .values(
                    status=status, checkpoint_step=10, finished_at=utcnow() - timedelta(seconds=age)
                )
            )
    assert purge_checkpoints(settings, db, store) == 1
    assert not store.exists(checkpoint_key(old)) and store.exists(metrics_key(old))
    assert store.exists(checkpoint_key(recent)) and store.exists(checkpoint_key(running))
    assert _get(db, old).checkpoint_step is None
    assert purge_checkpoints(settings, db, store) == 0  # done once
    assert purge_checkpoints(_settings(tmp_path), db, store) == 0  # retention off: kept
