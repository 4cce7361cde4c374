"""Descriptions and examples of the public schemas' fields, for the OpenAPI document.

A field documented in its model (``Field(description=..., examples=...)``) keeps that; this table
fills in the rest, so every request and response field of ``/openapi.json`` has both (checked by
tests/unit/service/test_openapi_docs.py). Keyed by component schema name, then field name:
(description, example).
"""

from __future__ import annotations

from typing import Any

JOB_ID = "3f1c9a2e-8d4b-4c1e-9a7f-2b6d5e8c0a11"
MODEL_ID = "9b2e4d6f-1a3c-4e5b-8d7f-0c2a4b6d8e10"
TS = "2026-12-02T04:20:00Z"
BASE = {"arch": "ViT-B-16", "pretrained": "openai"}
CLASSES = ["cat", "dog", "bird"]

FIELD_DOCS: dict[str, dict[str, tuple[str, Any]]] = {
    "BaseModelRequest": {
        "arch": ("open_clip architecture name", "ViT-B-16"),
        "pretrained": ("open_clip pretrained tag (weights installed on the workers)", "openai"),
        "config_uri": ("open_clip model config JSON (file://, s3:// or https://)", None),
        "checkpoint_uri": ("CLIP weights to start from (file://, s3:// or https://)", None),
        "force_quick_gelu": ("use QuickGELU activations (OpenAI weights); null: automatic", None),
    },
    "JobParams": {
        "preset": ("a named hyperparameter preset; the other fields override it", None),
        "epochs": ("passes over the dataset", 10),
        "batch_size": ("global batch per optimizer step", 64),
        "micro_batch_size": ("images per forward pass and process (gradient accumulation)", 32),
        "num_processes": ("DDP ranks (one GPU each) for this job", 1),
        "lr": ("base learning rate", 0.0001),
        "min_steps": ("train at least this many optimizer steps (more epochs if needed)", 400),
        "seed": ("random seed of the run", 0),
    },
    "JobCreate": {
        "dataset_uri": (
            "the unlabeled images: s3://bucket/prefix/, an https:// archive, or file:// under "
            "an allowed root",
            "s3://my-bucket/photos/",
        ),
        "class_names": ("the classes to adapt to (2 or more, unique)", CLASSES),
        "templates": ("prompt templates with one '{}' for the class name", ["a photo of a {}."]),
        "base_model": ("which CLIP to start from", BASE),
        "eval_dataset_uri": ("optional labelled folder, one subfolder per class name", None),
        "params": ("hyperparameters (preset + overrides)", {"epochs": 10}),
    },
    "Progress": {
        "step": ("optimizer steps done", 120),
        "total_steps": ("optimizer steps of the run", 400),
        "epoch": ("0-based epoch of the last step", 2),
        "fraction": ("step / total_steps", 0.3),
        "eta_seconds": ("estimated seconds left", 540.0),
        "images_per_second": ("training throughput over the last interval", 130.5),
        "phase": ("fetch | train | done | stopped", "train"),
    },
    "JobError": {
        "code": ("stable error code (see the problem codes)", "dataset_empty"),
        "message": ("what went wrong", "no decodable image under s3://my-bucket/photos/"),
    },
    "JobMetrics": {
        "train": (
            "latest losses (loss, st, fair, mim, align) and conf_ratio",
            {"loss": 1.9, "conf_ratio": 0.7},
        ),
        "eval": (
            "zero_shot / adapted / adapted_ema accuracy when an eval set was given: top1, "
            "mean_per_class, num_images, per_class (by class name)",
            {"zero_shot": {"top1": 52.0, "per_class": {"cat": 61.0}}},
        ),
        "dataset_cache": ("the prepared-dataset cache: prepared, key, reused, ...", None),
        "predicted_classes": (
            "label-free spot check: images of a fixed unlabeled sample per predicted class, "
            "zero-shot (before) and adapted (after)",
            {"num_images": 3, "zero_shot": {"cat": 2, "dog": 1}, "adapted": {"cat": 1, "dog": 2}},
        ),
    },
    "DatasetStats": {
        "num_images": ("usable images found", 5000),
        "num_skipped": ("files skipped as undecodable", 2),
        "skipped_examples": (
            "up to 20 skipped files with the reason",
            [{"path": "a/broken.jpg", "reason": "cannot identify image file"}],
        ),
    },
    "JobRead": {
        "id": ("job id", JOB_ID),
        "status": ("queued | running | succeeded | failed | cancelled", "running"),
        "dataset_uri": ("as submitted", "s3://my-bucket/photos/"),
        "eval_dataset_uri": ("as submitted", None),
        "class_names": ("as submitted", CLASSES),
        "templates": ("as submitted (null: the defaults)", None),
        "base_model": ("as submitted", BASE),
        "params": ("as submitted", {"epochs": 10}),
        "progress": ("where training is", None),
        "metrics": ("training and evaluation metrics so far", None),
        "dataset": ("what the worker found in the dataset", None),
        "model_id": ("the adapted model, once the job succeeded", MODEL_ID),
        "error": ("why the job failed", None),
        "attempt": ("claims by a worker so far (a lost worker's job is retried)", 1),
        "transient_retries": ("claims released after a transient infrastructure error", 0),
        "cancel_requested": ("a cancel was asked for", False),
        "resumed_from_step": ("the checkpoint step a retried attempt continued from", None),
        "checkpoint_step": ("the step of the last stored checkpoint", 100),
        "created_at": ("submission time (UTC)", TS),
        "updated_at": ("last change (UTC)", TS),
        "started_at": ("first claim by a worker (UTC)", TS),
        "finished_at": ("end time (UTC)", None),
        "heartbeat_at": ("the worker's last heartbeat (UTC)", TS),
    },
    "JobList": {
        "items": ("jobs, newest first", []),
        "total": ("jobs matching the filter", 42),
        "limit": ("page size used", 20),
        "offset": ("jobs skipped", 0),
    },
    "ModelRead": {
        "id": ("model id", MODEL_ID),
        "job_id": ("the job that produced it", JOB_ID),
        "class_names": ("its classes, in logit order", CLASSES),
        "base_model": ("the CLIP it was adapted from", BASE),
        "metrics": ("the job's final metrics", {"adapted": {"top1": 71.5}}),
        "size_bytes": ("size of the weights file", 346_000_000),
        "created_at": ("creation time (UTC)", TS),
        "artifact_key": (
            "object-store key of the weights",
            f"jobs/{JOB_ID}/model/model.safetensors",
        ),
    },
    "ModelList": {
        "items": ("models, newest first", []),
        "total": ("models of the tenant", 3),
        "limit": ("page size used", 20),
        "offset": ("models skipped", 0),
    },
    "HistoryPoint": {
        "step": ("optimizer steps done", 40),
        "total_steps": ("optimizer steps of the run", 400),
        "fraction": ("step / total_steps", 0.1),
        "lr": ("head learning rate at the last step", 0.0001),
        "ema_decay": ("teacher EMA decay at the last step", 0.999),
        "images_per_second": ("training throughput over the interval", 130.5),
        "eta_seconds": ("estimated seconds left", 240.0),
        "phase": ("train", "train"),
    },
    "JobHistory": {
        "job_id": ("job id", JOB_ID),
        "status": ("the job's status", "succeeded"),
        "points": ("", [{"step": 10, "losses": {"loss": 2.0}, "conf_ratio": 0.6}]),
        "health": ("", []),
        "predicted_classes": (
            "",
            {"num_images": 3, "zero_shot": {"cat": 3}, "adapted": {"cat": 2}},
        ),
    },
    "LogLine": {
        "id": ("", 1042),
        "ts": ("when it was written (UTC)", TS),
    },
    "LogPage": {
        "items": ("log lines, oldest first", []),
        "total": ("", 380),
        "next_after": ("", 1042),
    },
    "Sample": {"thumbnail": ("", "data:image/jpeg;base64,/9j/4AAQSkZJRg...")},
    "SampleList": {
        "job_id": ("job id", JOB_ID),
        "model_id": ("the adapted model", MODEL_ID),
        "class_name": ("", "cat"),
        "items": ("images, best first per class", []),
        "predicted_classes": (
            "",
            {"num_images": 3, "zero_shot": {"cat": 3}, "adapted": {"cat": 2}},
        ),
    },
    "TopK": {
        "label": ("class name", "cat"),
        "index": ("class index (logit order)", 0),
        "score": ("softmax probability", 0.91),
    },
    "ImageResult": {
        "label": ("the top class", "cat"),
        "score": ("its softmax probability", 0.91),
        "top_k": ("the k best classes, best first", [{"label": "cat", "index": 0, "score": 0.91}]),
    },
    "ClassifyResponse": {
        "model_id": ("", MODEL_ID),
        "base_model": ("", None),
        "results": ("", []),
    },
}


def apply(schemas: dict[str, Any]) -> None:
    """Fill in each documented field's missing description and examples."""
    for name, fields in FIELD_DOCS.items():
        props = schemas.get(name, {}).get("properties", {})
        for field, (description, example) in fields.items():
            prop = props.get(field)
            if prop is None:
                continue
            if description and not prop.get("description"):
                prop["description"] = description
            if "examples" not in prop and "example" not in prop:
                prop["examples"] = [example]
