"""Shared helpers for the integration tier: processes, polling, generated images."""

from __future__ import annotations

import io
import os
import random
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
from PIL import Image

REPO = Path(__file__).resolve().parents[2]
TINY_CONFIG = REPO / "tests" / "assets" / "tiny_clip.json"
COLORS = {"red": (220, 30, 30), "green": (30, 200, 40), "blue": (30, 40, 220)}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_for(
    predicate: Callable[[], Any], timeout: float, interval: float = 0.2, what: str = "condition"
) -> Any:
    deadline = time.monotonic() + timeout
    last: Any = None
    while time.monotonic() < deadline:
        last = predicate()
        if last:
            return last
        time.sleep(interval)
    raise AssertionError(f"timed out after {timeout:.0f}s waiting for {what}; last={last!r}")


def image_bytes(color: tuple[int, int, int], seed: int, size: int = 32) -> bytes:
    rng = random.Random(seed)
    img = Image.new("RGB", (size, size), color)
    for _ in range(20):  # a little texture so views differ
        x, y = rng.randrange(size), rng.randrange(size)
        img.putpixel((x, y), tuple(min(255, max(0, c + rng.randint(-60, 60))) for c in color))
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return buf.getvalue()


def make_images(n_per_class: int, classes: list[str], seed: int = 0) -> dict[str, bytes]:
    """{relative path: PNG bytes} in class subfolders."""
    out = {}
    for ci, name in enumerate(classes):
        for i in range(n_per_class):
            out[f"{name}/{i:03d}.png"] = image_bytes(COLORS[name], seed * 1000 + ci * 100 + i)
    return out


def write_images(root: Path, files: dict[str, bytes]) -> Path:
    for rel, data in files.items():
        p = root / rel
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_bytes(data)
    return root


class Proc:
    """A child process in its own session, so a SIGKILL takes its whole tree (worker + pool)."""

    def __init__(self, name: str, args: list[str], env: dict[str, str], log_dir: Path) -> None:
        self.name = name
        self.log_path = log_dir / f"{name}-{int(time.time() * 1000)}.log"
        self._log = self.log_path.open("wb")
        self.proc = subprocess.Popen(
            args,
            env=env,
            cwd=REPO,
            stdout=self._log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )

    def alive(self) -> bool:
        return self.proc.poll() is None

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def kill(self) -> None:
        """SIGKILL the whole process group (simulates a crashed machine/OOM kill)."""
        if self.alive():
            os.killpg(self.proc.pid, signal.SIGKILL)
        self.proc.wait(timeout=30)

    def stop(self, timeout: float = 20) -> None:
        if self.alive():
            os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait(timeout=30)
        self._log.close()


def start_worker(env: dict[str, str], log_dir: Path, name: str = "worker") -> Proc:
    queue = env.get("MUST_WORKER__QUEUE", "gpu")
    proc = Proc(
        name,
        [
            sys.executable,
            "-m",
            "celery",
            "-A",
            "worker.app",
            "worker",
            "-Q",
            queue,
            "--pool=prefork",
            "--concurrency=1",
            "--max-tasks-per-child=1",
            "--without-gossip",
            "--without-mingle",
            "-n",
            f"{name}-{os.getpid()}-{time.time_ns()}@%h",
            "-l",
            "INFO",
        ],
        env,
        log_dir,
    )
    wait_for(lambda: "ready." in proc.log() or not proc.alive(), 90, what="celery worker ready")
    assert proc.alive(), proc.log()[-3000:]
    return proc


def trainer_pids(job_id: str) -> list[int]:
    """Live processes of a job's training tree (launcher, torchrun ranks, loader workers)."""
    pids = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            cmd = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
            state = (entry / "stat").read_text().split(") ")[-1][:1]
        except OSError:
            continue
        if f"jobs/{job_id}/run" in cmd and state != "Z":
            pids.append(int(entry.name))
    return pids


def start_api(env: dict[str, str], log_dir: Path, port: int) -> tuple[Proc, str]:
    proc = Proc(
        "api",
        [
            sys.executable,
            "-m",
            "uvicorn",
            "api.main:create_app",
            "--factory",
            "--host",
            "127.0.0.1",
            "--port",
            str(port),
            "--workers",
            "1",
            "--http",
            "api.server:TimedH11Protocol",
        ],
        env,
        log_dir,
    )
    base = f"http://127.0.0.1:{port}"

    def up() -> bool:
        if not proc.alive():
            raise AssertionError(proc.log()[-3000:])
        try:
            return httpx.get(f"{base}/healthz", timeout=2).status_code == 200
        except httpx.HTTPError:
            return False

    wait_for(up, 60, what="API /healthz")
    return proc, base


def wait_job(
    client: httpx.Client, job_id: str, statuses: set[str], timeout: float
) -> dict[str, Any]:
    def check() -> dict[str, Any] | None:
        body: dict[str, Any] = client.get(f"/v1/jobs/{job_id}").json()
        return body if body.get("status") in statuses else None

    result: dict[str, Any] = wait_for(check, timeout, 0.25, what=f"job {job_id} in {statuses}")
    return result
