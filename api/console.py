"""The web console: plain HTML, CSS and JavaScript of our own under ``api/console_static``, served
at ``/ui/`` (``/`` redirects there). No build step and nothing from a CDN: it works offline. The
page asks for an API key once (kept in the browser's localStorage) and calls the same /v1 API."""

from __future__ import annotations

from pathlib import Path

from fastapi import FastAPI
from fastapi.responses import RedirectResponse
from fastapi.staticfiles import StaticFiles

STATIC = Path(__file__).parent / "console_static"


def install(app: FastAPI) -> None:
    @app.get("/", include_in_schema=False)
    def root() -> RedirectResponse:
        return RedirectResponse("/ui/")

    app.mount("/ui", StaticFiles(directory=STATIC, html=True), name="console")
