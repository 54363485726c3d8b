"""GET /ui: the web console, static files shipped in the package (no build step; no JavaScript library). The
pages call the same HTTP API as any client, with the key the user typed (kept in the browser's session
storage); the files themselves need no key."""

from __future__ import annotations

from pathlib import Path

from starlette.requests import Request
from starlette.responses import FileResponse
from starlette.routing import BaseRoute, Mount, Route
from starlette.staticfiles import StaticFiles

from adapterd.server.http.headers import WithHeaders

CONSOLE_DIR = Path(__file__).with_name("ui")  # the files, as the browser asks for them
CONSOLE_PREFIX = "/ui"
# The pages load only their own files and talk only to this server.
SECURITY_HEADERS = {
    "content-security-policy": "default-src 'self'; img-src 'self' data:; object-src 'none'; "
    "base-uri 'none'; frame-ancestors 'none'",
    "x-content-type-options": "nosniff",
    "referrer-policy": "no-referrer",
}


def is_console_path(path: str) -> bool:
    return path == CONSOLE_PREFIX or path.startswith(CONSOLE_PREFIX + "/")


def console_routes() -> list[BaseRoute]:
    """GET /ui (the page; its files use absolute /ui/... paths), and /ui/... (the page again, its files)."""

    async def index(_: Request) -> FileResponse:
        return FileResponse(CONSOLE_DIR / "index.html", headers=SECURITY_HEADERS)

    files = WithHeaders(StaticFiles(directory=CONSOLE_DIR, html=True), SECURITY_HEADERS)
    return [Route(CONSOLE_PREFIX, index, methods=["GET"]), Mount(CONSOLE_PREFIX, app=files)]
