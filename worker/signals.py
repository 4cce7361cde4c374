"""Process signals: logging, thread limits, per-child resources and the in-worker sweeper."""

from __future__ import annotations

import logging
import os
from typing import Any

from celery.signals import (
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


@worker_init.connect  # type: ignore[untyped-decorator]
def _preload(**_: Any) -> None:
    """Import torch/open_clip once in the parent so each forked child starts fast (no CUDA here)."""
    from must_core.jobs.broker import ensure_broker_dirs

    ensure_broker_dirs(get_settings())
    os.environ.setdefault("OMP_NUM_THREADS", str(get_settings().worker_threads))
    import must_core.ml.train  # noqa: F401


@worker_process_init.connect  # type: ignore[untyped-decorator]
def _child_init(**_: Any) -> None:
    """Fresh DB pool and torch thread count in each pool child (CUDA is never touched here)."""
    context.reset_after_fork()
    threads = get_settings().worker_threads
    os.environ["OMP_NUM_THREADS"] = str(threads)
    import torch

    torch.set_num_threads(threads)


@worker_ready.connect  # type: ignore[untyped-decorator]
def _start_sweeper(**_: Any) -> None:
    global _sweeper
    from worker.sweeper import SweeperThread
    from worker.tasks import send_run_job

    settings = get_settings()
    _sweeper = SweeperThread(settings, context.sessions(), send_run_job)
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
