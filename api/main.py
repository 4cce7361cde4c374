"""FastAPI app factory. ``uvicorn api.main:create_app --factory``."""

from __future__ import annotations

import logging
import os
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager

from fastapi import APIRouter, FastAPI, Request, Response
from fastapi_offline import FastAPIOffline

from api import console, errors, openapi
from api.metrics import ApiMetrics
from api.metrics import install as install_metrics
from api.queue import JobQueue
from api.routes import classify, health, job_history, jobs, models, webhooks
from api.serving import Serving
from must_core.db.session import make_engine, make_sessionmaker
from must_core.jobs.broker import ensure_broker_dirs
from must_core.logging import bind, configure
from must_core.ratelimit import FailureLimiter
from must_core.settings import LOOPBACK_HOSTS, Settings, get_settings
from must_core.storage import make_store

_logger = logging.getLogger(__name__)


def create_app(settings: Settings | None = None) -> FastAPI:
    settings = settings or get_settings()
    configure(settings)
    os.environ.setdefault("OMP_NUM_THREADS", str(settings.api.num_threads))

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        if settings.api.auth == "none":
            if settings.api.host not in LOOPBACK_HOSTS:  # also enforced by Settings
                raise RuntimeError("MUST_API__AUTH=none requires a loopback MUST_API__HOST")
            _logger.warning(
                "API keys are NOT required (MUST_API__AUTH=none): anonymous calls act as the "
                "'default' tenant; allowed only because the API is bound to %s",
                settings.api.host,
            )
        engine = make_engine(
            settings.database_url, pool_size=settings.db.pool_size, echo=settings.db.echo
        )
        app.state.settings = settings
        app.state.auth_limiter = FailureLimiter(
            settings.api.auth_failures_limit, settings.api.auth_failures_window_s
        )
        app.state.sessions = make_sessionmaker(engine)
        app.state.store = make_store(settings)
        ensure_broker_dirs(settings)
        app.state.queue = JobQueue(settings)
        app.state.serving = Serving(settings, app.state.store, on_batch=metrics.observe_batch)
        try:
            yield
        finally:
            app.state.serving.close()
            app.state.queue.close()
            engine.dispose()

    # /docs and /redoc from assets in an installed wheel: they work with no internet
    app = FastAPIOffline(
        title="MUST adaptation service",
        version="0.1.0",
        description="Adapt CLIP zero-shot classifiers to unlabeled images (Masked Unsupervised "
        "Self-Training). Errors are application/problem+json with a stable `code`. "
        "Authenticate with `Authorization: Bearer <api key>`. The web console is at `/ui/`.",
        lifespan=lifespan,
        favicon_url="/ui/favicon.svg",
    )
    errors.install(app)
    openapi.install(app)
    metrics = ApiMetrics()
    app.state.metrics = metrics
    install_metrics(app, metrics)

    @app.middleware("http")
    async def request_id(
        request: Request, call_next: Callable[[Request], Awaitable[Response]]
    ) -> Response:
        rid = request.headers.get("x-request-id") or uuid.uuid4().hex
        request.state.request_id = rid
        with bind(request_id=rid):
            response = await call_next(request)
        response.headers["x-request-id"] = rid
        return response

    v1 = APIRouter(prefix="/v1")
    v1.include_router(jobs.router)
    v1.include_router(job_history.router)
    v1.include_router(models.router)
    v1.include_router(webhooks.router)
    v1.include_router(classify.router)
    app.include_router(v1)
    app.include_router(health.router)
    console.install(app)
    return app
