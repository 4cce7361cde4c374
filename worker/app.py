"""The Celery app. Start with ``celery -A worker.app worker -Q <MUST_WORKER__QUEUE>,default``.

Run one worker process per GPU node: ``--pool=prefork --concurrency=1 --max-tasks-per-child=1``. The
worker also consumes the multi-process queues its GPUs can serve (``gpu.x2`` …, see
:mod:`must_core.jobs.dispatch`). Tasks (``worker.tasks``) and signal handlers (``worker.signals``)
are declared without importing this module back; it imports them once to register them.
"""

from __future__ import annotations

from celery import Celery

from must_core.jobs.broker import celery_config
from must_core.settings import get_settings


def create_celery() -> Celery:
    settings = get_settings()
    app = Celery("must")
    app.conf.update(celery_config(settings))
    app.conf.beat_schedule = {
        "sweep-stale-jobs": {
            "task": "must.sweep_stale_jobs",
            "schedule": settings.worker.sweep_interval_s,
            "options": {"queue": "default", "expires": settings.worker.sweep_interval_s},
        }
    }
    app.conf.include = ["worker.tasks", "worker.signals"]
    return app


app = create_celery()
app.loader.import_default_modules()  # registers tasks and signal handlers (app.conf.include)
