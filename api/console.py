"""The web console: plain HTML, CSS and JavaScript of our own under ``api/console_static``, served
at ``/ui/`` (``/`` redirects there). No build step and nothing from a CDN: it works offline. The
page asks for an API key once (kept in the browser's localStorage) and calls the same /v1 API."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from pathlib import Path

from fastapi import FastAPI, Request, Response
from fastapi.responses import RedirectResponse
from fastapi.staticfiles import StaticFiles

STATIC = Path(__file__).parent / "console_static"
# The console and the API docs load nothing from another origin, and the browser is told so: an
# asset that links elsewhere (ReDoc's sidebar logo) is not even requested.
CSP = (
    "default-src 'self'; script-src 'self' 'unsafe-inline' blob:; "
    "style-src 'self' 'unsafe-inline'; img-src 'self' data: blob:; font-src 'self' data:; "
    "worker-src 'self' blob:; connect-src 'self'; frame-ancestors 'none'"
)
_PAGES = ("/ui", "/docs", "/redoc")


def install(app: FastAPI) -> None:
    @app.get("/", include_in_schema=False)
    def root() -> RedirectResponse:
        return RedirectResponse("/ui/")

    app.mount("/ui", StaticFiles(directory=STATIC, html=True), name="console")

    @app.middleware("http")
    async def same_origin_only(
        request: Request, call_next: Callable[[Request], Awaitable[Response]]
    ) -> Response:
        response = await call_next(request)
        if request.url.path.startswith(_PAGES):
            response.headers["Content-Security-Policy"] = CSP
        return response
