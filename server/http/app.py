"""The Starlette application: routes, authentication and the one error table's HTTP side."""

from __future__ import annotations

from typing import Any

from starlette.applications import Starlette
from starlette.convertors import Convertor, register_url_convertor
from starlette.exceptions import HTTPException
from starlette.middleware import Middleware
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route
from starlette.types import ASGIApp, Receive, Scope, Send

from adapterd.server.common.auth import ApiKeys, Principal
from adapterd.server.common.config import REPLICA_HEADER
from adapterd.server.common.errors import AdapterdError, EngineFailed
from adapterd.server.common.protocol import Health
from adapterd.server.host.service import Service
from adapterd.server.http.adapters import AdapterRoutes
from adapterd.server.http.console import console_routes, is_console_path
from adapterd.server.http.disconnect import ClientDisconnected
from adapterd.server.http.generate import GenerateRoutes
from adapterd.server.http.headers import WithHeaders
from adapterd.server.http.openai import OpenAIRoutes
from adapterd.server.http.openapi import openapi_document
from adapterd.server.http.tokenize import TokenizeRoutes
from adapterd.server.http.trainer_proxy import TrainerProxy
from adapterd.server.wire.error_bodies import error_body, routing_error

OPEN_PATHS = frozenset({"/health", "/ready", "/info", "/metrics", "/openapi.json"})  # no key needed


def is_open_path(path: str) -> bool:
    """Answered without a key: the operations routes, and the console's files (its pages ask for a key)."""
    return path in OPEN_PATHS or is_console_path(path)


class AdapterIdConvertor(Convertor[str]):
    """An adapter id in a path: any characters, line breaks included (Starlette's `path` stops before a
    trailing newline, and its route's `$` then matches, so `keep%0A` named `keep`); the store's rule then
    refuses what is not an id."""

    regex = "(?s:.+)"

    def convert(self, value: str) -> str:
        return value

    def to_string(self, value: str) -> str:
        return value


register_url_convertor("adapter_id", AdapterIdConvertor())


def build_app(service: Service, keys: ApiKeys) -> Starlette:
    def principal(request: Request) -> Principal:
        return keys.authenticate(request.headers.get("authorization"))

    generate = GenerateRoutes(service, principal)
    openai = OpenAIRoutes(service, principal)
    adapters = AdapterRoutes(service, principal)
    tokens = TokenizeRoutes(service, principal)
    trainer = TrainerProxy(service.config.trainer_url) if service.config.trainer_url else None
    document = openapi_document(service.info()["version"], trainer=trainer is not None)
    routes = [
        Route("/", generate.root, methods=["POST"]),
        Route("/generate", generate.generate, methods=["POST"]),
        Route("/generate_stream", generate.generate_stream, methods=["POST"]),
        # For TGI clients that cannot send parameters.adapter_id (text-generation): the adapter in the path.
        Route("/models/{adapter_id:adapter_id}/generate_stream", generate.generate_stream, methods=["POST"]),
        Route("/models/{adapter_id:adapter_id}/generate", generate.generate, methods=["POST"]),
        Route("/models/{adapter_id:adapter_id}", generate.root, methods=["POST"]),
        Route("/tokenize", tokens.tokenize, methods=["POST"]),
        Route("/detokenize", tokens.detokenize, methods=["POST"]),
        Route("/tokenizer_info", tokens.tokenizer_info, methods=["GET"]),
        Route("/v1/completions", openai.completions, methods=["POST"]),
        Route("/v1/chat/completions", openai.chat_completions, methods=["POST"]),
        Route("/v1/models", openai.models, methods=["GET"]),
        Route("/v1/adapters", adapters.list, methods=["GET"]),
        Route("/v1/adapters/{adapter_id:adapter_id}", adapters.upload, methods=["PUT"]),
        Route("/v1/adapters/{adapter_id:adapter_id}", adapters.show, methods=["GET"]),
        Route("/v1/adapters/{adapter_id:adapter_id}", adapters.delete, methods=["DELETE"]),
        Route("/v1/load_lora_adapter", adapters.load_lora, methods=["POST"]),
        Route("/v1/unload_lora_adapter", adapters.unload_lora, methods=["POST"]),
        Route("/health", lambda _: health_response(service.health()), methods=["GET"]),
        Route("/ready", lambda _: health_response(service.readiness()), methods=["GET"]),
        Route("/info", lambda _: JSONResponse(service.info()), methods=["GET"]),
        Route(
            "/metrics", lambda _: Response(service.metrics.render(), media_type="text/plain; version=0.0.4")
        ),
        Route("/openapi.json", lambda _: JSONResponse(document), methods=["GET"]),
        *(trainer.routes() if trainer else ()),
        *console_routes(),
    ]
    handlers: dict[Any, Any] = {
        AdapterdError: _error_response,
        HTTPException: _routing_error,
        ClientDisconnected: _client_left,
        Exception: _internal_error,
    }
    middleware = [
        # Every answer names the replica that gave it, so an operator behind a router sees where it went.
        Middleware(WithHeaders, headers={REPLICA_HEADER: service.config.replica}),
        Middleware(AuthenticateFirst, keys=keys),
    ]
    app = Starlette(routes=routes, exception_handlers=handlers, middleware=middleware)
    app.state.trainer = trainer  # closed by the server on shutdown
    return app


class AuthenticateFirst:
    """With --api-keys, a request without a valid key is answered 401 before its body is read: a client
    without a key cannot make the server read (and parse) megabytes. The routes still check roles."""

    def __init__(self, app: ASGIApp, keys: ApiKeys) -> None:
        self.app, self.keys = app, keys

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http" and not self.keys.is_open and not is_open_path(scope["path"]):
            sent = dict(scope["headers"]).get(b"authorization")
            try:
                self.keys.authenticate(sent.decode("latin-1") if sent is not None else None)
            except AdapterdError as exc:
                response = JSONResponse(error_body(scope["path"], exc), status_code=exc.http_status)
                await response(scope, receive, send)
                return
        await self.app(scope, receive, send)


def health_response(health: Health) -> Response:
    """200 {"status": "ok"}, or 503 {"status": "unhealthy", "reason"} (Kubernetes probes read the status)."""
    if health.ok:
        return JSONResponse({"status": "ok"})
    return JSONResponse({"status": "unhealthy", "reason": health.reason}, status_code=503)


async def _error_response(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, AdapterdError)
    return JSONResponse(error_body(request.url.path, exc), status_code=exc.http_status)


async def _routing_error(request: Request, exc: Exception) -> Response:
    """No such route, or not with this method: the route family's JSON error, as for any other error."""
    assert isinstance(exc, HTTPException)
    error = routing_error(exc, request.method, request.url.path)
    return JSONResponse(
        error_body(request.url.path, error), status_code=error.http_status, headers=exc.headers
    )


async def _client_left(request: Request, exc: Exception) -> Response:
    """Nobody reads this answer: 499, as nginx logs a client that closed its request."""
    return Response(status_code=499)


async def _internal_error(request: Request, exc: Exception) -> Response:
    """A bug of ours: logged by Starlette, answered as a 500 in the route family's shape."""
    error = EngineFailed(f"internal error: {type(exc).__name__}")
    return JSONResponse(error_body(request.url.path, error), status_code=500)
