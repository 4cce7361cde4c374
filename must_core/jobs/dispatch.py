"""The one way a training job is sent to the queue, for the API and the sweeper alike (no Celery import:
the caller passes its Celery app's ``send_task``).

Jobs that need several training processes go to a queue named after the count (``gpu.x2``, ``gpu.x4``):
a worker consumes the plain queue plus one per count it can run (``worker.max_processes``, from its
GPUs), so a job only lands where its ranks fit. Celery spreads jobs over machines; torchrun spreads one
job over the GPUs of a machine.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

from must_core.jobs import names
from must_core.settings import Settings, WorkerSettings

# Broker hiccups at send time are retried briefly; a send that still fails leaves the committed row to
# the sweeper, which re-sends queued jobs whose message may be lost.
SEND_RETRY_POLICY = {"max_retries": 2, "interval_start": 0.2, "interval_step": 0.5}


def job_processes(spec: Mapping[str, Any]) -> int:
    """Training processes a job asked for (``params.num_processes``, default 1)."""
    return int((spec.get("params") or {}).get("num_processes") or 1)


def queue_for(worker: WorkerSettings, processes: int) -> str:
    return worker.queue if processes <= 1 else f"{worker.queue}.x{processes}"


def worker_queues(worker: WorkerSettings) -> list[str]:
    """The training queues a worker with ``max_processes`` slots consumes."""
    return [queue_for(worker, k) for k in range(1, worker.max_processes + 1)]


def send_run_job(
    send_task: Callable[..., Any],
    settings: Settings,
    job_id: str,
    processes: int = 1,
    *,
    retry: bool = True,
) -> None:
    """Send ``must.run_job`` for ``job_id`` (with an expiry: the sweeper re-sends stale messages).

    ``retry=False``: one attempt (the API: its caller must not wait; the outbox relay sends later).
    """
    w = settings.worker
    send_task(
        names.RUN_JOB,
        args=[job_id],
        queue=queue_for(w, processes),
        expires=w.requeue_queued_after_s,
        retry=retry,
        retry_policy=SEND_RETRY_POLICY,
    )
