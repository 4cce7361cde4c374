"""Descriptions and examples of the public schemas' fields, for the OpenAPI document.

A field documented in its model (``Field(description=..., examples=...)``) keeps that; this table
fills in the rest, so every request and response field of ``/openapi.json`` has both (checked by
tests/unit/service/test_openapi_docs.py). Keyed by component schema name, then field name:
(description, example).
"""

from __future__ import annotations

from typing import Any

JOB_ID = "3f1c9a2e-8d4b-4c1e-9a7f-2b6d5e8c0a11"
WEBHOOK_ID = "0e4c2a6b-7d1f-4b3a-9c5e-8f2a1d3b4c60"
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
        "allow_random_init": ("allow an architecture without weights (tests, benchmarks)", False),
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
        "predict_dataset": (
            "label the job's own dataset after training (a predictions file)",
            False,
        ),
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
        "name": ("the model's name; each job under a name adds a version", None),
        "tags": ("tags for the model (resolve as name:TAG)", []),
        "callback_url": ("URL that receives a signed event when the job ends", None),
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
        "predictions": (
            "a predictions file's counts: num_images, num_predicted, num_skipped",
            None,
        ),
        "health": (
            "label-free run health of the last interval (docs/algorithm.md, Run health)",
            {"entropy_ratio": 0.93, "max_class_share": 0.14, "agree_zero_shot": 0.71},
        ),
        "served_model": (
            "which weights are served and why",
            {"weights": "student", "reason": "healthy"},
        ),
        "augmentation": ("the strong-view recipe and how it was chosen", {"hflip": 0.5}),
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
        "kind": ("adapt (an adaptation job) or predict (a predictions job)", "adapt"),
        "warnings": ("run-health warnings (collapsed, degraded, diverged); empty when healthy", []),
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
        "name": ("the model's name, if its job gave one", "shelf-photos"),
        "version": ("its version under that name (1, 2, ...)", 3),
        "tags": ("its tags", ["prod"]),
        "sha256": ("SHA-256 of the safetensors file (also the download's Repr-Digest)", None),
        "formats": (
            "download formats: safetensors, safetensors_ema, onnx",
            ["safetensors", "onnx"],
        ),
        "onnx_size_bytes": ("size of the ONNX export", None),
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
    "DeliveryList": {"items": ("deliveries, newest first", [])},
    "DeliveryRead": {
        "id": (
            "delivery id (the same on every retry; receivers can de-duplicate by it)",
            WEBHOOK_ID,
        ),
        "job_id": ("the job the event is about", JOB_ID),
        "endpoint_id": ("the registered endpoint, or null for a job's callback_url", None),
        "url": ("where the event is sent", "https://example.com/hooks/must"),
        "event": ("event type", "job.succeeded"),
        "status": ("pending | delivered | failed", "delivered"),
        "attempts": ("POSTs made so far", 1),
        "next_attempt_at": ("when the next attempt is due (pending)", TS),
        "last_status_code": ("HTTP status of the last attempt", 200),
        "last_error": ("why the last attempt failed", None),
        "created_at": ("when the event was queued", TS),
        "delivered_at": ("when a 2xx answer came", TS),
    },
    "WebhookCreate": {
        "url": (
            "receiver URL (public http/https; the dataset SSRF policy applies)",
            "https://example.com/hooks/must",
        ),
        "events": ("event types to send", ["job.succeeded", "job.failed", "job.cancelled"]),
    },
    "WebhookList": {"items": ("the tenant's endpoints", [])},
    "WebhookRead": {
        "id": ("endpoint id", WEBHOOK_ID),
        "url": ("receiver URL", "https://example.com/hooks/must"),
        "events": ("event types sent", ["job.succeeded", "job.failed"]),
        "created_at": ("creation time", TS),
        "secret": ("", None),
    },
    "WebhookSecret": {"secret": ("", "whsec_3q2+7w")},
    "JobWarning": {
        "code": ("collapsed | degraded | diverged (docs/algorithm.md, Run health)", "degraded"),
        "message": (
            "what the health rule saw",
            "predicted-class entropy fell far below zero-shot's",
        ),
    },
    "ModelTagsUpdate": {"tags": ("the model's tags after the update", ["prod"])},
    "PredictionsCreate": {
        "dataset_uri": (
            "the images to label (same URI kinds and policy as jobs)",
            "s3://my-bucket/more-photos/",
        ),
        "top_k": ("labels per image", 5),
        "batch_size": ("images per forward pass (default: the worker's)", 64),
        "callback_url": ("URL that receives a signed event when the job ends", None),
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
