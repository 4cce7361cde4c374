"""ORM rows → public response schemas (one place that shapes what GET /v1/jobs returns)."""

from __future__ import annotations

from must_core.db.models import AdaptedModel, Job
from must_core.jobs.schemas import (
    DatasetStats,
    JobError,
    JobMetrics,
    JobRead,
    ModelRead,
    Progress,
)
from must_core.jobs.states import JobKind, JobStatus

EVAL_KEYS = ("zero_shot", "adapted", "adapted_ema", "eval_num_images", "eval_num_skipped")


def job_view(job: Job) -> JobRead:
    spec = job.spec or {}
    metrics = job.metrics or {}
    evals = {k: metrics[k] for k in EVAL_KEYS if k in metrics}
    stats = job.dataset_stats or {}
    return JobRead(
        id=job.id,
        kind=JobKind(job.kind or JobKind.ADAPT),
        status=JobStatus(job.status),
        dataset_uri=spec.get("dataset_uri", ""),
        eval_dataset_uri=spec.get("eval_dataset_uri"),
        class_names=list(spec.get("class_names", [])),
        templates=spec.get("templates"),
        base_model=dict(spec.get("base_model", {})),
        params=dict(spec.get("params", {})),
        progress=Progress.model_validate(job.progress or {}),
        metrics=JobMetrics(
            train=metrics.get("train"),
            eval=evals or None,
            dataset_cache=metrics.get("dataset_cache"),
            predicted_classes=metrics.get("predicted_classes"),
            predictions=metrics.get("predictions"),
            health=metrics.get("health"),
            served_model=metrics.get("served_model"),
            augmentation=metrics.get("augmentation"),
        ),
        warnings=list(metrics.get("warnings") or []),
        dataset=DatasetStats.model_validate(stats),
        model_id=job.model_id,
        error=JobError(code=job.error_code, message=job.error_message or "")
        if job.error_code
        else None,
        attempt=job.attempt,
        transient_retries=job.transient_retries,
        cancel_requested=job.cancel_requested,
        resumed_from_step=job.resumed_from_step,
        checkpoint_step=job.checkpoint_step,
        created_at=job.created_at,
        updated_at=job.updated_at,
        started_at=job.started_at,
        finished_at=job.finished_at,
        heartbeat_at=job.heartbeat_at,
    )


def model_formats(model: AdaptedModel) -> list[str]:
    formats = ["safetensors"]
    if model.onnx_key:
        formats.append("onnx")
    if model.ema_artifact_key:
        formats.append("safetensors_ema")
    return formats


def model_view(model: AdaptedModel) -> ModelRead:
    view = ModelRead.model_validate(model)
    view.tags = list(model.tags or [])
    view.formats = model_formats(model)
    return view
