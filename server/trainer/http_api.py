"""The trainer's HTTP API (Starlette): jobs, their progress as server-sent events, and evaluations.

    POST /v1/training/jobs               multipart: config (JSON), data (JSONL), eval_data (JSONL, optional),
                                         tasks (tar archive of lm-eval task YAML and data, optional)
    GET  /v1/training/jobs               {"object": "list", "data": [job, ...]}, newest first
    GET  /v1/training/jobs/{id}          the job
    GET  /v1/training/jobs/{id}/events   SSE: {"type": "status" | "progress" | "metrics", "job": job}
    POST /v1/training/jobs/{id}/cancel   the job as it is then
    POST /v1/evaluations                 multipart: data (JSONL), adapter_id (optional) -> scores
    GET  /health
Errors answer the OpenAI shape, {"error": {"message", "type", "param", "code"}}, as the server's do.
"""

from __future__ import annotations

import tempfile
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

from starlette.applications import Starlette
from starlette.datastructures import FormData, UploadFile
from starlette.exceptions import HTTPException
from starlette.formparsers import MultiPartException
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from adapterd.server.common.auth import ApiKeys, Principal
from adapterd.server.common.errors import AdapterdError, AdapterNotFound, InvalidRequest, PayloadTooLarge
from adapterd.server.trainer.config import JobConfig
from adapterd.server.trainer.errors import InvalidConfig
from adapterd.server.trainer.evaluate import evaluate_file
from adapterd.server.trainer.service import TrainerService
from adapterd.server.wire.error_bodies import openai_error, routing_error
from adapterd.server.wire.params import parse_json
from adapterd.server.wire.sse import first_then_rest, sse_response

MAX_DATA_BYTES = 1024**3  # per file
MAX_FIELD_BYTES = 16 * 1024**2  # a non-file form field (the config, or data sent as text)
CHUNK = 1 << 20


class TrainerRoutes:
    def __init__(self, service: TrainerService, keys: ApiKeys) -> None:
        self.service = service
        self.keys = keys

    def principal(self, request: Request) -> Principal:
        return self.keys.authenticate(request.headers.get("authorization"))

    async def submit(self, request: Request) -> Response:
        principal = self.principal(request)
        async with _form(request) as form:
            config = JobConfig.from_dict(_json_field(form, "config"))
            principal.require_owner(config.adapter_id)
            with tempfile.TemporaryDirectory(dir=self.service.store.tmp) as tmp:
                data = await _save_file(form, "data", Path(tmp), required=True)
                assert data is not None
                eval_data = await _save_file(form, "eval_data", Path(tmp), required=False)
                tasks = await _save_file(form, "tasks", Path(tmp), required=False)
                job = await self.service.submit(config, data, eval_data, principal, tasks)
        return JSONResponse(job.to_dict(), status_code=202)

    async def list(self, request: Request) -> Response:
        jobs = self.service.list_jobs(self.principal(request))
        return JSONResponse({"object": "list", "data": [job.to_dict() for job in jobs]})

    async def get(self, request: Request) -> Response:
        job = self.service.get(request.path_params["job_id"], self.principal(request))
        return JSONResponse(job.to_dict())

    async def cancel(self, request: Request) -> Response:
        job = await self.service.cancel(request.path_params["job_id"], self.principal(request))
        return JSONResponse(job.to_dict())

    async def events(self, request: Request) -> Response:
        watch = self.service.watch(request.path_params["job_id"], self.principal(request))

        async def events() -> AsyncIterator[dict[str, Any]]:
            async for kind, job in watch:
                yield {"type": kind, "job": job}

        return sse_response(await first_then_rest(events()), openai_error)

    async def evaluate(self, request: Request) -> Response:
        """Score the base model or a registered adapter on a JSONL file, through the server."""
        principal = self.principal(request)
        async with _form(request) as form:
            adapter_id = form.get("adapter_id") or None
            if adapter_id is not None and not isinstance(adapter_id, str):
                raise InvalidRequest("adapter_id must be a form field, not a file")
            if adapter_id and not principal.can_see(adapter_id):
                raise AdapterNotFound(f"adapter {adapter_id!r} is not registered")
            with tempfile.TemporaryDirectory(dir=self.service.store.tmp) as tmp:
                data = await _save_file(form, "data", Path(tmp), required=True)
                assert data is not None
                scores = await evaluate_file(self.service.server, data, adapter_id)
        return JSONResponse({"adapter_id": adapter_id, **scores.to_dict()})


def build_app(service: TrainerService, keys: ApiKeys) -> Starlette:
    routes = TrainerRoutes(service, keys)
    return Starlette(
        routes=[
            Route("/v1/training/jobs", routes.submit, methods=["POST"]),
            Route("/v1/training/jobs", routes.list, methods=["GET"]),
            Route("/v1/training/jobs/{job_id}", routes.get, methods=["GET"]),
            Route("/v1/training/jobs/{job_id}/events", routes.events, methods=["GET"]),
            Route("/v1/training/jobs/{job_id}/cancel", routes.cancel, methods=["POST"]),
            Route("/v1/evaluations", routes.evaluate, methods=["POST"]),
            Route("/health", lambda _: JSONResponse({"status": "ok"}), methods=["GET"]),
        ],
        exception_handlers={
            AdapterdError: _error_response,
            HTTPException: _routing_error,
            Exception: _internal_error,
        },
    )


async def _error_response(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, AdapterdError)
    body = openai_error(exc)
    if isinstance(exc, InvalidConfig):
        body["error"]["param"] = f"config.{exc.field}" if exc.field else "config"
    return JSONResponse(body, status_code=exc.http_status)


async def _routing_error(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, HTTPException)
    error = routing_error(exc, request.method, request.url.path)
    return JSONResponse(openai_error(error), status_code=error.http_status, headers=exc.headers)


async def _internal_error(request: Request, exc: Exception) -> Response:
    error = AdapterdError(f"internal error: {type(exc).__name__}")
    error.error_type = "internal"
    return JSONResponse(openai_error(error), status_code=500)


@asynccontextmanager
async def _form(request: Request) -> AsyncIterator[FormData]:
    """The multipart form, closed (its spooled files removed) on leaving the block."""
    if not request.headers.get("content-type", "").startswith("multipart/form-data"):
        raise InvalidRequest("send multipart/form-data")
    try:
        form = await request.form(max_files=3, max_fields=2, max_part_size=MAX_FIELD_BYTES)
    except MultiPartException as exc:
        raise InvalidRequest(f"malformed multipart body: {exc.message}") from exc
    try:
        yield form
    finally:
        await form.close()


def _json_field(form: FormData, name: str) -> Any:
    value = form.get(name)
    if value is None:
        raise InvalidRequest(f"the form needs a {name!r} field (JSON)")
    text = value if isinstance(value, str) else value.file.read()
    try:
        return parse_json(text, name)
    except InvalidRequest as exc:  # "config: not valid JSON (...)", as InvalidConfig words it
        raise InvalidConfig("", str(exc).removeprefix(f"{name}: ")) from exc


async def _save_file(form: FormData, name: str, directory: Path, required: bool) -> Path | None:
    value = form.get(name)
    if value is None:
        if required:
            raise InvalidRequest(f"the form needs a {name!r} file (JSONL)")
        return None
    path = directory / name
    if isinstance(value, str):
        path.write_text(value)
        return path
    assert isinstance(value, UploadFile)
    size = 0
    with path.open("wb") as out:
        while chunk := await value.read(CHUNK):
            size += len(chunk)
            if size > MAX_DATA_BYTES:
                raise PayloadTooLarge(f"{name} exceeds the {MAX_DATA_BYTES}-byte limit")
            out.write(chunk)
    return path
