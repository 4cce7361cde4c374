"""scripts/bootstrap: no pip run when the stamp matches; a full environment also serves --serve;
the serve profile installs the service extra only."""

from __future__ import annotations

import hashlib
import subprocess
from pathlib import Path

import pytest

from tests.deploy.helpers import ROOT

SCRIPT = ROOT / "scripts" / "bootstrap"


def _hash() -> str:
    data = b"".join((ROOT / f).read_bytes() for f in ("constraints-ci.txt", "pyproject.toml"))
    return hashlib.sha256(data + SCRIPT.read_bytes()).hexdigest()


def _run(venv: Path, *args: str) -> subprocess.CompletedProcess[str]:
    """Run bootstrap with a fake interpreter that only records that it was asked to build a venv."""
    fake = venv.parent / "fake-python"
    fake.write_text(f"#!/bin/sh\necho called >> {venv.parent / 'calls'}\nexit 7\n")
    fake.chmod(0o755)
    return subprocess.run(
        ["bash", str(SCRIPT), *args],
        env={"PATH": "/usr/bin:/bin", "MUST_VENV": str(venv), "PYTHON": str(fake)},
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )


@pytest.mark.parametrize(
    ("stamped", "args"), [("serve", ["--serve"]), ("full", ["--serve"]), ("full", [])]
)
def test_matching_stamp_skips_pip(tmp_path: Path, stamped: str, args: list[str]) -> None:
    venv = tmp_path / "venv"
    venv.mkdir()
    (venv / ".must-bootstrap").write_text(f"{stamped} {_hash()}\n")
    r = _run(venv, *args)
    assert r.returncode == 0, r.stderr
    assert not (tmp_path / "calls").exists()  # no venv built, no pip run


@pytest.mark.parametrize("stamp", ["serve {hash}", "full 0000", ""])
def test_changed_lock_or_profile_reinstalls(tmp_path: Path, stamp: str) -> None:
    venv = tmp_path / "venv"
    venv.mkdir()
    (venv / ".must-bootstrap").write_text(stamp.format(hash=_hash()) + "\n")
    r = _run(venv)  # full profile: a serve stamp or another hash must not skip
    assert r.returncode == 7 and (tmp_path / "calls").read_text() == "called\n"


def test_serve_profile_installs_only_the_service_extra() -> None:
    text = SCRIPT.read_text()
    assert "-e '.[service]'" in text and "-e '.[service,dev,bench]'" in text
    serve = (ROOT / "scripts" / "serve").read_text()
    assert "scripts/bootstrap --serve" in serve
