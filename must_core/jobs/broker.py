"""Celery configuration as plain data, shared by the API's sender and the worker (no celery import).

Same code path in both modes: only the broker URL differs (Redis in production, kombu's filesystem
transport under the data directory in the embedded mode).
"""

from __future__ import annotations

from typing import Any

from must_core.jobs import names
from must_core.settings import Settings


def ensure_broker_dirs(settings: Settings) -> None:
    """Create the filesystem transport's folders (called at process start, never at import)."""
    if settings.broker_url.startswith("filesystem"):
        for sub in ("queue", "processed", "control"):
            (settings.broker_folder / sub).mkdir(parents=True, exist_ok=True)


def celery_config(settings: Settings) -> dict[str, Any]:
    url = settings.broker_url
    transport: dict[str, Any] = {}
    if url.startswith("filesystem"):
        folder = settings.broker_folder
        transport = {
            "data_folder_in": str(folder / "queue"),
            "data_folder_out": str(folder / "queue"),
            "processed_folder": str(folder / "processed"),
            # exchange tables; kombu's default is ./control in the current directory
            "control_folder": str(folder / "control"),
            "store_processed": False,
            "polling_interval": settings.broker.polling_interval_s,
        }
    elif url.startswith(("redis", "rediss")):
        # Longer than the longest job: otherwise Redis redelivers a message whose job still runs.
        transport = {"visibility_timeout": settings.broker.visibility_timeout_s}
    return {
        "broker_url": url,
        "broker_transport_options": transport,
        "broker_connection_retry_on_startup": True,
        "task_serializer": "json",
        "accept_content": ["json"],
        "task_ignore_result": True,
        "result_backend": None,
        "task_acks_late": True,
        # An OOM-killed child must not loop forever on redelivery; the sweeper re-queues instead.
        "task_reject_on_worker_lost": False,
        "worker_prefetch_multiplier": 1,
        "worker_hijack_root_logger": False,
        "task_default_queue": "default",
        "task_routes": {names.RUN_JOB: {"queue": settings.worker.queue}},
        "task_create_missing_queues": True,
        "broker_heartbeat": 0,
    }
