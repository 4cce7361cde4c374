"""Alembic: the models and the migrations agree on PostgreSQL and SQLite; downgrade works."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from tests.integration.helpers import REPO

pytestmark = pytest.mark.integration


def _alembic(url: str, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "alembic", "-x", f"url={url}", *args],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )


def test_postgres_schema_matches_models(pg_url: str) -> None:
    r = _alembic(pg_url, "check")
    assert r.returncode == 0, r.stdout + r.stderr
    assert "(head)" in _alembic(pg_url, "current").stdout


def test_sqlite_upgrade_check_downgrade(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'm.db'}"
    for args in (("upgrade", "head"), ("check",), ("downgrade", "base"), ("upgrade", "head")):
        r = _alembic(url, *args)
        assert r.returncode == 0, (args, r.stdout + r.stderr)
