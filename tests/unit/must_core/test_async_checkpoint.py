"""Checkpoints off the training thread: snapshots are independent of later updates, at most one write
is in flight, a kill during a write never publishes a partial checkpoint, and the uploader only reports
a step once its upload is complete."""

from __future__ import annotations

import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import torch

from must_core.ml.checkpoint import AsyncCheckpointer, load_training_checkpoint
from worker.training import CheckpointUploader

REPO = Path(__file__).resolve().parents[3]


def _payload(step: int, numel: int = 1000) -> dict[str, object]:
    return {
        "student": {"w": torch.full((numel,), float(step))},
        "step": step,
        "history": [{"s": 1}],
    }


def test_snapshot_is_taken_before_save_returns(tmp_path: Path) -> None:
    written: list[int] = []
    ck = AsyncCheckpointer(tmp_path / "last.pt", on_written=lambda _p, s: written.append(s))
    live = _payload(1)
    assert ck.save(live, 1)
    live["student"]["w"].add_(100.0)  # type: ignore[index]  # training continues in place
    ck.close()
    assert written == [1]
    assert torch.equal(
        load_training_checkpoint(tmp_path / "last.pt")["student"]["w"], torch.ones(1000)
    )


def test_at_most_one_write_in_flight(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import must_core.ml.checkpoint as ckpt_mod

    gate = threading.Event()
    real = ckpt_mod.save_training_checkpoint

    def slow_save(path: Path, payload: dict[str, object]) -> None:
        gate.wait(10)
        real(path, payload)

    monkeypatch.setattr(ckpt_mod, "save_training_checkpoint", slow_save)
    written: list[int] = []
    ck = AsyncCheckpointer(tmp_path / "last.pt", on_written=lambda _p, s: written.append(s))
    assert ck.save(_payload(1), 1)
    assert not ck.save(_payload(2), 2)  # still writing step 1: skipped, not queued
    assert ck.skipped == 1
    gate.set()
    ck.save(_payload(3), 3, wait=True)  # a run's last save waits for the one in flight
    ck.close()
    assert written == [1, 3]
    assert load_training_checkpoint(tmp_path / "last.pt")["step"] == 3


def test_write_failure_surfaces_on_the_training_thread(tmp_path: Path) -> None:
    ck = AsyncCheckpointer(tmp_path / "last.pt", on_written=lambda _p, _s: 1 / 0)
    ck.save(_payload(1), 1)
    with pytest.raises(ZeroDivisionError):
        ck.close()


_WRITER = """
import sys, time, torch
from pathlib import Path
from must_core.ml.checkpoint import AsyncCheckpointer
path = Path(sys.argv[1])
ck = AsyncCheckpointer(path)
ck.save({"student": {"w": torch.zeros(10)}, "step": 1}, 1, wait=True)
ck.save({"student": {"w": torch.ones(60_000_000)}, "step": 2}, 2)  # ~240 MB, written in background
print("writing", flush=True)
time.sleep(60)
"""


def test_kill_during_a_background_write_keeps_the_previous_checkpoint(tmp_path: Path) -> None:
    path = tmp_path / "last.pt"
    proc = subprocess.Popen(
        [sys.executable, "-c", _WRITER, str(path)],
        cwd=REPO,
        stdout=subprocess.PIPE,
        text=True,
    )
    assert proc.stdout is not None
    assert proc.stdout.readline().strip() == "writing"
    time.sleep(0.05)
    partial = list(tmp_path.glob(".last.pt.*.tmp"))
    proc.kill()
    proc.wait(timeout=30)
    assert partial, "the kill landed during the write (a temp file existed)"
    assert load_training_checkpoint(path)["step"] == 1  # never the half-written one


def test_uploader_reports_a_step_only_after_its_upload_and_keeps_the_newest(tmp_path: Path) -> None:
    gate = threading.Event()
    uploaded: list[str] = []
    reported: list[int] = []

    def upload(path: Path) -> None:
        gate.wait(10)
        uploaded.append(path.name)

    up = CheckpointUploader(upload, reported.append)
    files = []
    for step in (1, 2, 3):
        f = tmp_path / f"step-{step}.pt"
        f.write_bytes(b"x")
        files.append(f)
        up.submit(f, step)
        time.sleep(0.05)
    assert reported == []  # step 1 is still uploading
    assert not files[1].exists()  # step 2 was superseded by step 3 while waiting
    gate.set()
    up.close()
    assert uploaded == ["step-1.pt", "step-3.pt"] and reported == [1, 3]
    assert not any(f.exists() for f in files)  # uploaded files are removed


def test_failed_upload_does_not_advance_the_step(tmp_path: Path) -> None:
    reported: list[int] = []

    def upload(_path: Path) -> None:
        raise ConnectionError("storage down")

    up = CheckpointUploader(upload, reported.append)
    f = tmp_path / "step-1.pt"
    f.write_bytes(b"x")
    up.submit(f, 1)
    up.close()
    assert reported == []
