"""Typed ORM models: tenants, API keys, jobs and adapted models. Statuses are stored as strings."""

from __future__ import annotations

import uuid
from datetime import datetime
from typing import Any

from sqlalchemy import (
    BigInteger,
    Boolean,
    Float,
    ForeignKey,
    Index,
    Integer,
    String,
    Text,
    UniqueConstraint,
    Uuid,
)
from sqlalchemy.orm import Mapped, mapped_column

from must_core.db.base import Base, JsonType, UtcDateTime, utcnow


class Tenant(Base):
    __tablename__ = "tenants"

    id: Mapped[uuid.UUID] = mapped_column(Uuid, primary_key=True, default=uuid.uuid4)
    name: Mapped[str] = mapped_column(String(200), unique=True)
    created_at: Mapped[datetime] = mapped_column(UtcDateTime, default=utcnow)
    # signs deliveries to a job's callback_url (GET /v1/webhooks/secret); endpoints have their own
    webhook_secret: Mapped[str | None] = mapped_column(String(64), nullable=True)


class ApiKey(Base):
    __tablename__ = "api_keys"

    id: Mapped[uuid.UUID] = mapped_column(Uuid, primary_key=True, default=uuid.uuid4)
    tenant_id: Mapped[uuid.UUID] = mapped_column(
        ForeignKey("tenants.id", ondelete="CASCADE"), index=True
    )
    name: Mapped[str] = mapped_column(String(200), default="")
    # First characters of the key, shown in listings so people can tell keys apart; never the secret.
    prefix: Mapped[str] = mapped_column(String(16))
    # SHA-256 of the full key: keys are 256-bit random tokens, so a fast hash is enough.
    key_hash: Mapped[str] = mapped_column(String(64), unique=True)
    created_at: Mapped[datetime] = mapped_column(UtcDateTime, default=utcnow)
    revoked_at: Mapped[datetime | None] = mapped_column(UtcDateTime, nullable=True)
    last_used_at: Mapped[datetime | None] = mapped_column(UtcDateTime, nullable=True)


class Job(Base):
    __tablename__ = "jobs"
    __table_args__ = (
        Index("ix_jobs_tenant_created", "tenant_id", "created_at"),
        Index("ix_jobs_status_heartbeat", "status", "heartbeat_at"),
        Index("ix_jobs_finished_at", "finished_at"),
        # one job per (tenant, Idempotency-Key); NULL keys never collide
        UniqueConstraint("tenant_id", "idempotency_key", name="uq_jobs_tenant_idempotency_key"),
    )

    id: Mapped[uuid.UUID] = mapped_column(Uuid, primary_key=True, default=uuid.uuid4)
    tenant_id: Mapped[uuid.UUID] = mapped_column(ForeignKey("tenants.id", ondelete="CASCADE"))
    # queued | running | succeeded | failed | cancelled (must_core.jobs.states.JobStatus)
    status: Mapped[str] = mapped_column(String(16), default="queued")
    # adapt (MUST adaptation) | predict (batch predictions of a model over a dataset)
    kind: Mapped[str] = mapped_column(String(16), default="adapt", server_default="adapt")
    spec: Mapped[dict[str, Any]] = mapped_column(JsonType)  # the validated JobCreate body
    progress: Mapped[dict[str, Any]] = mapped_column(JsonType, default=dict)
    metrics: Mapped[dict[str, Any]] = mapped_column(JsonType, default=dict)
    dataset_stats: Mapped[dict[str, Any]] = mapped_column(JsonType, default=dict)
    error_code: Mapped[str | None] = mapped_column(String(64), nullable=True)
    error_message: Mapped[str | None] = mapped_column(Text, nullable=True)
    attempt: Mapped[int] = mapped_column(Integer, default=0)  # claims so far
    # claims that ended in a transient infrastructure error (released for retry): not worker deaths
    transient_retries: Mapped[int] = mapped_column(Integer, default=0, server_default="0")
    idempotency_key: Mapped[str | None] = mapped_column(String(200), nullable=True)
    request_hash: Mapped[str | None] = mapped_column(String(64), nullable=True)  # of the spec
    cancel_requested: Mapped[bool] = mapped_column(Boolean, default=False)
    checkpoint_step: Mapped[int | None] = mapped_column(Integer, nullable=True)  # last uploaded
    resumed_from_step: Mapped[int | None] = mapped_column(Integer, nullable=True)
    worker: Mapped[str | None] = mapped_column(String(255), nullable=True)  # host:pid of the claim
    model_id: Mapped[uuid.UUID | None] = mapped_column(Uuid, nullable=True)
    # the terminal status whose webhook events have been written to the outbox (resume: again)
    notified_status: Mapped[str | None] = mapped_column(String(16), nullable=True)
    created_at: Mapped[datetime] = mapped_column(UtcDateTime, default=utcnow)
    updated_at: Mapped[datetime] = mapped_column(UtcDateTime, default=utcnow, onupdate=utcnow)
    enqueued_at: Mapped[datetime | None] = mapped_column(UtcDateTime, nullable=True)
    started_at: Mapped[datetime | None] = mapped_column(UtcDateTime, nullable=True)
    heartbeat_at: Mapped[datetime | None] = mapped_column(UtcDateTime, nullable=True)
    finished_at: Mapped[datetime | None] = mapped_column(UtcDateTime, nullable=True)


class AdaptedModel(Base):
    __tablename__ = "adapted_models"
    __table_args__ = (
        # a name is a tenant's; each job naming it adds the next version
        UniqueConstraint("tenant_id", "name", "version", name="uq_models_tenant_name_version"),
    )

    id: Mapped[uuid.UUID] = mapped_column(Uuid, primary_key=True, default=uuid.uuid4)
    tenant_id: Mapped[uuid.UUID] = mapped_column(
        ForeignKey("tenants.id", ondelete="CASCADE"), index=True
    )
    job_id: Mapped[uuid.UUID] = mapped_column(
        ForeignKey("jobs.id", ondelete="CASCADE"), unique=True
    )
    class_names: Mapped[list[str]] = mapped_column(JsonType)
    base_model: Mapped[dict[str, Any]] = mapped_column(JsonType)
    metrics: Mapped[dict[str, Any]] = mapped_column(JsonType, default=dict)
    artifact_key: Mapped[str] = mapped_column(String(1024))  # jobs/{job_id}/model/model.safetensors
    ema_artifact_key: Mapped[str | None] = mapped_column(String(1024), nullable=True)
    size_bytes: Mapped[int] = mapped_column(Integer, default=0)
    sha256: Mapped[str | None] = mapped_column(String(64), nullable=True)  # of artifact_key
    name: Mapped[str | None] = mapped_column(String(200), nullable=True)
    version: Mapped[int | None] = mapped_column(Integer, nullable=True)  # 1, 2, ... per name
    # tags point at one version of a name each (setting one moves it); "latest" is implicit
    tags: Mapped[list[str]] = mapped_column(JsonType, default=list, server_default="[]")
    onnx_key: Mapped[str | None] = mapped_column(String(1024), nullable=True)
    onnx_sha256: Mapped[str | None] = mapped_column(String(64), nullable=True)
    onnx_size_bytes: Mapped[int | None] = mapped_column(BigInteger, nullable=True)
    created_at: Mapped[datetime] = mapped_column(UtcDateTime, default=utcnow)


class JobEvent(Base):
    """One event a job's trainer reported: every ``progress`` point of the training curve and any
    ``health`` interval; one row per (job, kind, step), so a resumed attempt's replayed steps
    replace the ones it repeats."""

    __tablename__ = "job_events"
    __table_args__ = (
        UniqueConstraint("job_id", "kind", "step", name="uq_job_events_job_kind_step"),
    )

    id: Mapped[int] = mapped_column(BigInteger().with_variant(Integer, "sqlite"), primary_key=True)
    job_id: Mapped[uuid.UUID] = mapped_column(ForeignKey("jobs.id", ondelete="CASCADE"))
    kind: Mapped[str] = mapped_column(String(32))
    step: Mapped[int] = mapped_column(Integer)
    attempt: Mapped[int] = mapped_column(Integer)
    data: Mapped[dict[str, Any]] = mapped_column(JsonType)
    created_at: Mapped[datetime] = mapped_column(UtcDateTime, default=utcnow)


class JobLog(Base):
    """One log line of a job's worker side (runner and trainer), in the order written."""

    __tablename__ = "job_logs"
    __table_args__ = (Index("ix_job_logs_job_id_id", "job_id", "id"),)

    id: Mapped[int] = mapped_column(BigInteger().with_variant(Integer, "sqlite"), primary_key=True)
    job_id: Mapped[uuid.UUID] = mapped_column(ForeignKey("jobs.id", ondelete="CASCADE"))
    attempt: Mapped[int] = mapped_column(Integer)
    created_at: Mapped[datetime] = mapped_column(UtcDateTime, default=utcnow)
    level: Mapped[str] = mapped_column(String(16))
    logger: Mapped[str] = mapped_column(String(200))
    message: Mapped[str] = mapped_column(Text)


class ModelSample(Base):
    """A dataset image the adapted model assigns to a class: the sample gallery of a model."""

    __tablename__ = "model_samples"
    __table_args__ = (Index("ix_model_samples_model_class_rank", "model_id", "class_name", "rank"),)

    id: Mapped[int] = mapped_column(BigInteger().with_variant(Integer, "sqlite"), primary_key=True)
    model_id: Mapped[uuid.UUID] = mapped_column(ForeignKey("adapted_models.id", ondelete="CASCADE"))
    class_name: Mapped[str] = mapped_column(String(200))
    rank: Mapped[int] = mapped_column(Integer)  # 0: the most confident
    path: Mapped[str] = mapped_column(Text)  # relative to the dataset root
    score: Mapped[float] = mapped_column(Float)
    thumbnail: Mapped[str] = mapped_column(Text)  # data:image/jpeg;base64,...


class WebhookEndpoint(Base):
    """A tenant's registered receiver of job events."""

    __tablename__ = "webhook_endpoints"

    id: Mapped[uuid.UUID] = mapped_column(Uuid, primary_key=True, default=uuid.uuid4)
    tenant_id: Mapped[uuid.UUID] = mapped_column(
        ForeignKey("tenants.id", ondelete="CASCADE"), index=True
    )
    url: Mapped[str] = mapped_column(String(2048))
    secret: Mapped[str] = mapped_column(String(64))  # HMAC key; shown once, at creation
    events: Mapped[list[str]] = mapped_column(JsonType)  # e.g. ["job.succeeded", "job.failed"]
    created_at: Mapped[datetime] = mapped_column(UtcDateTime, default=utcnow)


class WebhookDelivery(Base):
    """One event for one receiver: the outbox row, its attempts and its outcome."""

    __tablename__ = "webhook_deliveries"
    __table_args__ = (Index("ix_webhook_deliveries_due", "status", "next_attempt_at"),)

    id: Mapped[uuid.UUID] = mapped_column(Uuid, primary_key=True, default=uuid.uuid4)
    tenant_id: Mapped[uuid.UUID] = mapped_column(
        ForeignKey("tenants.id", ondelete="CASCADE"), index=True
    )
    job_id: Mapped[uuid.UUID | None] = mapped_column(Uuid, nullable=True, index=True)
    endpoint_id: Mapped[uuid.UUID | None] = mapped_column(
        ForeignKey("webhook_endpoints.id", ondelete="CASCADE"), nullable=True
    )
    url: Mapped[str] = mapped_column(String(2048))
    event: Mapped[str] = mapped_column(String(64))
    payload: Mapped[dict[str, Any]] = mapped_column(JsonType)
    # pending | delivered | failed
    status: Mapped[str] = mapped_column(String(16), default="pending")
    attempts: Mapped[int] = mapped_column(Integer, default=0)
    next_attempt_at: Mapped[datetime] = mapped_column(UtcDateTime, default=utcnow)
    last_status_code: Mapped[int | None] = mapped_column(Integer, nullable=True)
    last_error: Mapped[str | None] = mapped_column(Text, nullable=True)
    created_at: Mapped[datetime] = mapped_column(UtcDateTime, default=utcnow)
    delivered_at: Mapped[datetime | None] = mapped_column(UtcDateTime, nullable=True)
