"""Public request/response schemas of the jobs and models API (pydantic v2). Field names are contracts."""

from __future__ import annotations

import uuid
from datetime import datetime
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from must_core.jobs.inputs import MAX_SEED, check_json_value
from must_core.jobs.states import JobStatus


class _Schema(BaseModel):
    model_config = ConfigDict(from_attributes=True)


class BaseModelRequest(BaseModel):
    """Which CLIP to start from. ``config_uri``/``checkpoint_uri``: file://, s3:// or https://."""

    model_config = ConfigDict(extra="forbid")

    arch: str = Field("ViT-B-16", min_length=1, max_length=300)
    pretrained: str | None = Field(None, max_length=300)
    config_uri: str | None = Field(None, max_length=4096)
    checkpoint_uri: str | None = Field(None, max_length=4096)
    force_quick_gelu: bool | None = None
    # No tag, checkpoint or local-dir folder means random weights: refused (422) unless this is true.
    allow_random_init: bool = False


class JobParams(BaseModel):
    """Hyperparameters (a preset plus overrides); validated by the engine's ``make_config``."""

    model_config = ConfigDict(extra="allow")

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
    # label-free run health, latest interval (docs/algorithm.md, "Run health"): pred_entropy,
    # entropy_ratio, max_class_share, confident_ratio, agree_zero_shot, agree_teacher, class_counts
    health: dict[str, Any] | None = None
    # which weights are served as the model: {"weights": student|ema|zero_shot, "reason"}
    served_model: dict[str, Any] | None = None
    # the strong-view recipe chosen without labels and the agreements it was chosen from
    augmentation: dict[str, Any] | None = None


class JobWarning(_Schema):
    code: str  # "collapsed" | "degraded"
    message: str


class DatasetStats(_Schema):
    num_images: int | None = None
    num_skipped: int | None = None
    skipped_examples: list[dict[str, str]] = Field(default_factory=list)


class JobRead(_Schema):
    id: uuid.UUID
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


class ModelList(BaseModel):
    items: list[ModelRead]
    total: int
    limit: int
    offset: int


StatusFilter = Literal["queued", "running", "succeeded", "failed", "cancelled"]
