"""The FastAPI app in-process (TestClient) on SQLite + local store + filesystem broker."""

from __future__ import annotations

import socket
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient

from api.main import create_app
from must_core import auth
from must_core.cli.service import upgrade_database
from must_core.db.session import make_engine, make_sessionmaker, session_scope
from must_core.settings import Settings
from tests.bad_inputs import BAD_JOB_PATCHES, BAD_LIST_QUERIES, raw_json

# A base model without weights: allowed only when asked for (tests only).
RANDOM_OK = {"arch": "ViT-B-16", "allow_random_init": True}


def _settings(tmp_path: Path, **extra: Any) -> Settings:
    base: dict[str, Any] = {
        "data_dir": tmp_path,
        "datasets": {"allowed_roots": [str(tmp_path)]},
        "api": {"auth": "keys"},
    }
    base.update(extra)
    settings = Settings.model_validate(base)
    upgrade_database(settings.database_url)
    return settings


@pytest.fixture
def settings(tmp_path: Path) -> Settings:
    return _settings(tmp_path)


@pytest.fixture
def client(settings: Settings) -> Iterator[TestClient]:
    with TestClient(create_app(settings)) as c:
        yield c


def _key(settings: Settings, tenant: str) -> str:
    engine = make_engine(settings.database_url)
    with session_scope(make_sessionmaker(engine)) as s:
        _, key = auth.create_key(s, tenant)
    engine.dispose()
    return key


def test_keys_required_and_problem_json(client: TestClient, settings: Settings) -> None:
    r = client.get("/v1/models")
    assert r.status_code == 401 and r.json()["code"] == "unauthorized"
    assert r.headers["www-authenticate"] == "Bearer"
    assert client.get("/v1/models", headers={"Authorization": "Basic abc"}).status_code == 401
    ok = client.get("/v1/models", headers={"Authorization": f"Bearer {_key(settings, 't')}"})
    assert ok.status_code == 200 and ok.json()["items"] == []
    missing = client.get("/nope")
    assert missing.status_code == 404
    assert missing.headers["content-type"].startswith("application/problem+json")


def test_submit_queues_on_filesystem_broker(client: TestClient, settings: Settings) -> None:
    headers = {"Authorization": f"Bearer {_key(settings, 't')}"}
    data = settings.data_dir / "ds"
    data.mkdir()
    r = client.post(
        "/v1/jobs",
        headers=headers,
        json={
            "dataset_uri": f"file://{data}",
            "class_names": ["a", "b"],
            "base_model": RANDOM_OK,
            "params": {"preset": "dtd_vit_b16", "epochs": 1},
        },
    )
    assert r.status_code == 202, r.text
    queued = list((settings.broker_folder / "queue").iterdir())
    assert len(queued) == 1  # the message waits for a worker; the row is the truth
    job = client.get(f"/v1/jobs/{r.json()['id']}", headers=headers).json()
    assert job["status"] == "queued" and job["params"]["preset"] == "dtd_vit_b16"


def test_anonymous_mode(tmp_path: Path) -> None:
    settings = _settings(tmp_path, api={"auth": "none"})
    with TestClient(create_app(settings)) as c:
        assert c.get("/v1/jobs").status_code == 200


def test_readyz_reports_unreachable_broker(tmp_path: Path) -> None:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    settings = _settings(tmp_path, broker={"url": f"redis://127.0.0.1:{port}/0"})
    with TestClient(create_app(settings)) as c:
        r = c.get("/readyz")
        assert r.status_code == 503
        checks = r.json()["checks"]
        assert checks["database"] == "ok" and checks["storage"] == "ok"
        assert checks["broker"].startswith("error")
        assert c.get("/healthz").status_code == 200


@pytest.mark.parametrize("patch", BAD_JOB_PATCHES, ids=lambda p: ascii(p)[:40])
def test_unstorable_input_is_422_and_commits_nothing(
    client: TestClient, settings: Settings, patch: dict[str, Any]
) -> None:
    headers = {"Authorization": f"Bearer {_key(settings, 't')}", "content-type": "application/json"}
    data = settings.data_dir / "ds"
    data.mkdir(exist_ok=True)
    body = {
        "dataset_uri": f"file://{data}",
        "class_names": ["a", "b"],
        "base_model": RANDOM_OK,
        **patch,
    }
    r = client.post("/v1/jobs", headers=headers, content=raw_json(body))
    assert r.status_code == 422, r.text
    assert r.headers["content-type"] == "application/problem+json"
    listed = client.get("/v1/jobs", headers=headers)
    assert listed.status_code == 200 and listed.json()["total"] == 0


@pytest.mark.parametrize("query", BAD_LIST_QUERIES, ids=str)
def test_out_of_range_pagination_is_422(
    client: TestClient, settings: Settings, query: dict[str, str]
) -> None:
    headers = {"Authorization": f"Bearer {_key(settings, 't')}"}
    for path in ("/v1/jobs", "/v1/models"):
        assert client.get(path, headers=headers, params=query).status_code == 422


def test_idempotency_key_returns_the_same_job(client: TestClient, settings: Settings) -> None:
    headers = {"Authorization": f"Bearer {_key(settings, 't')}", "Idempotency-Key": "order-42"}
    data = settings.data_dir / "ds"
    data.mkdir()
    body = {"dataset_uri": f"file://{data}", "class_names": ["a", "b"], "base_model": RANDOM_OK}
    first = client.post("/v1/jobs", headers=headers, json=body)
    again = client.post("/v1/jobs", headers=headers, json=body)
    assert first.status_code == again.status_code == 202, again.text
    assert first.json()["id"] == again.json()["id"]
    other = client.post("/v1/jobs", headers=headers, json={**body, "class_names": ["a", "c"]})
    assert (other.status_code, other.json()["code"]) == (409, "idempotency_conflict")
    fresh = client.post("/v1/jobs", headers={**headers, "Idempotency-Key": "order-43"}, json=body)
    assert fresh.json()["id"] != first.json()["id"]
    assert client.get("/v1/jobs", headers=headers).json()["total"] == 2
    assert len(list((settings.broker_folder / "queue").iterdir())) == 2  # sent once per job
    bad = client.post("/v1/jobs", headers={**headers, "Idempotency-Key": "a b"}, json=body)
    assert bad.status_code == 422


def test_delete_finished_job_removes_row_model_and_artifacts(
    client: TestClient, settings: Settings
) -> None:
    from sqlalchemy import update

    from must_core.db.models import Job
    from must_core.storage import make_store
    from must_core.storage.keys import checkpoint_key, model_key

    headers = {"Authorization": f"Bearer {_key(settings, 't')}"}
    data = settings.data_dir / "ds"
    data.mkdir()
    body = {"dataset_uri": f"file://{data}", "class_names": ["a", "b"], "base_model": RANDOM_OK}
    jid = client.post("/v1/jobs", headers=headers, json=body).json()["id"]
    assert client.delete(f"/v1/jobs/{jid}", headers=headers).json()["code"] == "job_not_finished"
    store = make_store(settings)
    blob = settings.data_dir / "blob"
    blob.write_bytes(b"x")
    for key in (checkpoint_key(jid), model_key(jid)):
        store.put_file(blob, key)
    engine = make_engine(settings.database_url)
    with session_scope(make_sessionmaker(engine)) as s:
        s.execute(update(Job).values(status="failed"))
    engine.dispose()
    other = {"Authorization": f"Bearer {_key(settings, 'other')}"}
    assert client.delete(f"/v1/jobs/{jid}", headers=other).status_code == 404
    assert client.delete(f"/v1/jobs/{jid}", headers=headers).status_code == 204
    assert client.get(f"/v1/jobs/{jid}", headers=headers).status_code == 404
    assert not store.exists(checkpoint_key(jid)) and not store.exists(model_key(jid))
    assert client.delete(f"/v1/jobs/{jid}", headers=headers).status_code == 404


def test_failed_auth_is_rate_limited_per_address_and_key(tmp_path: Path) -> None:
    settings = _settings(tmp_path, api={"auth": "keys", "auth_failures_limit": 3})
    good = {"Authorization": f"Bearer {_key(settings, 't')}"}
    with TestClient(create_app(settings)) as c:
        bad = {"Authorization": "Bearer must_wrong"}
        assert [c.get("/v1/jobs", headers=bad).status_code for _ in range(3)] == [401] * 3
        limited = c.get("/v1/jobs", headers=bad)
        assert (limited.status_code, limited.json()["code"]) == (429, "too_many_requests")
        assert 1 <= int(limited.headers["retry-after"]) <= 60
        assert c.get("/v1/jobs", headers=good).status_code == 429  # the address is limited too
    with TestClient(create_app(settings)) as fresh:  # a new process starts counting afresh
        assert fresh.get("/v1/jobs", headers=good).status_code == 200


@pytest.mark.parametrize(("mode", "status"), [("public", 200), ("token", 401), ("off", 404)])
def test_metrics_behind_a_setting(tmp_path: Path, mode: str, status: int) -> None:
    settings = _settings(tmp_path, api={"auth": "keys", "metrics": mode, "metrics_token": "s3cret"})
    with TestClient(create_app(settings)) as c:
        assert c.get("/metrics").status_code == status
        assert c.get("/metrics", headers={"Authorization": "Bearer s3cret"}).status_code == (
            404 if mode == "off" else 200
        )
        latin1 = {"Authorization": "Bearer \xe9".encode("latin-1")}
        assert c.get("/metrics", headers=latin1).status_code == status


@pytest.mark.parametrize(
    ("base_model", "needle"),
    [
        ({}, "allow_random_init"),  # the default ViT-B-16 with no weights
        ({"arch": "ViT-B-16", "pretrained": None}, "random weights"),
        ({"arch": "ViT-Nope-99", "pretrained": "openai"}, "unknown open_clip architecture"),
        ({"arch": "ViT-B-16", "pretrained": "no-such-tag"}, "unknown pretrained tag"),
    ],
)
def test_base_model_checked_at_submission(
    client: TestClient, settings: Settings, base_model: dict[str, Any], needle: str
) -> None:
    headers = {"Authorization": f"Bearer {_key(settings, 't')}"}
    data = settings.data_dir / "ds"
    data.mkdir(exist_ok=True)
    body = {"dataset_uri": f"file://{data}", "class_names": ["a", "b"], "base_model": base_model}
    r = client.post("/v1/jobs", headers=headers, json=body)
    assert r.status_code == 422, r.text
    assert r.json()["code"] == "invalid_base_model" and needle in r.json()["detail"]
    assert client.get("/v1/jobs", headers=headers).json()["total"] == 0


@pytest.mark.parametrize(
    "flag", [{"allow_random_init": 0}, {"allow_random_init": "true"}, {"force_quick_gelu": 1}]
)
def test_base_model_flags_must_be_json_booleans(
    client: TestClient, settings: Settings, flag: dict[str, Any]
) -> None:
    """The schema says boolean: 0, 1 or "true" are refused, not read as booleans (schemathesis
    found ``allow_random_init: 0`` accepted)."""
    headers = {"Authorization": f"Bearer {_key(settings, 't')}"}
    data = settings.data_dir / "ds"
    data.mkdir(exist_ok=True)
    base_model = {"arch": "ViT-B-16", "pretrained": "openai", **flag}
    body = {"dataset_uri": f"file://{data}", "class_names": ["a", "b"], "base_model": base_model}
    r = client.post("/v1/jobs", headers=headers, json=body)
    assert r.status_code == 422, r.text
    assert next(iter(flag)) in r.text
    assert client.get("/v1/jobs", headers=headers).json()["total"] == 0
