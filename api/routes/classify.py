"""/classify: adapted models (``/v1/models/{id}/classify``) and zero-shot (``/v1/classify``).

Images come as multipart files (field ``images``, repeatable) or JSON ``{"images": [base64, …]}``.
The body is read with a size cap on the event loop; decoding, preprocessing and the forward pass run
in the thread pool (the forward pass itself goes through the per-model micro-batcher).
"""

from __future__ import annotations

import json
import logging
import uuid
from dataclasses import dataclass
from typing import Any

from fastapi import APIRouter, Request
from fastapi import Path as PathParam
from pydantic import BaseModel, Field
from sqlalchemy.orm import Session, sessionmaker
from starlette.concurrency import run_in_threadpool
from starlette.datastructures import UploadFile

from api.deps import SettingsDep, ShortTenantDep
from api.errors import ApiError
from api.openapi import images_body
from must_core.db.models import AdaptedModel
from must_core.jobs import queries
from must_core.jobs.inputs import check_json_value
from must_core.jobs.schemas import BaseModelRequest
from must_core.jobs.states import JobStatus
from must_core.jobs.validate import validate_base_model
from must_core.ml.inference import Prediction
from must_core.serving.engine import Served
from must_core.serving.images import ImageLimits, check_request, decode_base64, decode_image
from must_core.settings import Settings

_logger = logging.getLogger(__name__)
router = APIRouter(tags=["classify"])

_PROBLEMS: dict[int | str, dict[str, Any]] = {
    404: {"description": "Unknown model (or another tenant's)"},
    409: {"description": "The model's job has not succeeded yet"},
    413: {"description": "Request, image or pixel count over the limit"},
    415: {"description": "An upload is not a decodable image"},
    422: {"description": "Invalid request"},
}


class TopK(BaseModel):
    label: str
    index: int
    score: float


class ImageResult(BaseModel):
    label: str
    score: float
    top_k: list[TopK]


class ClassifyResponse(BaseModel):
    model_id: uuid.UUID | None = Field(None, description="adapted model id; null for zero-shot")
    base_model: dict[str, Any] | None = Field(None, description="zero-shot base model")
    results: list[ImageResult] = Field(description="one per image, in request order")


@dataclass
class _Parsed:
    images: list[bytes]
    top_k: int
    fields: dict[str, Any]


async def _read_body(request: Request, limit: int) -> bytes:
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > limit:
        raise ApiError("request_too_large", f"request body over {limit} bytes")
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise ApiError("request_too_large", f"request body over {limit} bytes")
        chunks.append(chunk)
    body = b"".join(chunks)
    request._body = body  # let Starlette's form parser reuse the capped body
    return body


def _top_k(raw: Any) -> int:
    if raw is None or raw == "":
        return 5
    try:
        k = int(raw)
    except (TypeError, ValueError) as exc:
        raise ApiError("validation_error", "top_k must be an integer") from exc
    if k < 1:
        raise ApiError("validation_error", "top_k must be at least 1")
    return k


async def _parse(request: Request, settings: Settings) -> _Parsed:
    c = settings.classify
    body = await _read_body(request, c.max_request_bytes)
    ctype = request.headers.get("content-type", "")
    images: list[bytes] = []
    fields: dict[str, Any] = {}
    if ctype.startswith("multipart/form-data"):
        form = await request.form(
            max_files=c.max_images_per_request + 1, max_fields=100, max_part_size=1024 * 1024
        )
        try:
            for name, value in form.multi_items():
                if isinstance(value, UploadFile):
                    if name != "images":
                        continue
                    if len(images) >= c.max_images_per_request:
                        raise ApiError(
                            "too_many_images",
                            f"at most {c.max_images_per_request} images per request",
                        )
                    if value.size is not None and value.size > c.max_image_bytes:
                        raise ApiError(
                            "image_too_large",
                            f"image {value.filename!r} over {c.max_image_bytes} bytes",
                        )
                    images.append(await value.read())
                else:
                    fields[name] = value
        finally:
            await form.close()
        for key in ("base_model", "class_names", "templates"):
            if isinstance(fields.get(key), str):
                try:
                    fields[key] = json.loads(fields[key])
                except ValueError:
                    if key == "class_names":
                        fields[key] = [x.strip() for x in fields[key].split(",") if x.strip()]
                    else:
                        raise ApiError("validation_error", f"{key} must be JSON") from None
    elif ctype.startswith("application/json") or not ctype:
        try:
            data = json.loads(body or b"{}")
        except ValueError as exc:
            raise ApiError("validation_error", "body is not valid JSON") from exc
        if not isinstance(data, dict):
            raise ApiError("validation_error", "body must be a JSON object")
        raw = data.pop("images", None)
        if not isinstance(raw, list) or not all(isinstance(x, str) for x in raw):
            raise ApiError("validation_error", "images must be a list of base64 strings")
        if len(raw) > c.max_images_per_request:
            raise ApiError(
                "too_many_images", f"at most {c.max_images_per_request} images per request"
            )
        images = [decode_base64(x, c.max_image_bytes) for x in raw]
        fields = data
    else:
        raise ApiError(
            "unsupported_media_type",
            "send multipart/form-data (field 'images') or application/json",
        )
    if not images:
        raise ApiError("validation_error", "at least one image is required")
    try:
        check_json_value(fields)
    except ValueError as exc:
        raise ApiError("validation_error", str(exc)) from None
    return _Parsed(images=images, top_k=_top_k(fields.get("top_k")), fields=fields)


def _results(preds: list[Prediction]) -> list[ImageResult]:
    return [
        ImageResult(label=p.label, score=p.score, top_k=[TopK(**t) for t in p.top_k]) for p in preds
    ]


def _limits(settings: Settings) -> ImageLimits:
    c = settings.classify
    return ImageLimits(
        max_bytes=c.max_image_bytes,
        max_pixels=c.max_image_pixels,
        max_side=c.max_image_side,
        max_request_pixels=c.max_request_pixels,
    )


def _classify(served: Served, raws: list[bytes], settings: Settings, top_k: int) -> list[Any]:
    """Header checks of the whole request first, then one decoded image at a time."""
    limits = _limits(settings)
    check_request(raws, limits)
    preds = served.classify_encoded(raws, lambda raw, side: decode_image(raw, limits, side), top_k)
    return _results(preds)


def _is_uuid(ref: str) -> bool:
    try:
        uuid.UUID(ref)
    except ValueError:
        return False
    return True


def _find_model(sessions: sessionmaker[Session], tenant: uuid.UUID, ref: str) -> AdaptedModel:
    """The model by id or name (``name[:latest|:VERSION|:TAG]``), or the model of the succeeded
    job with this id (409 before it succeeds)."""
    with sessions() as session:
        try:
            model = queries.resolve_model(session, tenant, ref)
        except queries.NotFoundError:
            if not _is_uuid(ref):
                raise
            model_id = uuid.UUID(ref)
            job = queries.get_job(session, tenant, model_id)  # 404 when neither exists
            if job.status != JobStatus.SUCCEEDED or job.model_id is None:
                raise ApiError(
                    "model_not_ready",
                    f"job {model_id} is {job.status}; its model exists once it succeeds",
                ) from None
            model = queries.get_model(session, tenant, job.model_id)
        session.expunge(model)
        return model


@router.post(
    "/models/{model_id}/classify",
    response_model=ClassifyResponse,
    responses=_PROBLEMS,
    openapi_extra={"requestBody": images_body()},
)
async def classify_adapted(
    request: Request,
    tenant: ShortTenantDep,
    settings: SettingsDep,
    model_id: str = PathParam(
        ...,
        max_length=300,
        description="model id, job id, or name (name, name:latest, name:VERSION, name:TAG)",
    ),
) -> ClassifyResponse:
    """Classify images with an adapted model: top-k labels and scores per image, in order.

    ``model_id`` may be a model id, a model name (``name`` or ``name:latest``: the newest version;
    ``name:3``; ``name:TAG``), or the id of the job that produces the model: 409 until it succeeds.
    """
    model = await run_in_threadpool(_find_model, request.app.state.sessions, tenant, model_id)
    parsed = await _parse(request, settings)  # after the lookup: no body is read for a 404
    serving = request.app.state.serving

    def work() -> ClassifyResponse:
        check_request(parsed.images, _limits(settings))  # refuse before loading the model
        served = serving.adapted(model)
        results = _classify(served, parsed.images, settings, parsed.top_k)
        return ClassifyResponse(model_id=model.id, results=results)

    return await run_in_threadpool(work)


def _check_base_model(
    request: Request, bm: dict[str, Any], tenant: uuid.UUID, settings: Settings
) -> None:
    with request.app.state.sessions() as session:
        validate_base_model(bm, settings, lambda jid: queries.owns_job(session, tenant, jid))


@router.post(
    "/classify",
    response_model=ClassifyResponse,
    responses={**_PROBLEMS, 403: {"description": "Zero-shot disabled, or a URI refused"}},
    openapi_extra={"requestBody": images_body(zero_shot=True)},
)
async def classify_zero_shot(
    request: Request, tenant: ShortTenantDep, settings: SettingsDep
) -> ClassifyResponse:
    """Zero-shot CLIP without adaptation: ``{base_model, class_names, templates?, images}``.

    Text embeddings are cached per (base model, classes, templates), so comparing before/after
    adaptation on the same images is cheap.
    """
    if not settings.classify.allow_zero_shot:
        raise ApiError("zero_shot_disabled", "zero-shot classification is disabled on this server")
    parsed = await _parse(request, settings)
    f = parsed.fields
    try:
        base = BaseModelRequest.model_validate(f.get("base_model") or {})
    except ValueError as exc:
        raise ApiError("validation_error", f"base_model: {exc}") from exc
    class_names = f.get("class_names")
    templates = f.get("templates")
    if not isinstance(class_names, list) or not all(isinstance(x, str) for x in class_names):
        raise ApiError("validation_error", "class_names must be a list of strings")
    if len(class_names) > settings.api.max_class_names:
        raise ApiError("validation_error", f"at most {settings.api.max_class_names} class names")
    if templates is not None and (
        not isinstance(templates, list) or len(templates) > settings.api.max_templates
    ):
        raise ApiError("validation_error", "templates must be a list of strings")
    bm = base.model_dump(exclude_none=True)
    await run_in_threadpool(_check_base_model, request, bm, tenant, settings)
    serving = request.app.state.serving

    def work() -> ClassifyResponse:
        check_request(parsed.images, _limits(settings))
        served = serving.zero_shot(bm, class_names, templates)
        results = _classify(served, parsed.images, settings, parsed.top_k)
        return ClassifyResponse(base_model=bm, results=results)

    return await run_in_threadpool(work)
