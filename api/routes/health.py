"""Liveness and readiness probes (outside /v1, no auth)."""

from __future__ import annotations

import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from concurrent.futures import TimeoutError as FutureTimeout
from typing import Any

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse
from sqlalchemy import text

router = APIRouter(tags=["health"])


@router.get("/healthz")
def healthz() -> dict[str, str]:
    """The process is alive."""
    return {"status": "ok"}


def _checks(state: Any) -> dict[str, Callable[[], object]]:
    def database() -> None:
        with state.sessions() as s:
            s.execute(text("SELECT 1"))

    return {"database": database, "broker": state.queue.ping, "storage": state.store.ping}


@router.get("/readyz", responses={503: {"description": "A dependency is unreachable or stalled"}})
def readyz(request: Request) -> JSONResponse:
    """Database, broker and storage reachable, each within ``MUST_API__READINESS_TIMEOUT_S``."""
    state = request.app.state
    timeout = state.settings.api.readiness_timeout_s
    pool = ThreadPoolExecutor(max_workers=3, thread_name_prefix="readyz")
    futures = {name: pool.submit(check) for name, check in _checks(state).items()}
    deadline = time.monotonic() + timeout
    checks: dict[str, Any] = {}
    for name, future in futures.items():
        try:
            future.result(timeout=max(0.0, deadline - time.monotonic()))
            checks[name] = "ok"
        except FutureTimeout:
            checks[name] = f"error: no answer within {timeout:g} s"
        except Exception as exc:
            checks[name] = f"error: {type(exc).__name__}"
    pool.shutdown(wait=False)  # a stalled check must not hold the probe
    ok = all(v == "ok" for v in checks.values())
    return JSONResponse(
        {"status": "ok" if ok else "unavailable", "checks": checks},
        status_code=200 if ok else 503,
    )
