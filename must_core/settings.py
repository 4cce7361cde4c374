"""Service settings: one pydantic-settings object read from ``MUST_*`` environment variables.

Nested groups use ``__`` (``MUST_STORAGE__BUCKET``). Defaults describe the embedded single-machine mode
(SQLite, local-disk store and a filesystem broker under ``MUST_DATA_DIR``); production sets
``MUST_DB__URL``, ``MUST_BROKER__URL`` and ``MUST_STORAGE__BACKEND=s3``. Only the URLs differ: the code paths
are the same. ``must_core.ml`` never reads settings.
"""

from __future__ import annotations

import os
import shutil
import subprocess
from functools import lru_cache
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, Field, SecretStr, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

LOOPBACK_HOSTS = frozenset({"127.0.0.1", "localhost", "::1"})


class DbSettings(BaseModel):
    # SQLAlchemy URL; None: sqlite:///<data_dir>/must.db. Postgres: postgresql+psycopg://user@host/db
    url: str | None = None
    pool_size: int = Field(5, ge=1, le=100)  # connections per process (ignored for SQLite)
    echo: bool = False  # log every SQL statement


class BrokerSettings(BaseModel):
    # Celery broker URL; None: kombu filesystem transport under <data_dir>/broker. e.g. redis://host:6379/0
    url: str | None = None
    # Redis: seconds before an unacknowledged job message is redelivered. Longer than the longest job.
    visibility_timeout_s: int = Field(48 * 3600, ge=60)
    polling_interval_s: float = Field(0.1, gt=0, le=10)  # filesystem/SQL transports only
    # Redis socket connect/read timeout of the API's sender and readiness probe: a stalled broker
    # makes a submission or /readyz wait at most about this long (the outbox relay sends later).
    client_timeout_s: float = Field(3.0, gt=0, le=120)


class StorageSettings(BaseModel):
    backend: Literal["local", "s3"] = "local"
    root: Path | None = None  # local backend; None: <data_dir>/artifacts
    bucket: str = "must"  # s3 backend
    prefix: str = ""  # key prefix inside the bucket (e.g. "prod/")
    endpoint_url: str | None = None  # MinIO / S3-compatible servers; None: AWS
    region: str = "us-east-1"
    access_key_id: SecretStr | None = None  # None: boto3's default credential chain
    secret_access_key: SecretStr | None = None
    addressing_style: Literal["path", "virtual", "auto"] = "path"
    connect_timeout_s: float = Field(5.0, gt=0)
    read_timeout_s: float = Field(60.0, gt=0)
    max_attempts: int = Field(4, ge=1, le=20)  # botocore "standard" retry mode attempts


class DatasetSettings(BaseModel):
    # file:// dataset URIs must resolve inside one of these folders (empty: file:// refused).
    allowed_roots: list[Path] = Field(default_factory=list)
    # s3:// dataset URIs may only name these buckets (empty: any bucket the credentials reach).
    allowed_buckets: list[str] = Field(default_factory=list)
    allow_http: bool = True  # accept http(s):// archive URIs at all
    # Allow http(s) hosts that resolve to private/loopback/link-local addresses (SSRF guard off).
    allow_private_hosts: bool = False
    max_download_bytes: int = Field(2 * 1024**3, ge=1)  # archive / s3 prefix download cap
    max_extracted_bytes: int = Field(8 * 1024**3, ge=1)  # total uncompressed size cap
    max_files: int = Field(1_000_000, ge=1)  # archive members / s3 objects cap
    max_compression_ratio: float = Field(200.0, ge=1)  # per archive; above: refused as a bomb
    http_timeout_s: float = Field(30.0, gt=0)


class WebhookSettings(BaseModel):
    # Deliver to hosts that resolve to private/loopback/link-local addresses (SSRF guard off; tests
    # and private networks only). Checked at submission and again on every connection.
    allow_private_hosts: bool = False
    timeout_s: float = Field(10.0, gt=0)  # per delivery attempt (connect + response)
    max_attempts: int = Field(8, ge=1, le=50)  # then the delivery is marked failed
    backoff_base_s: float = Field(5.0, gt=0)  # retry n waits base * 2**(n-1), capped, jittered
    backoff_max_s: float = Field(3600.0, gt=0)
    # An attempt whose sender died is retried after this lease (at-least-once delivery).
    lease_s: float = Field(60.0, gt=0)
    # Jobs finished within this window are checked for undelivered terminal events.
    emit_window_s: float = Field(86_400.0, gt=0)


class WorkerSettings(BaseModel):
    queue: str = "gpu"  # Celery queue for training jobs (one worker process per GPU consumes it)
    # torch CPU threads for training; None: all cores minus the API's share.
    num_threads: int | None = Field(None, ge=1, le=512)
    num_workers: int | None = Field(
        None, ge=0, le=64
    )  # data-loader processes; None: engine default
    device: str = "auto"  # "auto" | "cpu" | "cuda" | "cuda:N"
    # GPUs this worker may give one job (one DDP rank each); None: count them with nvidia-smi.
    num_gpus: int | None = Field(None, ge=0, le=64)
    # Training processes one job may use here; None: num_gpus on a GPU machine, else 1. A worker
    # consumes the queue of every count up to this (see must_core.jobs.dispatch).
    max_processes_per_job: int | None = Field(None, ge=1, le=64)
    # Decode each dataset once into a prepared form cached in the store (keyed by content); off:
    # decode the raw files every epoch.
    prepare_dataset: bool = True
    # A finished job's model upload waits out a storage outage this long before failing the attempt.
    storage_outage_s: float = Field(600.0, ge=0)
    # After a stop request (cancel, lost claim) the trainer checkpoints and exits; killed after this.
    stop_grace_s: float = Field(60.0, gt=0)
    work_dir: Path | None = (
        None  # scratch space for datasets and checkpoints; None: <data_dir>/work
    )
    checkpoint_every_steps: int = Field(200, ge=1)  # upload last.pt to storage this often
    # Also export each adapted model as ONNX at the end of its job (GET .../download?format=onnx).
    export_onnx: bool = True
    # Predictions jobs: images per forward pass, and files between two resumable checkpoints.
    predict_batch_size: int = Field(64, ge=1, le=4096)
    predict_checkpoint_every: int = Field(1000, ge=1)
    progress_every_steps: int = Field(10, ge=1)  # engine progress-event interval
    progress_write_interval_s: float = Field(2.0, ge=0)  # at most one progress write per interval
    heartbeat_interval_s: float = Field(10.0, gt=0)  # heartbeat + cancel-flag poll period
    # A job's log lines (GET /v1/jobs/{id}/logs) are written to the database this often, and at
    # most this many per attempt (the rest are counted and dropped).
    job_log_flush_s: float = Field(2.0, gt=0)
    job_log_max_lines: int = Field(20_000, ge=0)
    stale_after_s: float = Field(120.0, gt=0)  # running job without heartbeat this long: re-queued
    sweep_interval_s: float = Field(30.0, gt=0)  # sweeper period (runs inside each worker)
    # Outbox relay period: committed jobs whose message was never sent (broker down at submission)
    # are sent by the sweeper thread this often, once older than relay_grace_s (the API's own send).
    relay_interval_s: float = Field(2.0, gt=0)
    relay_grace_s: float = Field(5.0, ge=0)
    # Redis brokers: a queued job whose message was sent this long ago and is in no queue and not
    # delivered (Redis restarted without persistence, flushed) is re-sent by the relay.
    lost_message_after_s: float = Field(15.0, gt=0)
    requeue_queued_after_s: float = Field(1800.0, gt=0)  # re-send a queued job's message after
    # Checkpoints of finished jobs are deleted this long after they finished (None: kept).
    checkpoint_retention_s: float | None = Field(None, gt=0)
    max_attempts: int = Field(3, ge=1, le=100)  # claims per job before a lost worker fails it
    max_retries: int = Field(3, ge=0, le=20)  # Celery retries for transient infrastructure errors
    retry_backoff_s: int = Field(10, ge=1)  # first retry delay (exponential, jittered)
    soft_time_limit_s: int | None = Field(None, ge=1)  # per job; None: unlimited
    time_limit_s: int | None = Field(None, ge=1)

    @property
    def gpus(self) -> int:
        return self.num_gpus if self.num_gpus is not None else _count_gpus()

    @property
    def max_processes(self) -> int:
        if self.max_processes_per_job is not None:
            return self.max_processes_per_job
        return max(1, self.gpus)


def _count_gpus() -> int:
    """GPUs visible to this process, without initialising CUDA (a forked child must not inherit it)."""
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    if visible is not None:
        return len([d for d in visible.split(",") if d.strip() and d.strip() != "-1"])
    exe = shutil.which("nvidia-smi")
    if exe is None:
        return 0
    try:
        out = subprocess.run([exe, "-L"], capture_output=True, text=True, timeout=10, check=False)
    except (OSError, subprocess.SubprocessError):
        return 0
    return sum(1 for line in out.stdout.splitlines() if line.startswith("GPU "))


class ApiSettings(BaseModel):
    host: str = "127.0.0.1"
    port: int = Field(8000, ge=1, le=65535)
    # "keys": every /v1 call needs "Authorization: Bearer <key>". "none": anonymous calls act as the
    # "default" tenant; only allowed when host is a loopback address.
    auth: Literal["keys", "none"] = "keys"
    num_threads: int = Field(1, ge=1, le=64)  # torch/BLAS threads in the API process
    max_page_size: int = Field(100, ge=1, le=1000)
    max_class_names: int = Field(10_000, ge=1)
    max_templates: int = Field(200, ge=1)
    readiness_timeout_s: float = Field(5.0, gt=0, le=60)  # /readyz: a check slower than this fails
    # Request read deadlines (api.server.TimedH11Protocol): headers within this of the first byte,
    # the whole body within body_timeout_s after them; else the connection is closed (slowloris).
    header_timeout_s: float = Field(10.0, gt=0)
    body_timeout_s: float = Field(120.0, gt=0)
    # Failed authentications allowed per client address and per presented key within the window;
    # more are refused with 429 + Retry-After before the database is asked.
    auth_failures_limit: int = Field(30, ge=1)
    auth_failures_window_s: float = Field(60.0, gt=0)
    # GET /metrics: "public" (unauthenticated), "token" (Authorization: Bearer <metrics_token>),
    # or "off" (404). Prometheus scrapes send the token with `authorization: {credentials: ...}`.
    metrics: Literal["public", "token", "off"] = "public"
    metrics_token: SecretStr | None = None
    # Largest params.num_processes accepted; jobs wait for a worker that consumes <queue>.xN.
    max_processes_per_job: int = Field(8, ge=1, le=64)


class ClassifySettings(BaseModel):
    max_images_per_request: int = Field(64, ge=1, le=4096)  # images in one /classify call
    max_image_bytes: int = Field(10 * 2**20, ge=1)  # per encoded image (413 above)
    max_request_bytes: int = Field(64 * 2**20, ge=1)  # whole request body (413 above)
    max_image_pixels: int = Field(40_000_000, ge=1)  # width*height; decompression-bomb guard (413)
    # Longest side per image (413): the eval resize scales the shortest side up to the model's input,
    # so a 300000x1 image would be upscaled to gigapixels whatever the pixel cap says.
    max_image_side: int = Field(12_000, ge=1)
    # Sum of width*height over the images of one request, checked from the headers before any decode
    # (413). Images are decoded one at a time, so peak memory is ~3 bytes x 3 copies x the largest
    # image, not the sum.
    max_request_pixels: int = Field(200_000_000, ge=1)
    cache_memory_mb: int = Field(2048, ge=1)  # loaded classifiers kept in an LRU up to this size
    batching: bool = True  # merge concurrent requests for one model into one forward pass
    max_batch: int = Field(32, ge=1, le=4096)  # images per merged forward pass
    max_wait_ms: float = Field(5.0, ge=0, le=10_000)  # how long a batch waits for more requests
    device: str = "cpu"  # inference device for the API process ("cpu", "cuda", "cuda:N")
    # Zero-shot /v1/classify may build base models from registry tags (downloads) and URIs.
    allow_zero_shot: bool = True


class Settings(BaseSettings):
    """All service settings. Build through :func:`get_settings`."""

    model_config = SettingsConfigDict(
        env_prefix="MUST_", env_nested_delimiter="__", extra="ignore", env_file=None
    )

    env: Literal["dev", "test", "prod"] = "dev"
    data_dir: Path = Path(
        "./must-data"
    )  # embedded mode: database, broker folders, artifacts, scratch
    log_level: str = "INFO"
    log_json: bool = False  # one JSON object per line (prod) instead of plain text
    db: DbSettings = Field(default_factory=DbSettings)
    broker: BrokerSettings = Field(default_factory=BrokerSettings)
    storage: StorageSettings = Field(default_factory=StorageSettings)
    datasets: DatasetSettings = Field(default_factory=DatasetSettings)
    worker: WorkerSettings = Field(default_factory=WorkerSettings)
    webhooks: WebhookSettings = Field(default_factory=WebhookSettings)
    api: ApiSettings = Field(default_factory=ApiSettings)
    classify: ClassifySettings = Field(default_factory=ClassifySettings)

    @model_validator(mode="after")
    def _check(self) -> Settings:
        if self.api.auth == "none" and self.api.host not in LOOPBACK_HOSTS:
            raise ValueError(
                "MUST_API__AUTH=none is only allowed when MUST_API__HOST is a loopback address"
            )
        if self.api.metrics == "token" and not self.api.metrics_token:
            raise ValueError("MUST_API__METRICS=token needs MUST_API__METRICS_TOKEN")
        if self.env == "prod" and self.storage.backend == "s3":
            for field in (self.storage.access_key_id, self.storage.secret_access_key):
                if field is not None and field.get_secret_value() in ("changeme", "changethis"):
                    raise ValueError("placeholder S3 credentials are refused in prod")
        return self

    # ---- derived values (embedded defaults) ---------------------------------------------------
    @property
    def database_url(self) -> str:
        if self.db.url:
            return self.db.url
        return f"sqlite:///{(self.data_dir / 'must.db').resolve()}"

    @property
    def broker_url(self) -> str:
        return self.broker.url or "filesystem://"

    @property
    def broker_folder(self) -> Path:
        return (self.data_dir / "broker").resolve()

    @property
    def storage_root(self) -> Path:
        return (self.storage.root or self.data_dir / "artifacts").resolve()

    @property
    def model_cache_dir(self) -> Path:
        """Local copies of adapted models and zero-shot base files for serving."""
        return (self.data_dir / "model-cache").resolve()

    @property
    def work_dir(self) -> Path:
        return (self.worker.work_dir or self.data_dir / "work").resolve()

    @property
    def worker_threads(self) -> int:
        if self.worker.num_threads is not None:
            return self.worker.num_threads
        return max(1, (os.cpu_count() or 1) - self.api.num_threads)


@lru_cache(maxsize=1)
def get_settings() -> Settings:
    """The process-wide settings (cached; tests call ``get_settings.cache_clear()``)."""
    return Settings()
