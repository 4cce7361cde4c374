"""The OpenAPI document explains itself: every field of every schema has a description and an
example, every parameter a description, every error is problem+json (FastAPI's own validation
error model is gone), both classify endpoints declare their upload bodies; the console and the
offline docs are served by the app."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient

from api.main import create_app
from must_core.cli.service import upgrade_database
from must_core.settings import Settings


@pytest.fixture
def client(tmp_path: Path) -> Any:
    settings = Settings.model_validate({"data_dir": tmp_path, "api": {"auth": "keys"}})
    upgrade_database(settings.database_url)
    with TestClient(create_app(settings)) as c:
        yield c


def test_every_field_and_parameter_documented(client: TestClient) -> None:
    doc = client.get("/openapi.json").json()
    schemas = doc["components"]["schemas"]
    assert "HTTPValidationError" not in schemas and "ValidationError" not in schemas
    undocumented = [
        f"{name}.{field}"
        for name, schema in schemas.items()
        if name != "Problem"
        for field, prop in (schema.get("properties") or {}).items()
        if not prop.get("description") or not ("examples" in prop or "example" in prop)
    ]
    assert undocumented == []
    params = [
        f"{method} {path} {p['name']}"
        for path, ops in doc["paths"].items()
        for method, op in ops.items()
        for p in op.get("parameters", [])
        if not p.get("description")
    ]
    assert params == []


def test_errors_are_problems_and_classify_bodies_declared(client: TestClient) -> None:
    doc = client.get("/openapi.json").json()
    for path, ops in doc["paths"].items():
        for method, op in ops.items():
            errors = {c: r for c, r in op["responses"].items() if c[0] in "45"}
            assert "500" in errors, (method, path)
            for code, r in errors.items():
                if (path, code) != ("/readyz", "503"):
                    assert list(r["content"]) == ["application/problem+json"], (path, code)
    for path in ("/v1/classify", "/v1/models/{model_id}/classify"):
        body = doc["paths"][path]["post"]["requestBody"]["content"]
        files = body["multipart/form-data"]["schema"]["properties"]["images"]
        assert files["items"]["format"] == "binary"
        assert "application/json" in body


def test_console_and_offline_docs_are_served(client: TestClient) -> None:
    assert client.get("/", follow_redirects=False).headers["location"] == "/ui/"
    page = client.get("/ui/")
    assert page.status_code == 200 and "console.js" in page.text
    assert "default-src 'self'" in page.headers["content-security-policy"]
    for asset in ("/ui/console.js", "/ui/console.css"):
        assert client.get(asset).status_code == 200
    docs = client.get("/docs").text
    assert "//cdn" not in docs and "swagger-ui-bundle.js" in docs
    redoc = client.get("/redoc").text
    assert "//cdn" not in redoc and "fonts.googleapis" not in redoc
    for src in ("swagger-ui-bundle.js", "swagger-ui.css", "redoc.standalone.js"):
        assert client.get(f"/static-offline-docs/{src}").status_code == 200
