"""Periodic sweep: re-queue (or fail) running jobs whose heartbeat went stale, re-send lost messages.

Runs as a daemon thread in every worker's main process (no separate beat needed) and as the
``must.sweep_stale_jobs`` task for deployments that run ``celery beat``. Conditional updates make
concurrent sweepers safe.
"""

from __future__ import annotations

import logging
import threading
import time
import uuid
from collections.abc import Callable
from datetime import datetime, timedelta

from sqlalchemy.orm import Session, sessionmaker

from must_core.db.base import utcnow
from must_core.db.session import session_scope
from must_core.jobs.dispatch import queue_for
from must_core.settings import Settings
from must_core.storage import ArtifactStore
from must_core.storage.keys import checkpoint_prefix

_logger = logging.getLogger(__name__)


def sweep_once(
    settings: Settings, sessions: sessionmaker[Session], send: Callable[[str, int], None]
) -> dict[str, int]:
    from must_core.jobs import queries

    w = settings.worker
    now = utcnow()
    with session_scope(sessions) as s:
        requeued, failed = queries.sweep_stale(
            s, now=now, stale_after_s=w.stale_after_s, max_attempts=w.max_attempts
        )
        resend = queries.queued_due_for_resend(s, now=now, after_s=w.requeue_queued_after_s)
        processes = queries.processes_of(s, [*requeued, *resend])
    for job_id in requeued:
        _logger.warning("job %s: worker lost (stale heartbeat); re-queued to resume", job_id)
    for job_id in failed:
        _logger.warning(
            "job %s: worker lost and no attempts left, or cancel pending; finalised", job_id
        )
    _send_all(send, [*requeued, *resend], processes)
    return {"requeued": len(requeued), "failed": len(failed), "resent": len(resend)}


# in_broker(queue names) -> ids of jobs with a message waiting or delivered there; None: unknown
InBroker = Callable[[set[str]], set[str] | None]


def relay_once(
    settings: Settings,
    sessions: sessionmaker[Session],
    send: Callable[[str, int], None],
    in_broker: InBroker | None = None,
) -> int:
    """Send the outbox (committed jobs the API could not send: broker down or stalled) and, where the
    broker can tell, re-send queued jobs whose message it lost (a Redis restart without persistence)."""
    from must_core.jobs import queries

    now = utcnow()
    w = settings.worker
    with session_scope(sessions) as s:
        unsent = queries.unsent_jobs(s, now=now, grace_s=w.relay_grace_s)
        lost = _lost(s, now, settings, in_broker) if in_broker is not None else []
        lost = queries.mark_resent(s, lost, now=now)
        processes = queries.processes_of(s, [*unsent, *lost])
    for job_id in unsent:
        _logger.info("job %s: relaying a message its submitter could not send", job_id)
    for job_id in lost:
        _logger.warning("job %s: its message is not in the broker (lost); re-sending", job_id)
    _send_all(send, [*unsent, *lost], processes)
    return len(unsent) + len(lost)


def _lost(s: Session, now: datetime, settings: Settings, in_broker: InBroker) -> list[uuid.UUID]:
    from must_core.jobs import queries

    w = settings.worker
    cutoff = now - timedelta(seconds=w.lost_message_after_s)
    candidates = queries.queued_sent_before(s, cutoff=cutoff)
    if not candidates:
        return []
    processes = queries.processes_of(s, candidates)
    present = in_broker({queue_for(w, processes.get(j, 1)) for j in candidates})
    if present is None:
        return []
    return [j for j in candidates if str(j) not in present]


def _send_all(
    send: Callable[[str, int], None], ids: list[uuid.UUID], processes: dict[uuid.UUID, int]
) -> None:
    for job_id in ids:
        try:
            send(str(job_id), processes.get(job_id, 1))
        except Exception:  # the row says sent; the stale-message re-send covers this one
            _logger.exception(
                "could not send job %s; it is re-sent once its message is stale", job_id
            )


def purge_checkpoints(
    settings: Settings, sessions: sessionmaker[Session], store: ArtifactStore
) -> int:
    """Delete the checkpoints of jobs finished more than ``checkpoint_retention_s`` ago."""
    from must_core.jobs import queries

    retention = settings.worker.checkpoint_retention_s
    if retention is None:
        return 0
    with session_scope(sessions) as s:
        due = queries.checkpoints_to_purge(s, cutoff=utcnow() - timedelta(seconds=retention))
    for job_id in due:
        store.delete_prefix(checkpoint_prefix(job_id))
        with session_scope(sessions) as s:
            queries.mark_checkpoint_purged(s, job_id)
        _logger.info("job %s: checkpoint deleted (retention %.0f s)", job_id, retention)
    return len(due)


class SweeperThread(threading.Thread):
    def __init__(
        self,
        settings: Settings,
        sessions: sessionmaker[Session],
        send: Callable[[str, int], None],
        in_broker: InBroker | None = None,
        store: ArtifactStore | None = None,
    ) -> None:
        super().__init__(daemon=True, name="must-sweeper")
        self.settings, self.sessions, self.send = settings, sessions, send
        self.in_broker, self.store = in_broker, store
        self.stopping = threading.Event()

    def run(self) -> None:
        w = self.settings.worker
        last_sweep = time.monotonic()
        while not self.stopping.wait(min(w.relay_interval_s, w.sweep_interval_s)):
            self._guarded(relay_once, self.in_broker)
            self._webhooks()
            if time.monotonic() - last_sweep >= w.sweep_interval_s:
                last_sweep = time.monotonic()
                self._guarded(sweep_once)
                if self.store is not None:
                    self._purge(self.store)

    def _webhooks(self) -> None:
        from must_core.webhooks.outbox import relay_webhooks

        try:
            relay_webhooks(self.settings, self.sessions)
        except Exception:
            _logger.exception("webhook relay failed")

    def _purge(self, store: ArtifactStore) -> None:
        try:
            purge_checkpoints(self.settings, self.sessions, store)
        except Exception:
            _logger.exception("checkpoint retention failed")

    def _guarded(self, step: Callable[..., object], *extra: object) -> None:
        try:
            step(self.settings, self.sessions, self.send, *extra)
        except Exception:
            _logger.exception("%s failed", step.__name__)
