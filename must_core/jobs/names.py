"""Celery task names shared by the API (sender) and the worker (registrar). Never rename: add aliases."""

RUN_JOB = "must.run_job"
SWEEP = "must.sweep_stale_jobs"

ALL_TASKS = (RUN_JOB, SWEEP)
