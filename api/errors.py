"""RFC 9457 problem+json responses with a stable ``code`` for every expected failure."""

from __future__ import annotations

import json
import logging
import uuid
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.routing import Match

from must_core.errors import MustError

_logger = logging.getLogger(__name__)

PROBLEM_JSON = "application/problem+json"

# code → (status, title): the one table. Every MustError code raised anywhere on the server (the API,
# must_core, the worker's job error codes) has a row; tests/unit/service/test_error_table.py fails
# when one is missing. A code without a row is a bug and renders as 500, never as a client error.
STATUS: dict[str, tuple[int, str]] = {
    # request and auth
    "not_found": (404, "Not found"),
    "unauthorized": (401, "Missing or invalid API key"),
    "too_many_requests": (429, "Too many failed authentications"),
    "method_not_allowed": (405, "Method not allowed"),
    "bad_request": (400, "Body cannot be parsed"),
    "validation_error": (422, "Invalid request"),
    "invalid_config": (422, "Invalid hyperparameters"),
    "invalid_uri": (422, "Invalid URI"),
    "uri_forbidden": (403, "URI refused by policy"),
    "job_not_cancellable": (409, "Job already finished"),
    "job_not_finished": (409, "Job not finished"),
    "idempotency_conflict": (409, "Idempotency key reused with another body"),
    "model_not_ready": (409, "Model not ready"),
    "job_not_resumable": (409, "Job cannot be resumed"),
    "predictions_not_ready": (409, "Predictions not available"),
    "format_not_available": (409, "Model file not available in this format"),
    "model_not_named": (409, "Model has no name"),
    "too_many_webhooks": (409, "Too many webhook endpoints"),
    "zero_shot_disabled": (403, "Zero-shot classification disabled"),
    # /classify inputs
    "request_too_large": (413, "Request too large"),
    "too_many_images": (413, "Too many images"),
    "image_too_large": (413, "Image too large"),
    "image_pixels_exceeded": (413, "Image has too many pixels"),
    "not_an_image": (415, "Not a decodable image"),
    "unsupported_media_type": (415, "Unsupported media type"),
    "invalid_base_model": (422, "Base model cannot be built"),
    # content named by a request (zero-shot base models; job errors at start)
    "dataset_invalid": (422, "Dataset invalid"),
    "dataset_empty": (422, "Dataset has no decodable image"),
    "dataset_fetch_failed": (422, "Dataset cannot be fetched"),
    "artifact_fetch_failed": (422, "Artifact cannot be fetched"),
    "dataset_too_large": (413, "Dataset too large"),
    "archive_unsafe": (422, "Unsafe archive"),
    "archive_bomb": (413, "Archive over the extraction caps"),
    "checkpoint_invalid": (422, "Checkpoint invalid"),
    # the server's own failures
    "queue_unavailable": (503, "Job queue unavailable"),
    "not_ready": (503, "Not ready"),
    "storage_unavailable": (503, "Object store unavailable"),
    "storage_error": (500, "Object store error"),
    "object_not_found": (500, "Stored artifact missing"),
    "model_load_failed": (500, "Model cannot be loaded"),
    "export_failed": (500, "Model export failed"),
    "training_diverged": (500, "Training diverged"),
    "training_incomplete": (500, "Training incomplete"),
    "training_process_failed": (500, "Training process failed"),
    "worker_lost": (500, "Worker lost"),
    "time_limit_exceeded": (500, "Time limit exceeded"),
    "internal_error": (500, "Internal server error"),
}


class ProblemResponse(JSONResponse):
    """problem+json, ASCII-escaped: a detail or ``loc`` that quotes unencodable input (a lone
    surrogate) must not turn the error response itself into a 500."""

    media_type = PROBLEM_JSON

    def render(self, content: Any) -> bytes:
        return json.dumps(
            content, ensure_ascii=True, allow_nan=False, separators=(",", ":")
        ).encode()


class ApiError(MustError):
    """An HTTP-edge error with a code from STATUS."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(message, code=code)


def problem(
    request: Request, code: str, detail: str, status: int | None = None, **extra: Any
) -> ProblemResponse:
    st, title = STATUS.get(code, (status or 500, code.replace("_", " ").capitalize()))
    body = {
        "type": f"/problems/{code}",
        "title": title,
        "status": status or st,
        "detail": detail,
        "instance": request.url.path,
        "code": code,
        **extra,
    }
    headers = {"WWW-Authenticate": "Bearer"} if code == "unauthorized" else None
    return ProblemResponse(body, status_code=status or st, headers=headers)


def _allowed_methods(request: Request) -> list[str]:
    methods: set[str] = set()
    for route in request.app.router.routes:
        match, _ = route.matches({**request.scope, "method": "GET"})
        if match != Match.NONE:
            methods |= getattr(route, "methods", None) or set()
    return sorted(methods)


def install(app: FastAPI) -> None:
    @app.exception_handler(MustError)
    async def _must_error(request: Request, exc: MustError) -> ProblemResponse:
        status = STATUS.get(exc.code, (500, ""))[0]
        log = _logger.warning if status < 500 else _logger.error
        log("%s %s -> %d %s: %s", request.method, request.url.path, status, exc.code, exc.message)
        response = problem(request, exc.code, exc.message, status)
        retry_after = getattr(exc, "retry_after", None)
        if retry_after is not None:
            response.headers["Retry-After"] = str(retry_after)
        return response

    @app.exception_handler(RequestValidationError)
    async def _validation(request: Request, exc: RequestValidationError) -> ProblemResponse:
        errors = [
            {"loc": list(e.get("loc", ())), "msg": str(e.get("msg")), "type": str(e.get("type"))}
            for e in exc.errors()
        ]
        return problem(
            request, "validation_error", "the request does not match the schema", errors=errors
        )

    @app.exception_handler(StarletteHTTPException)
    async def _http(request: Request, exc: StarletteHTTPException) -> ProblemResponse:
        code = {
            400: "bad_request",
            404: "not_found",
            401: "unauthorized",
            405: "method_not_allowed",
        }.get(exc.status_code, f"http_{exc.status_code}")
        response = problem(request, code, str(exc.detail), exc.status_code)
        response.headers.update(exc.headers or {})
        if exc.status_code == 405:  # every method of the path, not only the first route's
            response.headers["Allow"] = ", ".join(_allowed_methods(request))
        return response

    @app.exception_handler(Exception)
    async def _unhandled(request: Request, exc: Exception) -> ProblemResponse:
        request_id = getattr(request.state, "request_id", None) or uuid.uuid4().hex
        _logger.error("unhandled error (request_id=%s)", request_id, exc_info=exc)
        return problem(
            request, "internal_error", "internal error; quote the request_id", request_id=request_id
        )
