"""The OpenAPI document says what the API really returns: every error status of every operation as
``application/problem+json`` with one ``Problem`` schema, and the request bodies that routes parse
themselves (``/classify``). Checked by the schema fuzz test (tests/integration/test_schema_fuzz.py)."""

from __future__ import annotations

from typing import Any

from fastapi import FastAPI
from fastapi.openapi.utils import get_openapi

from api import schema_docs
from api.errors import PROBLEM_JSON, STATUS

PROBLEM_SCHEMA: dict[str, Any] = {
    "type": "object",
    "description": "RFC 9457 problem details with a stable `code`",
    "required": ["type", "title", "status", "detail", "instance", "code"],
    "properties": {
        "type": {"type": "string"},
        "title": {"type": "string"},
        "status": {"type": "integer"},
        "detail": {"type": "string"},
        "instance": {"type": "string"},
        "code": {"type": "string"},
        "errors": {"type": "array", "items": {"type": "object"}},
        "request_id": {"type": "string"},
    },
}
_PROBLEM_REF = {"$ref": "#/components/schemas/Problem"}
# JSON bodies of their own (not problems): the readiness report
_OWN_BODIES = {("/readyz", "get", "503")}
# parameters shared by many routes, described once
PARAM_DOCS = {
    "job_id": "the job's id",
    "model_id": "the model's id (classify also takes the id of the job that produces it)",
    "limit": "page size (capped by the server's max page size)",
    "offset": "items to skip (newest first)",
    "status": "only jobs with this status",
}


def images_body(*, zero_shot: bool = False) -> dict[str, Any]:
    """The /classify request body: base64 images in JSON, or repeated ``images`` file parts."""
    images = {"type": "array", "minItems": 1, "items": {"type": "string", "format": "byte"}}
    files = {"type": "array", "minItems": 1, "items": {"type": "string", "format": "binary"}}
    top_k = {"type": "integer", "minimum": 1, "default": 5}
    extra: dict[str, Any] = {}
    if zero_shot:
        extra = {
            "base_model": {"type": "object"},
            "class_names": {"type": "array", "minItems": 2, "items": {"type": "string"}},
            "templates": {"type": "array", "items": {"type": "string"}},
        }
    required = ["images", *(["class_names"] if zero_shot else [])]

    def schema(imgs: dict[str, Any]) -> dict[str, Any]:
        props = {"images": imgs, "top_k": top_k, **extra}
        return {"type": "object", "required": required, "properties": props}

    return {
        "required": True,
        "content": {
            "application/json": {"schema": schema(images)},
            "multipart/form-data": {"schema": schema(files)},
        },
    }


def _problem(code: str, existing: dict[str, Any] | None) -> dict[str, Any]:
    description = (existing or {}).get("description") or _title(int(code))
    return {"description": description, "content": {PROBLEM_JSON: {"schema": _PROBLEM_REF}}}


def _title(status: int) -> str:
    return next((t for s, t in STATUS.values() if s == status), "Error")


def _error_codes(path: str, op: dict[str, Any]) -> set[str]:
    codes = {c for c in op.get("responses", {}) if c[0] in "45"} | {"500"}
    if path.startswith("/v1"):
        codes |= {"401", "422", "429"}
    if "requestBody" in op:
        codes |= {"400", "422"}
    if op.get("parameters"):
        codes.add("422")
    return codes


def problem_schema(app: FastAPI) -> dict[str, Any]:
    schema = get_openapi(
        title=app.title, version=app.version, description=app.description, routes=app.routes
    )
    components = schema.setdefault("components", {}).setdefault("schemas", {})
    components["Problem"] = PROBLEM_SCHEMA
    schema_docs.apply(components)
    for path, ops in schema["paths"].items():
        for method, op in ops.items():
            for param in op.get("parameters", []):
                if not param.get("description") and param["name"] in PARAM_DOCS:
                    param["description"] = PARAM_DOCS[param["name"]]
            responses = op.setdefault("responses", {})
            for code in sorted(_error_codes(path, op)):
                if (path, method, code) not in _OWN_BODIES:
                    responses[code] = _problem(code, responses.get(code))
    for unused in ("HTTPValidationError", "ValidationError"):  # errors are problems, not these
        components.pop(unused, None)
    return schema


def install(app: FastAPI) -> None:
    def openapi() -> dict[str, Any]:
        if app.openapi_schema is None:
            app.openapi_schema = problem_schema(app)
        return app.openapi_schema

    app.openapi = openapi  # type: ignore[method-assign]
