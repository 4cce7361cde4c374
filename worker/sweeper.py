"""Periodic sweep: re-queue (or fail) running jobs whose heartbeat went stale, re-send lost messages.

Runs as a daemon thread in every worker's main process (no separate beat needed) and as the
``must.sweep_stale_jobs`` task for deployments that run ``celery beat``. Conditional updates make
concurrent sweepers safe.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable

from sqlalchemy.orm import Session, sessionmaker

from must_core.db.base import utcnow
from must_core.db.session import session_scope
from must_core.settings import Settings

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
    for job_id in [*requeued, *resend]:
        try:
            send(str(job_id), processes.get(job_id, 1))
        except Exception:
            _logger.exception("could not send job %s; will retry on the next sweep", job_id)
    return {"requeued": len(requeued), "failed": len(failed), "resent": len(resend)}


class SweeperThread(threading.Thread):
    def __init__(
        self, settings: Settings, sessions: sessionmaker[Session], send: Callable[[str, int], None]
    ) -> None:
        super().__init__(daemon=True, name="must-sweeper")
        self.settings, self.sessions, self.send = settings, sessions, send
        self.stopping = threading.Event()

    def run(self) -> None:
        interval = self.settings.worker.sweep_interval_s
        while not self.stopping.wait(interval):
            try:
                sweep_once(self.settings, self.sessions, self.send)
            except Exception:
                _logger.exception("sweep failed")
