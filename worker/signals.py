"""Process signals: logging, thread limits, per-child resources and the in-worker sweeper."""

from __future__ import annotations

import logging
import os
from typing import Any

from celery.signals import (
    celeryd_after_setup,
    setup_logging,
    worker_init,
    worker_process_init,
    worker_ready,
    worker_shutdown,
)

from must_core.logging import configure
from must_core.settings import get_settings
from worker import context

_logger = logging.getLogger(__name__)
_sweeper: Any = None


@setup_logging.connect  # type: ignore[untyped-decorator]
def _setup_logging(**_: Any) -> None:
    configure(get_settings())


@celeryd_after_setup.connect  # type: ignore[untyped-decorator]
def _consume_multi_process_queues(instance: Any, **_: Any) -> None:
    """Advertise this worker's GPUs: consume the queue of every job size it can run."""
    from must_core.jobs.dispatch import worker_queues

    w = get_settings().worker
    queues = instance.app.amqp.queues
    if w.queue not in queues.consume_from:
        return  # a default-queue-only worker runs no training jobs
    for name in worker_queues(w)[1:]:
        queues.select_add(name)
    _logger.info("training queues: %s (GPUs: %d)", ", ".join(worker_queues(w)), w.gpus)


@worker_init.connect  # type: ignore[untyped-decorator]
def _preload(**_: Any) -> None:
    """Create the embedded broker's folders. Training runs in its own process (worker.training), so
    the Celery parent never imports torch."""
    from must_core.jobs.broker import ensure_broker_dirs

    ensure_broker_dirs(get_settings())
    os.environ.setdefault("OMP_NUM_THREADS", str(get_settings().worker_threads))


@worker_process_init.connect  # type: ignore[untyped-decorator]
def _child_init(**_: Any) -> None:
    """Fresh DB pool in each pool child; the trainer it starts gets the thread budget."""
    context.reset_after_fork()
    os.environ["OMP_NUM_THREADS"] = str(get_settings().worker_threads)


@worker_ready.connect  # type: ignore[untyped-decorator]
def _start_sweeper(sender: Any, **_: Any) -> None:
    global _sweeper
    from worker.sweeper import SweeperThread
    from worker.tasks import broker_job_ids
    from worker.tasks import sender as make_sender

    settings = get_settings()
    _sweeper = SweeperThread(
        settings,
        context.sessions(),
        make_sender(sender.app),
        broker_job_ids(sender.app),
        context.store() if settings.worker.checkpoint_retention_s else None,
    )
    _sweeper.start()
    _logger.info(
        "worker ready: queue=%s threads=%d sweeper every %.0fs (stale after %.0fs)",
        settings.worker.queue,
        settings.worker_threads,
        settings.worker.sweep_interval_s,
        settings.worker.stale_after_s,
    )


@worker_shutdown.connect  # type: ignore[untyped-decorator]
def _stop_sweeper(**_: Any) -> None:
    if _sweeper is not None:
        _sweeper.stopping.set()
