"""A Celery *client*: sends tasks by name; the API never imports the worker package."""

from __future__ import annotations

import logging

from celery import Celery

from must_core.jobs import names
from must_core.jobs.broker import celery_config
from must_core.settings import Settings

_logger = logging.getLogger(__name__)


class JobQueue:
    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.app = Celery("must-api")
        self.app.conf.update(celery_config(settings))

    def send_job(self, job_id: str) -> None:
        w = self.settings.worker
        self.app.send_task(
            names.RUN_JOB,
            args=[job_id],
            queue=w.queue,
            expires=w.requeue_queued_after_s,
            retry=True,
            retry_policy={"max_retries": 2, "interval_start": 0.2},
        )

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
