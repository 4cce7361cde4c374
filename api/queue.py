"""A Celery *client*: sends tasks by name; the API never imports the worker package."""

from __future__ import annotations

import logging

from celery import Celery

from must_core.jobs.broker import celery_config
from must_core.jobs.dispatch import send_run_job
from must_core.settings import Settings

_logger = logging.getLogger(__name__)


class JobQueue:
    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.app = Celery("must-api")
        self.app.conf.update(celery_config(settings))

    def send_job(self, job_id: str, processes: int = 1) -> None:
        send_run_job(self.app.send_task, self.settings, job_id, processes)

    def depth(self) -> int:
        """Messages waiting in the training queue (passive declare: works on Redis and the
        embedded transports)."""
        from kombu.exceptions import ChannelError

        with self.app.connection_for_read() as conn:
            conn.ensure_connection(max_retries=1, timeout=3)
            try:
                _, count, _ = conn.default_channel.queue_declare(
                    queue=self.settings.worker.queue, passive=True
                )
            except ChannelError as exc:  # Redis: an empty queue has no key, hence "no queue"
                if "NOT_FOUND" in str(exc):
                    return 0
                raise
            return int(count)

    def ping(self) -> None:
        with self.app.connection_for_write() as conn:
            conn.ensure_connection(max_retries=1, timeout=3)

    def close(self) -> None:
        self.app.close()
