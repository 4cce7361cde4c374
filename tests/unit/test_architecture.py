"""Layering rules: must_core never imports web/queue code; api and worker never import each other."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_import_linter_contracts_hold() -> None:
    exe = shutil.which("lint-imports") or str(Path(sys.executable).parent / "lint-imports")
    r = subprocess.run(
        [exe, "--no-cache"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        check=False,
        env={"PYTHONPATH": str(ROOT), "PATH": str(Path(sys.executable).parent)},
    )
    assert r.returncode == 0, r.stdout + r.stderr
    assert "broken" in r.stdout and "0 broken" in r.stdout


def test_engine_import_loads_no_service_frameworks() -> None:
    code = (
        "import sys, must_core.ml.train, must_core.ml.inference, must_core.cli;"
        "bad=[m for m in ('fastapi','starlette','celery','kombu','api','worker') if m in sys.modules];"
        "print(bad); sys.exit(1 if bad else 0)"
    )
    r = subprocess.run(
        [sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=False
    )
    assert r.returncode == 0, r.stdout + r.stderr


def test_settings_import_does_not_load_torch() -> None:
    r = subprocess.run(
        [
            sys.executable,
            "-c",
            "import sys, must_core, must_core.errors;sys.exit('torch' in sys.modules)",
        ],
        cwd=ROOT,
        check=False,
    )
    assert r.returncode == 0
