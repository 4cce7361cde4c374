"""A Celery *client*: sends tasks by name; the API never imports the worker package."""

from __future__ import annotations

import logging
from typing import Any

from celery import Celery

from must_core.jobs.broker import celery_config
from must_core.jobs.dispatch import send_run_job
from must_core.settings import Settings

_logger = logging.getLogger(__name__)


def client_config(settings: Settings) -> dict[str, Any]:
    """The worker's Celery config plus socket timeouts: the API never waits on a stalled broker."""
    config = celery_config(settings)
    if settings.broker_url.startswith(("redis", "rediss")):
        t = settings.broker.client_timeout_s
        transport = config["broker_transport_options"]
        config["broker_transport_options"] = {
            **transport,
            "socket_timeout": t,
            "socket_connect_timeout": t,
        }
    config["broker_connection_timeout"] = settings.broker.client_timeout_s
    return config


def _is_redis(conn: Any) -> bool:
    return str(conn.transport_cls).startswith("redis")


class JobQueue:
    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.app = Celery("must-api")
        self.app.conf.update(client_config(settings))

    def send_job(self, job_id: str, processes: int = 1) -> None:
        """One bounded attempt; a job not sent stays in the outbox (``enqueued_at`` unset)."""
        send_run_job(self.app.send_task, self.settings, job_id, processes, retry=False)

    def depth(self) -> int:
        """Messages waiting in the training queue (passive declare: works on Redis and the
        embedded transports)."""
        from kombu.exceptions import ChannelError

        with self.app.connection_for_read() as conn:
            conn.ensure_connection(max_retries=1, timeout=self.settings.broker.client_timeout_s)
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
            conn.ensure_connection(max_retries=1, timeout=self.settings.broker.client_timeout_s)
            if _is_redis(conn):  # a stalled Redis accepts connections but never answers
                conn.default_channel.client.ping()

    def close(self) -> None:
        self.app.close()
