"""While the model loads, the server is already listening: HTTP answers 503 (`/health` and `/ready`
`{"status": "loading"}`, every other route its family's error with Retry-After) and gRPC UNAVAILABLE with
health NOT_SERVING, so a client sees "loading", not "connection refused", and a readiness probe waits."""

from __future__ import annotations

from typing import Any

from starlette.responses import JSONResponse
from starlette.types import ASGIApp, Receive, Scope, Send

from adapterd.server.common.config import ServerConfig
from adapterd.server.common.errors import EngineStopped
from adapterd.server.wire.error_bodies import error_body

RETRY_AFTER_S = 5


def loading_error(what: str) -> EngineStopped:
    return EngineStopped(f"the server is loading {what}; it answers once the model is ready (retry shortly)")


class LoadingService:
    """Stands in for the `Service` the gRPC servicers call until it exists: each call is UNAVAILABLE
    "loading"; then every attribute is the real service's."""

    def __init__(self, config: ServerConfig, what: str) -> None:
        self.config = config  # the servicers read config.replica when they are made
        self._what = what
        self._service: Any = None

    def ready(self, service: Any) -> None:
        self._service = service

    def __getattr__(self, name: str) -> Any:
        service = self.__dict__.get("_service")
        if service is None:
            raise loading_error(self.__dict__["_what"])
        return getattr(service, name)


class LoadingGate:
    """The HTTP app until the real one exists (`ready`), then a pass-through to it."""

    def __init__(self, what: str) -> None:
        self.what = what
        self.app: ASGIApp | None = None

    def ready(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if self.app is not None:
            await self.app(scope, receive, send)
            return
        if scope["type"] != "http":
            return
        error = loading_error(self.what)
        path = scope["path"]
        if path in ("/health", "/ready"):
            body: dict[str, Any] = {"status": "loading", "reason": str(error)}
        else:
            body = error_body(path, error)
        headers = {"retry-after": str(RETRY_AFTER_S)}
        await JSONResponse(body, status_code=error.http_status, headers=headers)(scope, receive, send)
