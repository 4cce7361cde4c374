"""Supervise a job's training process group (see :mod:`must_core.ml.launch` for the protocol).

The Celery pool child that runs a job is daemonic: it may not have multiprocessing children, so the
DataLoader's workers and DDP ranks could not start inside it. It starts a fresh interpreter instead
(``torchrun`` for several ranks), in a session of its own so the whole tree can be signalled at once,
and relays what the trainer reports (progress, finished checkpoints, the result) to the job row. No
torch is imported here, and CUDA is only ever touched by the trainer.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import signal
import subprocess
import sys
import threading
from collections.abc import Callable
from pathlib import Path
from typing import IO, Any

from must_core.errors import MustError
from must_core.ml.launch import EVENTS_FILE, PARENT_ENV, RESULT_FILE, STOP_FILE, LaunchSpec

_logger = logging.getLogger(__name__)


class TrainingProcess:
    """One job's trainer: start, read its events, ask it to stop, kill it, read its outcome."""

    def __init__(self, run_dir: Path, spec: LaunchSpec, nproc: int, threads: int) -> None:
        self.run_dir = run_dir
        self.spec = spec
        self.nproc = nproc
        self.threads = threads
        self.proc: subprocess.Popen[bytes] | None = None
        self._offset = 0
        self._partial = b""
        self._relay: threading.Thread | None = None

    def command(self) -> list[str]:
        cmd = [sys.executable, "-m", "must_core.ml.launch", str(self.run_dir)]
        return [*cmd, "--torchrun", str(self.nproc)] if self.nproc > 1 else cmd

    def start(self) -> None:
        self.spec.write(self.run_dir)
        env = {
            **os.environ,
            "OMP_NUM_THREADS": str(self.threads),
            "PYTHONUNBUFFERED": "1",
            PARENT_ENV: str(os.getpid()),
        }
        self.proc = subprocess.Popen(
            self.command(),
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            start_new_session=True,  # one process group: cancel/cleanup signals the whole tree
        )
        assert self.proc.stdout is not None
        self._relay = threading.Thread(
            target=_relay_output, args=(self.proc.stdout,), daemon=True, name="trainer-output"
        )
        self._relay.start()
        _logger.info("training process %d started (%d rank(s))", self.proc.pid, self.nproc)

    @property
    def pid(self) -> int | None:
        return self.proc.pid if self.proc is not None else None

    def poll(self) -> int | None:
        assert self.proc is not None
        return self.proc.poll()

    def events(self) -> list[dict[str, Any]]:
        """Events written since the last call (whole lines only)."""
        path = self.run_dir / EVENTS_FILE
        if not path.exists():
            return []
        with path.open("rb") as f:
            f.seek(self._offset)
            data = f.read()
        self._offset += len(data)
        lines = (self._partial + data).split(b"\n")
        self._partial = lines.pop()
        return [json.loads(line) for line in lines if line.strip()]

    def request_stop(self) -> None:
        """Checkpoint and stop at the next step boundary."""
        (self.run_dir / STOP_FILE).touch()

    def kill(self) -> None:
        """SIGKILL the whole process group (trainer, ranks, loader workers) and reap it."""
        if self.proc is None or self.proc.poll() is not None:
            return
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.proc.pid, signal.SIGKILL)
        try:
            self.proc.wait(timeout=30)
        except subprocess.TimeoutExpired:  # unkillable (D state): the kernel reaps it later
            _logger.error("training process %d did not exit after SIGKILL", self.proc.pid)
            return
        _logger.warning("training process %d killed", self.proc.pid)

    def join_output(self) -> None:
        if self._relay is not None:
            self._relay.join(timeout=5)

    def outcome(self) -> dict[str, Any]:
        """The trainer's result; raises its error (with its code) when it failed."""
        result = self.run_dir / RESULT_FILE
        status = self.poll()
        if status == 0 and result.exists():
            return dict(json.loads(result.read_text()))
        errors = [json.loads(p.read_text()) for p in self._error_files()]
        # The rank that failed first with a specific error, not one that lost its peers afterwards.
        errors.sort(key=lambda body: body["code"] == "internal_error")
        if errors:
            raise MustError(errors[0]["message"], code=errors[0]["code"])
        how = (
            f"signal {signal.Signals(-status).name}"
            if status and status < 0
            else f"status {status}"
        )
        raise MustError(
            f"the training process exited with {how} and no result (killed for memory?)",
            code="training_process_failed",
        )

    def _error_files(self) -> list[Path]:
        return sorted(self.run_dir.glob("error-*.json"), key=lambda p: p.stat().st_mtime)


def _relay_output(stream: IO[bytes]) -> None:
    """The trainer's stdout/stderr into this worker's log, line by line."""
    for raw in iter(stream.readline, b""):
        line = raw.decode("utf-8", "replace").rstrip()
        if line:
            _logger.info("[trainer] %s", line)
    stream.close()


class CheckpointUploader:
    """Uploads finished checkpoints on a thread of its own, newest first, one at a time.

    A checkpoint that arrives while another uploads waits in a one-slot queue; a newer one replaces it
    (its file is deleted). ``on_uploaded(step)`` runs only after the store holds the complete object,
    so the job's ``checkpoint_step`` never points at a partial upload (object stores publish an object
    only once its upload completes; the local store renames into place).
    """

    def __init__(self, upload: Callable[[Path], None], on_uploaded: Callable[[int], None]) -> None:
        self.upload = upload
        self.on_uploaded = on_uploaded
        self._pending: tuple[Path, int] | None = None
        self._cond = threading.Condition()
        self._closing = False
        self._thread = threading.Thread(target=self._loop, daemon=True, name="checkpoint-upload")
        self._thread.start()

    def submit(self, path: Path, step: int) -> None:
        with self._cond:
            if self._pending is not None:
                self._pending[0].unlink(missing_ok=True)
            self._pending = (path, step)
            self._cond.notify()

    def close(self, *, drain: bool = True) -> None:
        """Stop after the pending upload (``drain``) or drop it; waits for the one in flight."""
        with self._cond:
            if not drain and self._pending is not None:
                self._pending[0].unlink(missing_ok=True)
                self._pending = None
            self._closing = True
            self._cond.notify()
        self._thread.join()

    def _loop(self) -> None:
        while True:
            with self._cond:
                while self._pending is None and not self._closing:
                    self._cond.wait()
                if self._pending is None:
                    return
                (path, step), self._pending = self._pending, None
            self._upload_one(path, step)

    def _upload_one(self, path: Path, step: int) -> None:
        _logger.info("uploading checkpoint step %d", step)
        try:
            self.upload(path)
            self.on_uploaded(step)
            _logger.info("uploaded checkpoint step %d", step)
        except Exception as exc:  # the next checkpoint tries again; the stored one stays valid
            _logger.warning("checkpoint upload at step %d failed: %s", step, exc)
        finally:
            path.unlink(missing_ok=True)
