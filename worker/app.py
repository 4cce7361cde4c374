"""The Celery app. Start with ``celery -A worker.app worker -Q <MUST_WORKER__QUEUE>``.

Run one worker process per GPU: ``--pool=prefork --concurrency=1 --max-tasks-per-child=1``.
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
    app.conf.include = ["worker.tasks"]
    return app


app = create_celery()

from worker import signals, tasks  # noqa: E402,F401  (register tasks and signal handlers)
