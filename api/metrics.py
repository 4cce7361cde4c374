"""Prometheus metrics for the API process (``GET /metrics``).

Request counts/latencies by route and classify batch sizes are recorded as they happen. Model-cache
counters, queue depth and job/worker metrics are read at scrape time: jobs by status and, for running
jobs, the step time and images/s that workers write to the job row. Training runs in worker child
processes, so the database is the one place where every worker's numbers meet.
"""

from __future__ import annotations

import hmac
import logging
import time
from collections.abc import Awaitable, Callable, Iterator
from typing import Any

from fastapi import FastAPI, Request, Response
from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector
from sqlalchemy import func, select

from must_core.db.models import Job
from must_core.errors import MustError

_logger = logging.getLogger(__name__)
CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"


class ApiMetrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        self.requests = Counter(
            "must_http_requests",
            "HTTP requests",
            ["method", "route", "status"],
            registry=self.registry,
        )
        self.latency = Histogram(
            "must_http_request_duration_seconds",
            "HTTP request latency",
            ["method", "route"],
            buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30),
            registry=self.registry,
        )
        self.batch_size = Histogram(
            "must_classify_batch_size",
            "Images per classifier forward pass",
            buckets=(1, 2, 4, 8, 16, 32, 64, 128, 256),
            registry=self.registry,
        )

    def observe_batch(self, n: int) -> None:
        self.batch_size.observe(n)


class _StateCollector(Collector):
    """Scrape-time metrics from the app state (cache stats, queue depth, job rows)."""

    def __init__(self, app: FastAPI) -> None:
        self.app = app

    def collect(self) -> Iterator[Any]:
        state = self.app.state
        serving = getattr(state, "serving", None)
        if serving is not None:
            stats = serving.engine.cache.stats
            for name, value, doc in (
                ("hits", stats.hits, "model cache hits"),
                ("misses", stats.misses, "model cache misses"),
                ("evictions", stats.evictions, "model cache evictions"),
                ("loads", stats.loads, "models loaded into the cache"),
            ):
                c = CounterMetricFamily(f"must_model_cache_{name}", doc)
                c.add_metric([], value)
                yield c
            g = GaugeMetricFamily("must_model_cache_bytes", "bytes held by the model cache")
            g.add_metric([], serving.engine.cache.used_bytes)
            yield g
            t = CounterMetricFamily("must_text_embedding_cache_misses", "zero-shot text encodes")
            t.add_metric([], serving.engine.text_misses)
            yield t
        queue = getattr(state, "queue", None)
        if queue is not None:
            try:
                depth = queue.depth()
            except Exception as exc:  # the broker being down must not break the scrape
                _logger.warning("queue depth unavailable: %s", exc)
                depth = None
            if depth is not None:
                g = GaugeMetricFamily(
                    "must_queue_depth", "messages waiting in the job queue", labels=["queue"]
                )
                g.add_metric([queue.settings.worker.queue], depth)
                yield g
        sessions = getattr(state, "sessions", None)
        if sessions is None:
            return
        try:
            with sessions() as s:
                counts = dict(
                    s.execute(select(Job.status, func.count()).group_by(Job.status)).all()
                )
                running = s.execute(
                    select(Job.id, Job.progress, Job.spec).where(Job.status == "running")
                ).all()
        except Exception as exc:
            _logger.warning("job metrics unavailable: %s", exc)
            return
        g = GaugeMetricFamily("must_jobs", "jobs by status", labels=["status"])
        for status in ("queued", "running", "succeeded", "failed", "cancelled"):
            g.add_metric([status], counts.get(status, 0))
        yield g
        ips = GaugeMetricFamily(
            "must_job_images_per_second", "training throughput of running jobs", labels=["job_id"]
        )
        step = GaugeMetricFamily(
            "must_job_step_seconds", "seconds per optimizer step", labels=["job_id"]
        )
        prog = GaugeMetricFamily(
            "must_job_progress_ratio", "fraction of steps done", labels=["job_id"]
        )
        for job_id, progress, spec in running:
            progress = progress or {}
            rate = progress.get("images_per_second")
            batch = ((spec or {}).get("params") or {}).get("batch_size")
            if rate:
                ips.add_metric([str(job_id)], float(rate))
                if batch:
                    step.add_metric([str(job_id)], float(batch) / float(rate))
            prog.add_metric([str(job_id)], float(progress.get("fraction") or 0.0))
        yield ips
        yield step
        yield prog


def _route_template(request: Request) -> str:
    """The matched route as a template (``/v1/jobs/{job_id}``): bounded label cardinality."""
    if request.scope.get("route") is None:
        return "unmatched"
    path = request.url.path
    for name, value in (request.scope.get("path_params") or {}).items():
        path = path.replace(f"/{value}", f"/{{{name}}}", 1)
    return path


def install(app: FastAPI, metrics: ApiMetrics) -> None:
    metrics.registry.register(_StateCollector(app))

    @app.middleware("http")
    async def _record(
        request: Request, call_next: Callable[[Request], Awaitable[Response]]
    ) -> Response:
        t0 = time.perf_counter()
        status = 500
        try:
            response = await call_next(request)
            status = response.status_code
            return response
        finally:
            path = _route_template(request)
            if path != "/metrics":
                metrics.requests.labels(request.method, path, str(status)).inc()
                metrics.latency.labels(request.method, path).observe(time.perf_counter() - t0)

    @app.get("/metrics", include_in_schema=False)
    def prometheus_metrics(request: Request) -> Response:
        """Prometheus text exposition, gated by ``MUST_API__METRICS`` (public, token or off)."""
        _check_metrics_access(request)
        return Response(generate_latest(metrics.registry), media_type=CONTENT_TYPE)


def _check_metrics_access(request: Request) -> None:
    api = request.app.state.settings.api
    if api.metrics == "off":
        raise MustError("metrics are disabled on this server", code="not_found")
    if api.metrics == "token":
        sent = request.headers.get("authorization", "").partition(" ")[2].strip()
        token = api.metrics_token.get_secret_value() if api.metrics_token else ""
        # bytes: compare_digest refuses non-ASCII str, and headers may carry any latin-1 byte
        if not token or not hmac.compare_digest(sent.encode("latin-1"), token.encode()):
            raise MustError(
                "metrics need 'Authorization: Bearer <metrics token>'", code="unauthorized"
            )
