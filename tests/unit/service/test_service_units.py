"""Settings, state machine, task registry and the local store. No services."""

from __future__ import annotations

from pathlib import Path

import pytest

from must_core.jobs import names
from must_core.jobs.states import JobStatus, can_transition
from must_core.settings import Settings
from must_core.storage.base import StorageError
from must_core.storage.local import LocalStore


def test_settings_from_env(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("MUST_STORAGE__BUCKET", "artifacts")
    monkeypatch.setenv("MUST_STORAGE__BACKEND", "s3")
    monkeypatch.setenv("MUST_WORKER__QUEUE", "gpu-a100")
    monkeypatch.setenv("MUST_DATASETS__ALLOWED_ROOTS", f'["{tmp_path}"]')
    monkeypatch.setenv("MUST_DATA_DIR", str(tmp_path))
    s = Settings()
    assert s.storage.bucket == "artifacts" and s.storage.backend == "s3"
    assert s.worker.queue == "gpu-a100"
    assert s.datasets.allowed_roots == [tmp_path]
    assert s.database_url == f"sqlite:///{tmp_path.resolve() / 'must.db'}"
    assert s.broker_url == "filesystem://"


def test_anonymous_access_only_on_loopback(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MUST_API__AUTH", "none")
    assert Settings().api.auth == "none"
    monkeypatch.setenv("MUST_API__HOST", "0.0.0.0")  # noqa: S104
    with pytest.raises(ValueError, match="loopback"):
        Settings()


def test_state_machine() -> None:
    assert can_transition("queued", "running")
    assert can_transition("running", "queued")  # worker lost → resume
    assert not can_transition("succeeded", "running")
    assert can_transition("cancelled", "queued")  # POST /v1/jobs/{id}/resume
    assert not can_transition("succeeded", "queued")
    assert not can_transition("cancelled", "running")
    assert {s.value for s in JobStatus} == {"queued", "running", "succeeded", "failed", "cancelled"}


def test_every_task_name_is_registered() -> None:
    from worker.app import app

    for name in names.ALL_TASKS:
        assert name in app.tasks


def test_local_store_roundtrip(tmp_path: Path) -> None:
    store = LocalStore(tmp_path / "store")
    src = tmp_path / "f.bin"
    src.write_bytes(b"abc")
    store.put_file(src, "jobs/1/checkpoints/last.pt")
    store.put_file(src, "jobs/1/model/model.safetensors")
    assert (
        store.exists("jobs/1/checkpoints/last.pt")
        and store.size("jobs/1/model/model.safetensors") == 3
    )
    store.get_file("jobs/1/checkpoints/last.pt", tmp_path / "back.bin")
    assert (tmp_path / "back.bin").read_bytes() == b"abc"
    assert store.list_keys("jobs/1/") == [
        "jobs/1/checkpoints/last.pt",
        "jobs/1/model/model.safetensors",
    ]
    assert store.delete_prefix("jobs/1/model/") == 1
    assert not store.exists("jobs/1/model/model.safetensors")
    with pytest.raises(StorageError):
        store.put_file(src, "../escape")
