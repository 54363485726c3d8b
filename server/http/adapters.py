"""Adapter routes: upload (multipart or tar), list, show, delete, and vLLM's load/unload."""

from __future__ import annotations

import tempfile
from collections.abc import AsyncGenerator
from typing import IO, Any

from starlette.datastructures import UploadFile
from starlette.formparsers import MultiPartException, MultiPartParser
from starlette.requests import Request
from starlette.responses import JSONResponse, Response

from adapterd.adapters.archive import UnsafeUpload, extract_tar, write_files
from adapterd.adapters.format import CONFIG_FILE, WEIGHTS_FILE
from adapterd.server.errors import InvalidRequest, PayloadTooLarge
from adapterd.server.http.params import field, json_body
from adapterd.server.service import Service

CHUNK = 1 << 20


class AdapterRoutes:
    def __init__(self, service: Service, principal: Any) -> None:
        self.service = service
        self.principal = principal

    @property
    def max_bytes(self) -> int:
        return self.service.config.max_upload_bytes

    async def upload(self, http: Request) -> Response:
        adapter_id = http.path_params["adapter_id"]
        principal = self.principal(http)
        principal.require_owner(adapter_id)
        with self.service.llm.adapters.store.staging() as staged, await self._spool(http) as body:
            try:
                if http.headers.get("content-type", "").startswith("multipart/form-data"):
                    await self._write_form(http, body, staged)
                else:
                    extract_tar(body, staged, self.max_bytes)
            except UnsafeUpload as exc:
                raise InvalidRequest(str(exc)) from exc
            description, replaced = await self.service.upload(adapter_id, staged, principal)
        return JSONResponse(description, status_code=200 if replaced else 201)

    async def list(self, http: Request) -> Response:
        adapters = await self.service.list_adapters(self.principal(http))
        return JSONResponse({"object": "list", "data": adapters})

    async def show(self, http: Request) -> Response:
        return JSONResponse(
            await self.service.get_adapter(http.path_params["adapter_id"], self.principal(http))
        )

    async def delete(self, http: Request) -> Response:
        adapter_id = http.path_params["adapter_id"]
        deleted = await self.service.delete_adapter(adapter_id, self.principal(http))
        return JSONResponse({**deleted, "deleted": True})

    async def load_lora(self, http: Request) -> Response:
        body = await json_body(http)
        name, path = field(body, "lora_name", str), field(body, "lora_path", str)
        if not name or not path:
            raise InvalidRequest("lora_name and lora_path are required")
        return JSONResponse(await self.service.load_from_path(name, path, self.principal(http)))

    async def unload_lora(self, http: Request) -> Response:
        name = field(await json_body(http), "lora_name", str)
        if not name:
            raise InvalidRequest("lora_name is required")
        deleted = await self.service.delete_adapter(name, self.principal(http))
        return JSONResponse({**deleted, "deleted": True})

    async def _spool(self, http: Request) -> IO[bytes]:
        """The request body in a temporary file, refused once it passes the upload limit."""
        declared = http.headers.get("content-length")
        if declared and declared.isdigit() and int(declared) > self.max_bytes:
            raise PayloadTooLarge(f"upload of {declared} bytes exceeds the {self.max_bytes}-byte limit")
        body = tempfile.TemporaryFile()  # noqa: SIM115 - returned to the caller, who closes it
        size = 0
        async for chunk in http.stream():
            size += len(chunk)
            if size > self.max_bytes:
                body.close()
                raise PayloadTooLarge(f"upload exceeds the {self.max_bytes}-byte limit")
            body.write(chunk)
        body.seek(0)
        return body

    async def _write_form(self, http: Request, body: IO[bytes], staged: Any) -> None:
        async def stream() -> AsyncGenerator[bytes, None]:
            while chunk := body.read(CHUNK):
                yield chunk

        try:
            form = await MultiPartParser(http.headers, stream(), max_files=4, max_fields=4).parse()
        except MultiPartException as exc:
            raise InvalidRequest(f"malformed multipart body: {exc.message}") from exc
        files = {}
        for name, value in form.multi_items():
            if not isinstance(value, UploadFile):
                raise InvalidRequest(f"form field {name!r} must be a file")
            files[name if name in (CONFIG_FILE, WEIGHTS_FILE) else value.filename or name] = value.file
        try:
            write_files(files, staged, self.max_bytes)
        finally:
            await form.close()
