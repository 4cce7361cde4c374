"""A job's own log lines, kept in the database for ``GET /v1/jobs/{id}/logs``.

While an attempt runs, a handler on the root logger buffers every record of this worker process
(the runner, the trainer's relayed output, checkpoint uploads; a prefork pool child runs one job at
a time) except records bound to another job, and ``flush`` appends them to ``job_logs``. Lines
beyond ``max_lines`` per attempt are counted and dropped, with one line saying so.
"""

from __future__ import annotations

import logging
import threading
import uuid
from datetime import UTC, datetime
from typing import Any

from sqlalchemy.orm import Session, sessionmaker

from must_core.db.session import session_scope
from must_core.jobs import history
from must_core.logging import current_context

MAX_MESSAGE = 4000


class JobLogCapture(logging.Handler):
    def __init__(
        self, sessions: sessionmaker[Session], job_id: uuid.UUID, attempt: int, max_lines: int
    ) -> None:
        super().__init__(logging.INFO)
        self.sessions = sessions
        self.job_id = job_id
        self.attempt = attempt
        self.max_lines = max_lines
        self._buffer: list[dict[str, Any]] = []
        self._lock = threading.Lock()
        self._kept = 0
        self._dropped = 0
        self._flushing = threading.Lock()

    def __enter__(self) -> JobLogCapture:
        logging.getLogger().addHandler(self)
        return self

    def __exit__(self, *exc: object) -> None:
        logging.getLogger().removeHandler(self)
        self.flush()

    def emit(self, record: logging.LogRecord) -> None:
        bound = current_context().get("job_id")  # emit runs in the thread that logged
        if bound not in (None, str(self.job_id)):
            return
        if (record.name or "").startswith(("sqlalchemy", "celery", "kombu", "amqp")):
            return
        with self._lock:
            if self._kept >= self.max_lines:
                self._dropped += 1
                return
            self._kept += 1
            self._buffer.append(self._line(record))

    def _line(self, record: logging.LogRecord) -> dict[str, Any]:
        message = record.getMessage()
        if record.exc_info:
            message += "\n" + logging.Formatter().formatException(record.exc_info)
        return history.log_line(
            self.attempt,
            datetime.fromtimestamp(record.created, UTC),
            record.levelname.lower(),
            record.name,
            message[:MAX_MESSAGE],
        )

    def flush(self) -> None:
        """Append the buffered lines; a database error keeps them for the next flush."""
        with self._flushing:
            with self._lock:
                lines, self._buffer = self._buffer, []
                dropped, self._dropped = self._dropped, 0
            if dropped:
                note = f"{dropped} more log lines dropped (over {self.max_lines} per attempt)"
                lines.append(
                    history.log_line(self.attempt, datetime.now(UTC), "warning", __name__, note)
                )
            if not lines:
                return
            try:
                with session_scope(self.sessions) as s:
                    history.record_logs(s, self.job_id, lines)
            except Exception:  # never log from here (it would feed this handler)
                with self._lock:
                    self._buffer = lines + self._buffer
