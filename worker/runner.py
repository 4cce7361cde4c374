"""Run one adaptation job end to end. Callable without Celery (tests, debugging).

Life of an attempt: claim (conditional UPDATE) → heartbeat thread → fetch dataset/base model →
download the last checkpoint from storage if any (resume) → the trainer runs as a child process group
(:mod:`worker.training`) while this thread relays its progress (throttled writes), uploads its finished
checkpoints in the background and turns the cancel flag into a stop request → upload the model → one
final commit (model row + ``succeeded``).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import socket
import threading
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from sqlalchemy.exc import InterfaceError, OperationalError
from sqlalchemy.orm import Session, sessionmaker

from must_core.datasets.fetch import FetchCancelled, fetch_dataset
from must_core.db.models import AdaptedModel
from must_core.db.session import session_scope
from must_core.errors import InvalidConfigError, MustError
from must_core.jobs import history, queries
from must_core.jobs.base_models import resolve_base_model
from must_core.jobs.dispatch import job_processes
from must_core.jobs.states import JobKind, JobStatus
from must_core.logging import bind
from must_core.ml.launch import LaunchSpec
from must_core.settings import Settings
from must_core.storage import (
    ArtifactStore,
    checkpoint_key,
    metrics_key,
    model_key,
    prepared_prefix,
)
from must_core.storage.base import TransientStorageError
from must_core.storage.factory import make_s3_client_from_settings
from must_core.storage.keys import onnx_key, predictions_key
from worker.joblog import JobLogCapture
from worker.training import CheckpointUploader, TrainingProcess

_logger = logging.getLogger(__name__)
CHECKPOINT_NAME = "last.pt"  # must_core.ml.train's name for it (not imported: no torch here)
GALLERY_FILE = "gallery.json"  # must_core.ml.gallery's
# trainer events kept as the job's history: the training curve and label-free health intervals
HISTORY_KINDS = frozenset({history.PROGRESS, history.HEALTH})


class TransientJobError(Exception):
    """Infrastructure hiccup (DB, storage, broker unreachable): the task retries with backoff."""


TRANSIENT_ERRORS: tuple[type[BaseException], ...] = (
    TransientStorageError,
    OperationalError,
    InterfaceError,
    ConnectionError,
    TimeoutError,
)


@dataclass
class _Attempt:
    job_id: uuid.UUID
    attempt: int
    cancel: threading.Event = field(default_factory=threading.Event)
    lost: threading.Event = field(default_factory=threading.Event)
    done: threading.Event = field(default_factory=threading.Event)
    last_progress_write: float = 0.0
    tenant_id: uuid.UUID | None = None
    prepared_key: str | None = None  # content key of the job's dataset (prepared-form cache)
    uploaded_prepared: set[str] = field(default_factory=set)
    prepared_upload: threading.Thread | None = None
    seen_progress: bool = False  # the trainer has reported a step (it has state worth saving)
    log: JobLogCapture | None = None
    kind: str = "adapt"  # adapt | predict (must_core.jobs.states.JobKind)
    health: dict[str, Any] | None = None  # the trainer's latest label-free health entry


class JobRunner:
    def __init__(
        self, settings: Settings, sessions: sessionmaker[Session], store: ArtifactStore
    ) -> None:
        self.settings = settings
        self.sessions = sessions
        self.store = store
        self.worker_name = f"{socket.gethostname()}:{os.getpid()}"

    # ---- entry point ---------------------------------------------------------------------------
    def run_job(self, job_id: str) -> str:
        """Claim and run the job. Returns the outcome (``skipped`` when not claimable)."""
        jid = uuid.UUID(job_id)
        try:
            with session_scope(self.sessions) as s:
                attempt = queries.claim_job(s, jid, self.worker_name)
        except TRANSIENT_ERRORS as exc:  # DB down before the claim: nothing to release, just retry
            raise TransientJobError(str(exc)) from exc
        if attempt is None:
            _logger.info("job %s is not claimable (already claimed, finished or cancelled)", jid)
            return "skipped"
        w = self.settings.worker
        log = JobLogCapture(self.sessions, jid, attempt, w.job_log_max_lines)
        with bind(job_id=str(jid), attempt=attempt), log:
            _logger.info("claimed job (attempt %d, worker %s)", attempt, self.worker_name)
            state = _Attempt(jid, attempt, log=log)
            beat = threading.Thread(
                target=self._heartbeat_loop, args=(state,), daemon=True, name=f"heartbeat-{jid}"
            )
            beat.start()
            work = self.settings.work_dir / "jobs" / str(jid)
            try:
                return self._run(state, work)
            except FetchCancelled:
                return self._stopped(state, {"status": "stopped", "killed": True})
            except TRANSIENT_ERRORS as exc:
                _logger.warning("transient infrastructure error, releasing job for retry: %s", exc)
                self._safe(lambda s: queries.release_job(s, jid, attempt))
                raise TransientJobError(str(exc)) from exc
            except MustError as exc:
                _logger.warning("job failed: %s", exc)
                self._fail(state, exc.code, exc.message)
                return "failed"
            except Exception as exc:
                code = (
                    "time_limit_exceeded"
                    if type(exc).__name__ == "SoftTimeLimitExceeded"
                    else "internal_error"
                )
                _logger.exception("job crashed")
                self._fail(state, code, f"{type(exc).__name__}: {exc}"[:2000])
                return "failed"
            finally:
                state.done.set()
                beat.join(timeout=5)
                shutil.rmtree(work, ignore_errors=True)

    # ---- the job ---------------------------------------------------------------------------------
    def _run(self, state: _Attempt, work: Path) -> str:
        with session_scope(self.sessions) as s:
            job = queries.load_job(s, state.job_id)
            assert job is not None
            spec: dict[str, Any] = dict(job.spec)
            ckpt_step = job.checkpoint_step
            state.tenant_id = job.tenant_id
            state.kind = job.kind
        shutil.rmtree(work, ignore_errors=True)
        work.mkdir(parents=True)
        if state.kind == JobKind.PREDICT:
            launch, processes = self._prepare_predict(state, spec, work, ckpt_step), 1
        else:
            launch, processes = self._prepare(state, spec, work, ckpt_step)
        result = self._train(state, work / "run", launch, processes, ckpt_step or 0)
        return self._finish(state, spec, result)

    def _prepare(
        self, state: _Attempt, spec: dict[str, Any], work: Path, ckpt_step: int | None
    ) -> tuple[LaunchSpec, int]:
        """Fetch dataset/eval set/base model, build the config, fetch the last checkpoint if any."""
        from must_core.ml.config import make_config

        policy = self.settings.datasets

        def s3_client() -> Any:
            return make_s3_client_from_settings(self.settings)

        processes = job_processes(spec)
        w = self.settings.worker
        if processes > w.max_processes:  # before any download
            raise InvalidConfigError(
                f"the job asks for {processes} training processes; this worker runs at most "
                f"{w.max_processes}",
            )
        self._write(state, progress={"step": ckpt_step or 0, "fraction": 0.0, "phase": "fetch"})
        stop = state.cancel.is_set
        images = fetch_dataset(spec["dataset_uri"], work / "dataset", policy, s3_client, stop)
        eval_dir = None
        if spec.get("eval_dataset_uri"):
            eval_dir = fetch_dataset(
                spec["eval_dataset_uri"], work / "eval", policy, s3_client, stop
            )
        prepared_cache = self._fetch_prepared(state, images, work / "prepared")
        _stop_if(stop)
        base = resolve_base_model(spec.get("base_model") or {}, work / "base", self.settings)
        _stop_if(stop)
        params = dict(spec.get("params") or {})
        preset = params.pop("preset", None)
        predict_dataset = bool(params.pop("predict_dataset", False))
        cfg = make_config(
            preset,
            **params,
            device=w.device,
            num_threads=max(1, self.settings.worker_threads // processes),
            num_workers=w.num_workers,
            checkpoint_every_steps=w.checkpoint_every_steps,
            progress_every_steps=w.progress_every_steps,
            prepare_workers=max(1, self.settings.worker_threads),
        )
        out = work / "output"
        out.mkdir()
        if self.store.exists(checkpoint_key(state.job_id)):
            self.store.get_file(checkpoint_key(state.job_id), out / CHECKPOINT_NAME)
            _logger.info("resuming from the stored checkpoint (step %s)", ckpt_step)
            self._write(state, resumed_from_step=ckpt_step)
        launch = LaunchSpec(
            config=cfg.model_dump(mode="json"),
            images_dir=str(images),
            class_names=list(spec["class_names"]),
            output_dir=str(out),
            base_model=base.model_dump(),
            templates=spec.get("templates"),
            eval_dir=str(eval_dir) if eval_dir else None,
            prepared_cache=str(prepared_cache) if prepared_cache else None,
            export_onnx=w.export_onnx,
            predict=self._predict_options(spec) if predict_dataset else None,
        )
        return launch, processes

    def _predict_options(
        self, spec: dict[str, Any], resume_rows: Path | None = None
    ) -> dict[str, Any]:
        w = self.settings.worker
        return {
            "top_k": int(spec.get("top_k") or 5),
            "batch_size": int(spec.get("batch_size") or w.predict_batch_size),
            "num_workers": w.num_workers or 0,
            "device": w.device,
            "num_threads": max(1, self.settings.worker_threads),
            "checkpoint_every": w.predict_checkpoint_every,
            "resume_rows": str(resume_rows) if resume_rows else None,
        }

    def _prepare_predict(
        self, state: _Attempt, spec: dict[str, Any], work: Path, ckpt_step: int | None
    ) -> LaunchSpec:
        """Fetch the dataset and the model; a stored checkpoint is the rows written so far."""
        self._write(state, progress={"step": ckpt_step or 0, "fraction": 0.0, "phase": "fetch"})
        stop = state.cancel.is_set
        images = fetch_dataset(
            spec["dataset_uri"],
            work / "dataset",
            self.settings.datasets,
            lambda: make_s3_client_from_settings(self.settings),
            stop,
        )
        _stop_if(stop)
        model_path = work / "model.safetensors"
        self.store.get_file(spec["artifact_key"], model_path)
        out = work / "output"
        out.mkdir()
        resume_rows = None
        if self.store.exists(checkpoint_key(state.job_id)):
            resume_rows = out / "resume-rows.jsonl"
            self.store.get_file(checkpoint_key(state.job_id), resume_rows)
            _logger.info("resuming predictions after %s files", ckpt_step)
            self._write(state, resumed_from_step=ckpt_step)
        return LaunchSpec(
            config={},
            images_dir=str(images),
            class_names=list(spec["class_names"]),
            output_dir=str(out),
            base_model={},
            task="predict",
            model_path=str(model_path),
            predict=self._predict_options(spec, resume_rows),
        )

    def _fetch_prepared(self, state: _Attempt, images: Path, cache: Path) -> Path | None:
        """Download the cached prepared form of this dataset, if any (keyed by its files' identity)."""
        if not self.settings.worker.prepare_dataset:
            return None
        from must_core.ml.prepared import dataset_key  # numpy + PIL only

        t0 = time.monotonic()
        state.prepared_key = dataset_key(images)
        prefix = prepared_prefix(str(state.tenant_id), state.prepared_key)
        keys = self.store.list_keys(prefix)
        for key in keys:
            self.store.get_file(key, cache / key[len(prefix) :])
        cache.mkdir(parents=True, exist_ok=True)
        state.uploaded_prepared = {p.parent.name for p in cache.glob("*/meta.json")}
        _logger.info(
            "dataset content key %s: %d cached files (%.1fs)",
            state.prepared_key,
            len(keys),
            time.monotonic() - t0,
        )
        return cache

    def _cache_prepared(self, state: _Attempt, cache: Path) -> None:
        """Upload a prepared form the trainer has just completed (meta.json last: it marks it done)."""
        from must_core.ml.prepared import META_FILE, cache_files

        for meta in cache.glob(f"*/{META_FILE}"):
            folder = meta.parent
            if folder.name in state.uploaded_prepared or state.prepared_key is None:
                continue
            state.uploaded_prepared.add(folder.name)
            prefix = prepared_prefix(str(state.tenant_id), state.prepared_key) + folder.name + "/"
            for path in cache_files(folder):
                self.store.put_file(path, prefix + path.name)
            _logger.info("cached the prepared dataset under %s", prefix)

    def _train(
        self, state: _Attempt, run_dir: Path, launch: LaunchSpec, processes: int, start_step: int
    ) -> dict[str, Any]:
        """Run the trainer as a child process group and relay its events until it exits."""
        w = self.settings.worker
        threads = max(1, self.settings.worker_threads // processes)
        proc = TrainingProcess(run_dir, launch, processes, threads)
        uploader = CheckpointUploader(
            upload=lambda path: self._upload_checkpoint(state, path),
            on_uploaded=lambda step: self._write(state, checkpoint_step=step),
        )
        stop_deadline: float | None = None
        try:
            self._write(state, progress={"step": start_step, "fraction": 0.0, "phase": "train"})
            proc.start()
            while proc.poll() is None:
                self._relay(state, proc.events(), uploader)
                self._maybe_cache_prepared(state, launch)
                if stop_deadline is None and (state.cancel.is_set() or state.lost.is_set()):
                    proc.request_stop()
                    # before the first step there is nothing to save: a cancel takes effect now
                    grace = w.stop_grace_s if state.seen_progress else 0.0
                    stop_deadline = time.monotonic() + grace
                if stop_deadline is not None and time.monotonic() > stop_deadline:
                    _logger.warning(
                        "trainer did not stop within %.0fs of the request", w.stop_grace_s
                    )
                    proc.kill()
                    break
                time.sleep(0.1)
            self._relay(state, proc.events(), uploader)
        finally:
            proc.kill()  # an exception here (time limit, DB) must not leave a trainer behind
            proc.join_output()
            uploader.close(drain=not state.lost.is_set())
            if state.prepared_upload is not None:
                state.prepared_upload.join()
        if stop_deadline is not None and proc.poll() != 0:
            return {"status": "stopped", "killed": True}
        return proc.outcome()

    def _maybe_cache_prepared(self, state: _Attempt, launch: LaunchSpec) -> None:
        """Start (once) the upload of a newly prepared dataset, off the relay loop."""
        cache = Path(launch.prepared_cache) if launch.prepared_cache else None
        if cache is None or state.prepared_upload is not None:
            return
        if any(p.parent.name not in state.uploaded_prepared for p in cache.glob("*/meta.json")):
            state.prepared_upload = threading.Thread(
                target=self._safe_cache_prepared, args=(state, cache), daemon=True
            )
            state.prepared_upload.start()

    def _safe_cache_prepared(self, state: _Attempt, cache: Path) -> None:
        try:
            self._cache_prepared(state, cache)
        except Exception as exc:  # a cache upload failing must not fail the job
            _logger.warning("could not cache the prepared dataset: %s", exc)

    def _relay(
        self, state: _Attempt, events: list[dict[str, Any]], uploader: CheckpointUploader
    ) -> None:
        kept = [e for e in events if e["type"] in HISTORY_KINDS and "step" in e]
        if kept:  # the whole curve, for GET /v1/jobs/{id}/history
            with session_scope(self.sessions) as s:
                if not history.record_events(s, state.job_id, state.attempt, kept):
                    state.lost.set()
        for event in events:
            if event["type"] == "checkpoint":
                uploader.submit(Path(event["path"]), int(event["step"]))
            elif event["type"] == "progress":
                self._on_progress(state, event)
            elif event["type"] == "health":  # shown with the next progress write
                state.health = {k: v for k, v in event.items() if k != "type"}

    def _on_progress(self, state: _Attempt, event: dict[str, Any]) -> None:
        state.seen_progress = True
        now = time.monotonic()
        final = event["step"] >= event["total_steps"]
        if (
            not final
            and now - state.last_progress_write < self.settings.worker.progress_write_interval_s
        ):
            return
        state.last_progress_write = now
        if "losses" in event:
            metrics = _train_metrics(event)
            if state.health is not None:
                metrics["health"] = state.health
            self._write(state, progress=_progress(event), metrics=metrics)
        else:  # a predictions job: progress counts files
            self._write(state, progress=_progress(event))

    def _upload_checkpoint(self, state: _Attempt, path: Path) -> None:
        if state.lost.is_set():  # another attempt owns the job: never overwrite its checkpoint
            return
        self.store.put_file(path, checkpoint_key(state.job_id))

    def _finish(
        self,
        state: _Attempt,
        spec: dict[str, Any],
        result: dict[str, Any],
    ) -> str:
        """Record a stopped run (cancelled/lost) or upload the model and complete the job."""
        if result["status"] == "stopped":
            return self._stopped(state, result)
        if state.kind == JobKind.PREDICT:
            return self._finish_predict(state, result["predictions"])
        stats = _dataset_stats(result)
        progress = _final_progress(result)
        metrics = _json_safe(result["metrics"])
        if state.prepared_key is not None and isinstance(metrics.get("dataset_cache"), dict):
            metrics["dataset_cache"]["key"] = state.prepared_key
        model_path = Path(result["model_path"])
        self._put_patiently(model_path, model_key(state.job_id))
        ema_key = None
        if result.get("ema_model_path"):
            ema_key = model_key(state.job_id, ema=True)
            self._put_patiently(Path(result["ema_model_path"]), ema_key)
        metrics_file = Path(result["output_dir"]) / "metrics.json"
        if metrics_file.exists():
            self._put_patiently(metrics_file, metrics_key(state.job_id))
        gallery = _read_gallery(Path(result["output_dir"]) / GALLERY_FILE)
        onnx = self._put_onnx(state, result)
        if result.get("predictions"):
            metrics["predictions"] = self._put_predictions(state, result["predictions"])
        with session_scope(self.sessions) as s:
            job = queries.load_job(s, state.job_id)
            assert job is not None
            model = AdaptedModel(
                tenant_id=job.tenant_id,
                job_id=job.id,
                class_names=list(spec["class_names"]),
                base_model=dict(spec.get("base_model") or {}),
                metrics=metrics,
                artifact_key=model_key(state.job_id),
                ema_artifact_key=ema_key,
                size_bytes=model_path.stat().st_size,
                sha256=file_sha256(model_path),
                **onnx,
            )
            queries.name_model(s, model, spec.get("name"), spec.get("tags") or [])
            values = {
                "progress": progress,
                "metrics": metrics,
                "dataset_stats": stats,
                # the step of the checkpoint actually loaded (it may be newer than the row said,
                # when the worker died between an upload and its row update)
                "resumed_from_step": result.get("resumed_from_step"),
            }
            done = queries.complete_job(s, job, state.attempt, model=model, values=values)
            if done:
                s.add_all(history.sample_rows(model.id, gallery))
            else:
                s.rollback()
                _logger.warning("claim lost before completion; not recording the model")
                return "lost"
        _logger.info("job succeeded: %d steps, model %s", result["step"], model.id)
        return "succeeded"

    def _put_onnx(self, state: _Attempt, result: dict[str, Any]) -> dict[str, Any]:
        """Upload the ONNX export when the trainer produced one; the model row's onnx fields."""
        if not result.get("onnx_path"):
            if result.get("onnx_error"):
                _logger.warning("no ONNX export: %s", result["onnx_error"])
            return {}
        path = Path(result["onnx_path"])
        self._put_patiently(path, onnx_key(state.job_id))
        return {
            "onnx_key": onnx_key(state.job_id),
            "onnx_sha256": file_sha256(path),
            "onnx_size_bytes": path.stat().st_size,
        }

    def _put_predictions(self, state: _Attempt, run: dict[str, Any]) -> dict[str, Any]:
        """Upload the JSONL and CSV predictions; the summary stored in the job's metrics."""
        if run["status"] != "completed":
            return {"status": run["status"], "num_predicted": run["num_predicted"]}
        keys = {}
        for fmt, path in (("jsonl", run["jsonl_path"]), ("csv", run["csv_path"])):
            keys[fmt] = predictions_key(state.job_id, fmt)
            self._put_patiently(Path(path), keys[fmt])
        return {
            "status": "completed",
            "num_images": run["total"],
            "num_predicted": run["num_predicted"],
            "num_skipped": len(run["skipped"]),
            "skipped_examples": [{"path": p, "reason": r} for p, r in run["skipped"][:20]],
            "images_per_second": run["images_per_second"],
            "resumed_from": run["resumed_from"],
            "keys": keys,
        }

    def _finish_predict(self, state: _Attempt, run: dict[str, Any]) -> str:
        summary = self._put_predictions(state, run)
        progress = {
            "step": run["done"],
            "total_steps": run["total"],
            "fraction": 1.0,
            "eta_seconds": 0.0,
            "images_per_second": run["images_per_second"],
            "phase": "done",
        }
        stats = {
            "num_images": run["total"],
            "num_skipped": len(run["skipped"]),
            "skipped_examples": summary["skipped_examples"],
        }
        with session_scope(self.sessions) as s:
            done = queries.finish_job(
                s,
                state.job_id,
                state.attempt,
                JobStatus.SUCCEEDED,
                progress=progress,
                metrics={"predictions": summary},
                dataset_stats=stats,
            )
        if not done:
            _logger.warning("claim lost before completion; predictions not recorded")
            return "lost"
        _logger.info("predictions done: %d rows", run["num_predicted"])
        return "succeeded"

    def _stopped(self, state: _Attempt, result: dict[str, Any]) -> str:
        if state.lost.is_set() and not state.cancel.is_set():
            _logger.warning("lost the claim on this job; another attempt owns it now")
            return "lost"
        if not state.cancel.is_set():
            raise MustError(
                f"training stopped early at step {result.get('step')}/{result.get('total_steps')}",
                code="training_incomplete",
            )
        extra: dict[str, Any] = {}
        if not result.get("killed") and state.kind != JobKind.PREDICT:
            extra = {
                "progress": _final_progress(result),
                "metrics": _json_safe(result["metrics"]),
                "dataset_stats": _dataset_stats(result),
            }
        with session_scope(self.sessions) as s:
            queries.finish_job(s, state.job_id, state.attempt, JobStatus.CANCELLED, **extra)
        _logger.info("job cancelled at step %s", result.get("step"))
        return "cancelled"

    # ---- helpers ---------------------------------------------------------------------------------
    def _put_patiently(self, path: Path, key: str) -> None:
        """Upload a finished result, waiting out a storage outage of up to ``storage_outage_s``:
        the trained model is worth more than a quick failure (the checkpoint would mean a rerun)."""
        deadline = time.monotonic() + self.settings.worker.storage_outage_s
        delay = 1.0
        while True:
            try:
                self.store.put_file(path, key)
                return
            except TransientStorageError as exc:
                if time.monotonic() + delay > deadline:
                    raise
                _logger.warning("storage unavailable (%s); retrying in %.0fs", exc, delay)
                time.sleep(delay)
                delay = min(delay * 2, 15.0)

    def _write(self, state: _Attempt, **values: Any) -> None:
        with session_scope(self.sessions) as s:
            if not queries.update_running(s, state.job_id, state.attempt, **values):
                state.lost.set()

    def _fail(self, state: _Attempt, code: str, message: str) -> None:
        self._safe(
            lambda s: queries.finish_job(
                s,
                state.job_id,
                state.attempt,
                JobStatus.FAILED,
                error_code=code,
                error_message=message,
            )
        )

    def _safe(self, fn: Any) -> None:
        try:
            with session_scope(self.sessions) as s:
                fn(s)
        except Exception:
            _logger.exception("could not update the job row (the sweeper will handle it)")

    def _heartbeat_loop(self, state: _Attempt) -> None:
        """Touch heartbeat_at and poll the cancel flag until the attempt ends."""
        interval = self.settings.worker.heartbeat_interval_s
        flush = self.settings.worker.job_log_flush_s
        next_beat = time.monotonic() + interval
        while not state.done.wait(min(interval, flush)):
            if state.log is not None:
                state.log.flush()
            if time.monotonic() < next_beat:
                continue
            next_beat = time.monotonic() + interval
            try:
                with session_scope(self.sessions) as s:
                    owned, cancel = queries.heartbeat(s, state.job_id, state.attempt)
                if cancel:
                    state.cancel.set()
                if not owned:
                    state.lost.set()
            except Exception as exc:  # a DB blip must not kill the heartbeat thread
                _logger.warning("heartbeat failed: %s", exc)


def _read_gallery(path: Path) -> dict[str, list[dict[str, Any]]]:
    """The trainer's sample gallery (class name → best-first images); empty when it made none."""
    if not path.exists():
        return {}
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        _logger.warning("sample gallery unreadable, the model gets none: %s", exc)
        return {}
    return data if isinstance(data, dict) else {}


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        while chunk := f.read(1 << 20):
            digest.update(chunk)
    return digest.hexdigest()


def _stop_if(should_stop: Callable[[], bool]) -> None:
    if should_stop():
        raise FetchCancelled("cancelled before training")


def _progress(event: dict[str, Any]) -> dict[str, Any]:
    keys = ("step", "total_steps", "epoch", "fraction", "eta_seconds", "images_per_second")
    return {
        **{k: event.get(k) for k in keys},
        "phase": event.get("phase", "train"),
        "lr": event.get("lr"),
        "ema_decay": event.get("ema_decay"),
    }


def _train_metrics(event: dict[str, Any]) -> dict[str, Any]:
    return {"train": {**event["losses"], "conf_ratio": event["conf_ratio"]}}


def _final_progress(result: dict[str, Any]) -> dict[str, Any]:
    history = result.get("history") or []
    done = result["status"] == "completed"
    return {
        "step": result["step"],
        "total_steps": result["total_steps"],
        "fraction": result["step"] / result["total_steps"] if result["total_steps"] else 0.0,
        "epoch": history[-1]["epoch"] if history else None,
        "eta_seconds": 0.0 if done else None,
        "images_per_second": history[-1]["images_per_second"] if history else None,
        "phase": "done" if done else "stopped",
    }


def _dataset_stats(result: dict[str, Any]) -> dict[str, Any]:
    return {
        "num_images": result["num_images"],
        "num_skipped": result["num_skipped"],
        "skipped_examples": [{"path": p, "reason": r} for p, r in result["skipped"][:20]],
    }


def _json_safe(value: Any) -> Any:
    """Metrics dicts from the engine as plain JSON (floats, lists, dicts)."""
    if isinstance(value, dict):
        return {str(k): _json_safe(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_json_safe(v) for v in value]
    if isinstance(value, float) and value != value:  # NaN is not JSON
        return None
    if isinstance(value, str | int | float | bool) or value is None:
        return value
    return str(value)
