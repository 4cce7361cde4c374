"""Public request/response schemas of the jobs and models API (pydantic v2). Field names are contracts."""

from __future__ import annotations

import re
import uuid
from datetime import datetime
from typing import Annotated, Any, Literal

from pydantic import AfterValidator, BaseModel, ConfigDict, Field, field_validator, model_validator

from must_core.jobs.inputs import MAX_SEED, check_json_value
from must_core.jobs.states import JobKind, JobStatus

# Model names and tags: no ':' (it separates name and tag) and not UUID-shaped (ids win).
MODEL_NAME_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$"
TAG_PATTERN = r"^[A-Za-z][A-Za-z0-9._-]{0,63}$"  # a letter first: numbers are versions
_UUID_PREFIX = r"^[0-9a-fA-F]{8}-[0-9a-fA-F]{4}-"


def _not_uuid(name: str) -> str:
    """Refuse what starts like a UUID (the rule the schema states with ``not: pattern``)."""
    if re.match(_UUID_PREFIX, name):
        raise ValueError(
            "a model name may not look like a UUID (ids and names share one namespace)"
        )
    return name


def _plain_tag(tag: str) -> str:
    if tag == "latest":
        raise ValueError("'latest' is reserved (name:latest is always the newest version)")
    return tag


# http(s), a host name or IPv4 address (no credentials), an optional port 1-65535, then anything
_PORT = r"(?:[1-9][0-9]{0,3}|[1-5][0-9]{4}|6[0-4][0-9]{3}|65[0-4][0-9]{2}|655[0-2][0-9]|6553[0-5])"
WEBHOOK_URL_PATTERN = rf"^https?://[A-Za-z0-9.-]+(?::{_PORT})?(?:[/?#][!-~]*)?$"
WebhookUrl = Annotated[
    str,
    Field(
        min_length=1,
        max_length=2048,
        pattern=WEBHOOK_URL_PATTERN,
        examples=["https://example.com/hooks/must"],
    ),
]
ModelName = Annotated[
    str,
    Field(
        pattern=MODEL_NAME_PATTERN,
        examples=["shelf-photos"],
        json_schema_extra={"not": {"pattern": _UUID_PREFIX}},
    ),
    AfterValidator(_not_uuid),
]
Tag = Annotated[
    str,
    Field(
        pattern=TAG_PATTERN, examples=["production"], json_schema_extra={"not": {"const": "latest"}}
    ),
    AfterValidator(_plain_tag),
]


class _Schema(BaseModel):
    model_config = ConfigDict(from_attributes=True)


class BaseModelRequest(BaseModel):
    """Which CLIP to start from. ``config_uri``/``checkpoint_uri``: file://, s3:// or https://.
    Strict: ``0`` is not ``false`` (the schema says boolean, and a request the schema rejects is
    refused)."""

    model_config = ConfigDict(extra="forbid", strict=True)

    arch: str = Field("ViT-B-16", min_length=1, max_length=300)
    pretrained: str | None = Field(None, max_length=300)
    config_uri: str | None = Field(None, max_length=4096)
    checkpoint_uri: str | None = Field(None, max_length=4096)
    force_quick_gelu: bool | None = None
    # No tag, checkpoint or local-dir folder means random weights: refused (422) unless this is true.
    allow_random_init: bool = False


class JobParams(BaseModel):
    """Hyperparameters (a preset plus overrides); validated by the engine's ``make_config``.
    Strict: ``true`` is not an epoch count and ``"10"`` not a number."""

    model_config = ConfigDict(extra="allow", strict=True)

    preset: str | None = Field(None, max_length=100)
    epochs: int | None = Field(None, ge=1, le=10_000)
    batch_size: int | None = Field(None, ge=1, le=65_536)  # global batch per optimizer step
    # images per forward pass and process; smaller than the per-process share: gradient accumulation
    micro_batch_size: int | None = Field(None, ge=1, le=4096)
    # DDP ranks for this job (one GPU each); routed to workers that have that many (queue gpu.xN)
    num_processes: int | None = Field(None, ge=1, le=64)
    lr: float | None = Field(None, gt=0, le=1.0)
    min_steps: int | None = Field(None, ge=0, le=10_000_000)
    seed: int | None = Field(None, ge=0, le=MAX_SEED)
    # after training, label every image of the job's own dataset (GET /v1/jobs/{id}/predictions)
    predict_dataset: bool | None = None


class JobCreate(BaseModel):
    model_config = ConfigDict(extra="forbid")

    @model_validator(mode="before")
    @classmethod
    def _storable(cls, data: Any) -> Any:
        check_json_value(data)  # every string, key and number, before any field rule
        return data

    dataset_uri: str = Field(..., min_length=1, max_length=4096)
    class_names: list[str] = Field(
        ...,
        min_length=2,
        json_schema_extra={
            "uniqueItems": True,
            "items": {"type": "string", "minLength": 1, "maxLength": 200, "pattern": r"\S"},
        },
    )
    templates: list[str] | None = Field(
        None,
        min_length=1,
        json_schema_extra={
            "items": {"type": "string", "maxLength": 300, "pattern": r"^[^{}]*\{\}[^{}]*$"}
        },
    )
    base_model: BaseModelRequest = Field(default_factory=BaseModelRequest)  # type: ignore[arg-type]
    eval_dataset_uri: str | None = Field(None, max_length=4096)
    params: JobParams = Field(default_factory=JobParams)  # type: ignore[arg-type]
    # the model's name (a tenant's namespace; each job under a name adds version N+1) and tags
    # (each tag points at one version; "name:latest" is always the newest)
    name: ModelName | None = None
    tags: list[Tag] = Field(default_factory=list, max_length=20)
    # POSTed a signed JSON event when the job ends (see docs/service.md, "Webhooks")
    callback_url: WebhookUrl | None = None

    @field_validator("class_names")
    @classmethod
    def _classes(cls, v: list[str]) -> list[str]:
        cleaned = [c.strip() for c in v]
        if any(not c or len(raw) > 200 for c, raw in zip(cleaned, v, strict=True)):
            raise ValueError("class names must be 1-200 characters")
        if len(set(cleaned)) != len(cleaned):
            raise ValueError("class names must be unique")
        return cleaned

    @field_validator("templates")
    @classmethod
    def _templates(cls, v: list[str] | None) -> list[str] | None:
        if v is None:
            return v
        if not v or any("{}" not in t or len(t) > 300 for t in v):
            raise ValueError("each template must contain '{}' and be at most 300 characters")
        return v


class Progress(_Schema):
    step: int = 0
    total_steps: int | None = None
    epoch: int | None = None
    fraction: float = 0.0
    eta_seconds: float | None = None
    images_per_second: float | None = None
    phase: str | None = None


class JobError(_Schema):
    code: str
    message: str


class JobMetrics(_Schema):
    train: dict[str, float] | None = None  # latest losses (loss, st, fair, mim, align) + conf_ratio
    eval: dict[str, Any] | None = (
        None  # zero_shot / adapted / adapted_ema when an eval set was given
    )
    # the prepared-dataset cache: {"prepared", "key" (content key), "reused", "prepare_seconds", ...}
    dataset_cache: dict[str, Any] | None = None
    # label-free spot check: {"num_images", "zero_shot", "adapted", "adapted_ema"} → {class: count}
    predicted_classes: dict[str, Any] | None = None
    # predictions jobs (and params.predict_dataset): num_images, num_predicted, num_skipped, ...
    predictions: dict[str, Any] | None = None
    # label-free run health, latest interval (docs/algorithm.md, "Run health"): pred_entropy,
    # entropy_ratio, max_class_share, confident_ratio, agree_zero_shot, agree_teacher, class_counts
    health: dict[str, Any] | None = None
    # which weights are served as the model: {"weights": student|ema|zero_shot, "reason"}
    served_model: dict[str, Any] | None = None
    # the strong-view recipe chosen without labels and the agreements it was chosen from
    augmentation: dict[str, Any] | None = None


class JobWarning(_Schema):
    code: str  # "collapsed" | "degraded" | "diverged"
    message: str


class DatasetStats(_Schema):
    num_images: int | None = None
    num_skipped: int | None = None
    skipped_examples: list[dict[str, str]] = Field(default_factory=list)


class PredictionsCreate(BaseModel):
    """A batch-predictions job: every image under ``dataset_uri`` (the same URI kinds and policy
    as adaptation jobs) labelled by the model; results as JSONL and CSV."""

    model_config = ConfigDict(extra="forbid")

    dataset_uri: str = Field(..., min_length=1, max_length=4096)
    top_k: int = Field(5, ge=1, le=100)
    batch_size: int | None = Field(None, ge=1, le=4096)
    callback_url: WebhookUrl | None = None


class JobRead(_Schema):
    id: uuid.UUID
    kind: JobKind = JobKind.ADAPT
    status: JobStatus
    dataset_uri: str
    eval_dataset_uri: str | None
    class_names: list[str]
    templates: list[str] | None
    base_model: dict[str, Any]
    params: dict[str, Any]
    progress: Progress
    metrics: JobMetrics
    dataset: DatasetStats
    model_id: uuid.UUID | None
    error: JobError | None
    # set when the label-free health rule flags the finished run (the job still succeeds)
    warnings: list[JobWarning] = Field(default_factory=list)
    attempt: int
    transient_retries: int = 0  # claims released after a transient error (not worker deaths)
    cancel_requested: bool
    resumed_from_step: int | None
    checkpoint_step: int | None
    created_at: datetime
    updated_at: datetime
    started_at: datetime | None
    finished_at: datetime | None
    heartbeat_at: datetime | None


class JobList(BaseModel):
    items: list[JobRead]
    total: int
    limit: int
    offset: int


class ModelRead(_Schema):
    id: uuid.UUID
    job_id: uuid.UUID
    class_names: list[str]
    base_model: dict[str, Any]
    metrics: dict[str, Any]
    size_bytes: int
    created_at: datetime
    artifact_key: str
    name: str | None = None
    version: int | None = None
    tags: list[str] = Field(default_factory=list)
    sha256: str | None = None  # of the safetensors file (also the download's digest header)
    # download formats available: safetensors always, onnx when exported, safetensors_ema
    formats: list[str] = Field(default_factory=list)
    onnx_size_bytes: int | None = None


WebhookEvent = Literal["job.succeeded", "job.failed", "job.cancelled"]
ALL_EVENTS: list[WebhookEvent] = ["job.succeeded", "job.failed", "job.cancelled"]


class WebhookCreate(BaseModel):
    model_config = ConfigDict(extra="forbid")

    url: WebhookUrl
    events: list[WebhookEvent] = Field(default_factory=lambda: list(ALL_EVENTS), min_length=1)


class WebhookRead(_Schema):
    id: uuid.UUID
    url: str
    events: list[str]
    created_at: datetime
    secret: str | None = Field(None, description="the HMAC key; returned only when created")


class WebhookList(BaseModel):
    items: list[WebhookRead]


class WebhookSecret(BaseModel):
    secret: str = Field(description="signs deliveries to jobs' callback_url")


class DeliveryRead(_Schema):
    id: uuid.UUID
    job_id: uuid.UUID | None
    endpoint_id: uuid.UUID | None
    url: str
    event: str
    status: Literal["pending", "delivered", "failed"]
    attempts: int
    next_attempt_at: datetime
    last_status_code: int | None
    last_error: str | None
    created_at: datetime
    delivered_at: datetime | None


class DeliveryList(BaseModel):
    items: list[DeliveryRead]


class ModelTagsUpdate(BaseModel):
    model_config = ConfigDict(extra="forbid")

    tags: list[Tag] = Field(..., max_length=20)


class ModelList(BaseModel):
    items: list[ModelRead]
    total: int
    limit: int
    offset: int


StatusFilter = Literal["queued", "running", "succeeded", "failed", "cancelled"]


class HistoryPoint(BaseModel):
    """One progress event of the trainer: the losses and rates averaged over its interval."""

    model_config = ConfigDict(extra="allow")

    step: int = Field(..., description="optimizer steps done", examples=[40])
    total_steps: int | None = Field(None, examples=[400])
    epoch: int | None = Field(None, description="0-based epoch of the last step", examples=[1])
    fraction: float | None = Field(None, examples=[0.1])
    losses: dict[str, float] = Field(
        default_factory=dict,
        description="mean over the interval: loss (total), st (self-training), fair, mim, align",
        examples=[{"loss": 2.1, "st": 1.2, "fair": 0.3, "mim": 0.5, "align": 0.1}],
    )
    conf_ratio: float | None = Field(
        None, description="share of pseudo-labels over the confidence threshold", examples=[0.62]
    )
    lr: float | None = Field(None, description="head learning rate at the last step")
    ema_decay: float | None = Field(None, description="teacher EMA decay at the last step")
    images_per_second: float | None = Field(None, examples=[130.5])
    eta_seconds: float | None = Field(None, examples=[240.0])
    phase: str | None = Field(None, examples=["train"])


class JobHistory(BaseModel):
    job_id: uuid.UUID
    status: JobStatus
    points: list[HistoryPoint] = Field(
        ..., description="the training curve: every progress event, by step"
    )
    health: list[dict[str, Any]] = Field(
        default_factory=list,
        description="label-free run-health intervals reported by the trainer, by step (empty "
        "when the engine reports none)",
    )
    predicted_classes: dict[str, Any] | None = Field(
        None,
        description="images of a fixed unlabeled sample per predicted class name: num_images, "
        "zero_shot (before training), adapted and adapted_ema (after)",
    )


class LogLine(BaseModel):
    id: int = Field(..., description="increasing: pass the last one as `after` to follow the log")
    attempt: int = Field(..., description="the attempt (worker claim) that wrote it", examples=[1])
    ts: datetime
    level: str = Field(..., description="debug | info | warning | error", examples=["info"])
    logger: str = Field(..., description="the logger that wrote it", examples=["worker.runner"])
    message: str = Field(..., description="the line", examples=["claimed job (attempt 1)"])


class LogPage(BaseModel):
    items: list[LogLine]
    total: int = Field(..., description="lines of the job (of `attempt`, when given)")
    next_after: int | None = Field(
        None, description="the `after` of the next call (the last line's id; unchanged if none)"
    )


class Sample(BaseModel):
    class_name: str = Field(..., description="the predicted class", examples=["cat"])
    rank: int = Field(
        ...,
        description="0: the served model's most confident image of the class",
        examples=[0],
    )
    path: str = Field(..., description="the image's path inside the dataset", examples=["a/1.jpg"])
    score: float = Field(..., description="softmax probability of the class", examples=[0.93])
    thumbnail: str = Field(..., description="a small JPEG as a data: URI")


class SampleList(BaseModel):
    job_id: uuid.UUID
    model_id: uuid.UUID
    class_name: str | None = Field(None, description="the class asked for; null: every class")
    items: list[Sample]
    predicted_classes: dict[str, Any] | None = Field(
        None, description="predicted-class histograms before (zero_shot) and after adaptation"
    )
