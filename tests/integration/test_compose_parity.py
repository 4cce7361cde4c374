"""Compose parity: run the exact commands of the compose services (migrate, api, worker-gpu0) with
the compose environment — only the addresses of PostgreSQL, Redis and S3 are pointed at the local
servers, as a user would in .env — and complete a job through them with the ``must`` client CLI.
Also checks /metrics and the JSON logs with request and job ids.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml

from tests.integration.conftest import PG_HOST, PG_PORT, PG_USER
from tests.integration.helpers import (
    REPO,
    TINY_CONFIG,
    Proc,
    free_port,
    make_images,
    wait_for,
)

pytestmark = pytest.mark.integration
_VAR = re.compile(r"\$\{([A-Z0-9_]+)(?::?-([^}]*))?\}")


def _interpolate(value: str, variables: dict[str, str]) -> str:
    """Compose's ``${VAR:-default}`` interpolation (what `docker compose` does with .env)."""
    return _VAR.sub(lambda m: variables.get(m.group(1)) or (m.group(2) or ""), value)


def _service(
    compose: dict[str, Any], name: str, variables: dict[str, str]
) -> tuple[list[str], dict[str, str]]:
    svc = compose["services"][name]
    cmd = [_interpolate(str(c), variables) for c in svc["command"]]
    env = {k: _interpolate(str(v), variables) for k, v in (svc.get("environment") or {}).items()}
    return cmd, env


def _exe(cmd: list[str]) -> list[str]:
    """Resolve the image's console scripts (alembic, uvicorn, celery) in this virtualenv."""
    local = Path(sys.executable).parent / cmd[0]
    return [str(local) if local.exists() else cmd[0], *cmd[1:]]


@pytest.fixture
def parity_db() -> Iterator[str]:
    import psycopg

    name = f"must_test_parity_{uuid.uuid4().hex[:8]}"
    admin = f"host={PG_HOST} port={PG_PORT} user={PG_USER} dbname=postgres"
    with psycopg.connect(admin, autocommit=True) as conn:
        conn.execute(f'CREATE DATABASE "{name}"')
    yield f"postgresql+psycopg://{PG_USER}@{PG_HOST}:{PG_PORT}/{name}"
    with psycopg.connect(admin, autocommit=True) as conn:
        conn.execute(
            "SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE datname = %s", (name,)
        )
        conn.execute(f'DROP DATABASE IF EXISTS "{name}"')


def test_compose_commands_complete_a_job(
    parity_db: str, redis_url: str, s3: dict[str, Any], tmp_path: Path, log_dir: Path
) -> None:
    compose = yaml.safe_load((REPO / "docker-compose.yml").read_text())
    bucket = f"test-parity-{uuid.uuid4().hex[:6]}"
    s3["client"].create_bucket(Bucket=bucket)
    port = free_port()
    variables = {  # the .env a user would write to use these servers
        "MUST_DB_URL": parity_db,
        "MUST_BROKER_URL": redis_url,
        "MUST_S3_ENDPOINT_URL": s3["endpoint"],
        "MUST_S3_ACCESS_KEY": s3["key"],
        "MUST_S3_SECRET_KEY": s3["secret"],
        "MUST_S3_BUCKET": bucket,
        "MUST_WORKER_QUEUE": f"test-parity-{uuid.uuid4().hex[:6]}",
        "MUST_WORKER_DEVICE": "cpu",
        "MUST_API_THREADS": "1",
    }
    # What the images provide besides the compose environment (Dockerfile ENV, working dir).
    base_env = {k: v for k, v in os.environ.items() if not k.startswith("MUST_")}
    base_env.update(
        {"PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1", "MUST_DATA_DIR": str(tmp_path / "data")}
    )

    cmd, env = _service(compose, "migrate", variables)
    r = subprocess.run(
        _exe(cmd),
        cwd=REPO,
        env={**base_env, **env},
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert r.returncode == 0, r.stderr

    cmd, env = _service(compose, "api", variables)
    api_env = {**base_env, **env}
    assert cmd[cmd.index("--port") + 1] == "8000"
    cmd[cmd.index("--port") + 1] = str(port)  # the only change: a free port instead of 8000
    api = Proc("parity-api", _exe(cmd), api_env, log_dir)
    cmd, env = _service(compose, "worker-gpu0", variables)  # the GPU worker, on the CPU here
    worker_env = {
        **base_env,
        **env,
        "MUST_WORKER__NUM_THREADS": "1",
        "MUST_WORKER__CHECKPOINT_EVERY_STEPS": "2",
    }
    worker = Proc("parity-worker", _exe(cmd), worker_env, log_dir)
    url = f"http://127.0.0.1:{port}"
    try:

        def api_up() -> bool:
            assert api.alive(), api.log()[-3000:]
            try:
                return httpx.get(f"{url}/readyz", timeout=3).status_code == 200
            except httpx.HTTPError:
                return False

        wait_for(api_up, 90, what="compose api ready")
        wait_for(lambda: "ready." in worker.log() or not worker.alive(), 90, what="worker ready")
        assert worker.alive(), worker.log()[-3000:]

        key = subprocess.run(
            [sys.executable, "-m", "must_core.cli", "keys", "create", "--tenant", "parity"],
            cwd=REPO,
            env=api_env,
            capture_output=True,
            text=True,
            timeout=120,
            check=True,
        ).stdout.strip()
        client_env = {**base_env, "MUST_URL": url, "MUST_API_KEY": key}

        def must(*args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
            res = subprocess.run(
                [sys.executable, "-m", "must_core.cli", *args],
                cwd=REPO,
                env=client_env,
                capture_output=True,
                text=True,
                timeout=600,
                check=False,
            )
            if check:
                assert res.returncode == 0, res.stdout + res.stderr
            return res

        for rel, data in make_images(4, ["red", "green", "blue"]).items():
            s3["client"].put_object(Bucket=s3["datasets_bucket"], Key=f"parity/{rel}", Body=data)
        s3["client"].put_object(
            Bucket=s3["datasets_bucket"],
            Key="parity-assets/tiny.json",
            Body=TINY_CONFIG.read_bytes(),
        )
        metrics_before = httpx.get(f"{url}/metrics").text

        sub = must(
            "jobs",
            "submit",
            f"s3://{s3['datasets_bucket']}/parity/",
            "--class-names",
            "red,green,blue",
            "--model",
            "must-tiny",
            "--config-uri",
            f"s3://{s3['datasets_bucket']}/parity-assets/tiny.json",
            "--allow-random-init",
            "--epochs",
            "2",
            "--batch-size",
            "4",
            "--json",
        )
        job = json.loads(sub.stdout)
        assert job["status"] in ("queued", "running")
        waited = must("jobs", "wait", str(job["id"]), "--timeout", "300", "--interval", "0.5")
        assert "succeeded" in waited.stdout, waited.stdout + waited.stderr
        status = json.loads(must("jobs", "status", str(job["id"]), "--json").stdout)
        assert status["status"] == "succeeded" and status["model_id"]
        listed = must("jobs", "list", "--status", "succeeded").stdout
        assert str(job["id"]) in listed
        models = json.loads(must("models", "list", "--json").stdout)
        assert [m["id"] for m in models["items"]] == [status["model_id"]]
        shown = must("models", "show", status["model_id"]).stdout
        assert "red, green, blue" in shown
        img = tmp_path / "probe.png"
        img.write_bytes(next(iter(make_images(1, ["green"]).values())))
        cls = json.loads(
            must("classify", status["model_id"], str(img), "--top-k", "2", "--json").stdout
        )
        assert len(cls["results"]) == 1 and len(cls["results"][0]["top_k"]) == 2
        refused = must("jobs", "cancel", str(job["id"]), check=False)
        assert refused.returncode == 2 and "job_not_cancellable" in refused.stderr
        keys = [o["Key"] for o in s3["client"].list_objects_v2(Bucket=bucket)["Contents"]]
        assert f"jobs/{job['id']}/model/model.safetensors" in keys
        assert f"jobs/{job['id']}/checkpoints/last.pt" in keys

        metrics = httpx.get(f"{url}/metrics").text
        assert metrics != metrics_before
        assert re.search(r'^must_jobs\{status="succeeded"\} 1\.0$', metrics, re.M)
        assert re.search(
            r'^must_http_requests_total\{method="POST",route="/v1/jobs",'
            r'status="202"\} 1\.0$',
            metrics,
            re.M,
        )
        assert re.search(
            r'^must_http_requests_total\{method="POST",route="/v1/models/\{model_id\}/'
            r'classify",status="200"\} 1\.0$',
            metrics,
            re.M,
        )
        assert re.search(
            r'^must_http_request_duration_seconds_count\{method="GET",'
            r'route="/v1/jobs/\{job_id\}"\} [1-9]',
            metrics,
            re.M,
        )
        assert re.search(r"^must_model_cache_loads_total 1\.0$", metrics, re.M)
        assert re.search(r"^must_classify_batch_size_count [1-9]", metrics, re.M)
        assert re.search(r'^must_queue_depth\{queue="test-parity-\w+"\} 0\.0$', metrics, re.M)

        must("models", "delete", status["model_id"])
        gone = must("models", "show", status["model_id"], check=False)
        assert gone.returncode == 2 and "not_found" in gone.stderr
        unreachable = subprocess.run(
            [
                sys.executable,
                "-m",
                "must_core.cli",
                "jobs",
                "list",
                "--url",
                f"http://127.0.0.1:{free_port()}",
            ],
            cwd=REPO,
            env=client_env,
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
        )
        assert unreachable.returncode == 3 and "server_unreachable" in unreachable.stderr
    finally:
        worker.stop()
        api.stop()

    # Structured JSON logs (MUST_LOG_JSON=true in the compose environment) with ids bound.
    api_lines = [json.loads(x) for x in api.log().splitlines() if x.startswith("{")]
    assert any("request_id" in x for x in api_lines), api.log()[-2000:]
    worker_lines = [json.loads(x) for x in worker.log().splitlines() if x.startswith("{")]
    assert any(x.get("job_id") == str(job["id"]) for x in worker_lines), worker.log()[-2000:]
