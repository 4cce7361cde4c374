"""Thin Celery tasks: bind log context, call the runner. Job logic lives in worker.runner.

Declared with ``shared_task`` so this module never imports the app (no app ↔ tasks cycle); messages
are sent only through :func:`must_core.jobs.dispatch.send_run_job`.
"""

from __future__ import annotations

import re
from typing import Any

from celery import current_app, shared_task

from must_core.jobs import names
from must_core.jobs.dispatch import send_run_job
from must_core.settings import get_settings
from worker import context
from worker.runner import TransientJobError
from worker.sweeper import InBroker, relay_once, sweep_once

_UUID = re.compile(r"[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}")

_settings = get_settings()


def sender(app: Any) -> Any:
    """``send(job_id, processes)`` on ``app``'s broker, for the sweeper."""
    return lambda job_id, processes: send_run_job(app.send_task, get_settings(), job_id, processes)


_MAX_SCAN = 10_000  # longer queues are not scanned (the 30-minute re-send still covers them)


def broker_job_ids(app: Any) -> InBroker | None:
    """Which jobs have a message in a Redis broker, waiting in a queue or delivered and unacked
    (``must.run_job`` messages carry the job id in their ``argsrepr`` header)."""
    if not get_settings().broker_url.startswith(("redis", "rediss")):
        return None

    def read(queues: set[str]) -> set[str] | None:
        with app.connection_for_read() as conn:
            client = conn.default_channel.client
            raw: list[bytes] = []
            for queue in queues:
                if client.llen(queue) > _MAX_SCAN:
                    return None
                raw += client.lrange(queue, 0, _MAX_SCAN)
            raw += list(client.hgetall("unacked").values())
        return {m.group(0) for blob in raw for m in _UUID.finditer(blob.decode("utf-8", "replace"))}

    return read


@shared_task(  # type: ignore[untyped-decorator]
    name=names.RUN_JOB,
    bind=True,
    acks_late=True,
    autoretry_for=(TransientJobError,),
    retry_backoff=_settings.worker.retry_backoff_s,
    retry_jitter=True,
    max_retries=_settings.worker.max_retries,
    soft_time_limit=_settings.worker.soft_time_limit_s,
    time_limit=_settings.worker.time_limit_s,
    ignore_result=True,
)
def run_job(self: Any, job_id: str) -> str:
    """Run adaptation job ``job_id`` (claimed from the DB; a no-op if someone else has it)."""
    return context.runner().run_job(job_id)


@shared_task(name=names.SWEEP, ignore_result=True)  # type: ignore[untyped-decorator]
def sweep_stale_jobs() -> dict[str, int]:
    """Re-queue or fail jobs with a stale heartbeat; re-send queued jobs whose message was lost."""
    settings, send = get_settings(), sender(current_app)
    from must_core.webhooks.outbox import relay_webhooks

    relay_once(settings, context.sessions(), send, broker_job_ids(current_app))
    relay_webhooks(settings, context.sessions())
    return sweep_once(settings, context.sessions(), send)
