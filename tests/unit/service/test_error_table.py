"""Every error code the server can raise has a row in api.errors.STATUS (the one code→status table)."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest
from fastapi import FastAPI
from fastapi.testclient import TestClient

from api.errors import STATUS, install
from must_core.errors import MustError

REPO = Path(__file__).resolve().parents[3]
# Client-side only: the REST client's own errors never reach the server.
CLIENT_ONLY = {REPO / "must_core" / "cli" / "client.py", REPO / "must_core" / "client.py"}


def _str(node: ast.AST | None) -> str | None:
    return node.value if isinstance(node, ast.Constant) and isinstance(node.value, str) else None


def _codes_of(node: ast.AST) -> list[str | None]:
    if isinstance(node, ast.Assign):  # code = "x" in an error class
        return [
            _str(node.value) for t in node.targets if isinstance(t, ast.Name) and t.id == "code"
        ]
    if isinstance(node, ast.Call):  # code="x" arguments and ApiError("x", ...)
        found = [_str(kw.value) for kw in node.keywords if kw.arg in ("code", "error_code")]
        name = getattr(node.func, "id", getattr(node.func, "attr", ""))
        if name == "ApiError" and node.args:
            found.append(_str(node.args[0]))
        return found
    if isinstance(node, ast.Dict):  # {"error_code": "worker_lost", ...} row updates
        return [
            _str(v)
            for k, v in zip(node.keys, node.values, strict=True)
            if _str(k) in ("code", "error_code")
        ]
    return []


def _codes_in(path: Path) -> set[str]:
    tree = ast.parse(path.read_text())
    return {c for node in ast.walk(tree) for c in _codes_of(node) if c is not None}


def _server_codes() -> set[str]:
    files = [
        p
        for pkg in ("api", "must_core", "worker")
        for p in (REPO / pkg).rglob("*.py")
        if p not in CLIENT_ONLY
    ]
    return set().union(*(_codes_in(p) for p in files)) - {"must_error"}


def test_every_raised_code_has_a_status() -> None:
    codes = _server_codes()
    assert {"storage_unavailable", "model_load_failed", "worker_lost"} <= codes  # the scan works
    missing = sorted(codes - STATUS.keys())
    assert not missing, f"codes without a row in api.errors.STATUS: {missing}"


def test_every_error_subclass_has_a_status() -> None:
    import must_core.datasets.errors
    import must_core.jobs.queries
    import must_core.serving.images
    import must_core.storage.base  # noqa: F401

    def walk(cls: type[MustError]) -> list[type[MustError]]:
        return [cls, *(c for sub in cls.__subclasses__() for c in walk(sub))]

    classes = [c for c in walk(MustError) if c.__module__.split(".")[0] != "tests"]
    classes = [
        c for c in classes if c.__module__ not in ("must_core.cli.client", "must_core.client")
    ]
    # MustError and ApiError take their code per instance (covered by the source scan)
    assert [c.__name__ for c in classes if c.code not in STATUS and c.code != "must_error"] == []


@pytest.mark.parametrize(
    ("code", "status"),
    [("storage_unavailable", 503), ("model_load_failed", 500), ("a_code_nobody_mapped", 500)],
)
def test_server_failures_are_5xx_not_422(code: str, status: int) -> None:
    app = FastAPI()
    install(app)

    @app.get("/boom")
    def boom() -> None:
        raise MustError("x", code=code)

    r = TestClient(app).get("/boom")
    assert r.status_code == status
    assert r.headers["content-type"] == "application/problem+json"
    assert r.json()["code"] == code
