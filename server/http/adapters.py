"""Adapter routes: upload (multipart or tar), list, show, delete, and vLLM's load/unload.

A multipart upload may carry the adapter's metadata: a `metadata` field (text, or a file) holding a JSON
object, stored with the version and shown in its description. Tar uploads carry none.
"""

from __future__ import annotations

import asyncio
import tempfile
from collections.abc import AsyncGenerator
from typing import IO, Any

from starlette.datastructures import UploadFile
from starlette.formparsers import MultiPartException, MultiPartParser
from starlette.requests import Request
from starlette.responses import JSONResponse, Response

from adapterd.adapters.archive import UnsafeUpload, extract_tar, write_files
from adapterd.adapters.format import CONFIG_FILE, WEIGHTS_FILE
from adapterd.server.common.errors import InvalidRequest
from adapterd.server.host.service import MAX_METADATA_BYTES, Service
from adapterd.server.wire.params import body_chunks, field, json_body, parse_json

CHUNK = 1 << 20
METADATA_FIELD = "metadata"
SPOOL_WRITE_BYTES = 4 * 1024**2


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
        if METADATA_FIELD in http.query_params:  # refused rather than silently dropped
            raise InvalidRequest(
                "metadata: send it as a multipart form field (a JSON object), not in the query string; "
                "tar uploads carry no metadata"
            )
        metadata = None
        with self.service.llm.adapters.store.staging() as staged, await self._spool(http) as body:
            try:
                if http.headers.get("content-type", "").startswith("multipart/form-data"):
                    metadata = await self._write_form(http, body, staged)
                else:
                    # gunzip, checks and writes: in a thread, off the event loop
                    await asyncio.to_thread(extract_tar, body, staged, self.max_bytes)
            except UnsafeUpload as exc:
                raise InvalidRequest(str(exc)) from exc
            description, replaced = await self.service.upload(adapter_id, staged, principal, metadata)
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
        body = tempfile.TemporaryFile()  # noqa: SIM115 - returned to the caller, who closes it
        pending = bytearray()
        try:
            async for chunk in body_chunks(http, self.max_bytes, "upload"):
                pending += chunk
                if len(pending) >= SPOOL_WRITE_BYTES:  # written off the event loop, a few MB at a time
                    await asyncio.to_thread(body.write, bytes(pending))
                    pending.clear()
            await asyncio.to_thread(body.write, bytes(pending))
        except BaseException:
            body.close()
            raise
        body.seek(0)
        return body

    async def _write_form(self, http: Request, body: IO[bytes], staged: Any) -> dict[str, Any] | None:
        """Write the form's adapter files into `staged`; return its metadata (None when absent)."""

        async def stream() -> AsyncGenerator[bytes, None]:
            while chunk := body.read(CHUNK):
                yield chunk

        # Text fields are held in memory up to max_part_size; metadata is the only one a form may have.
        parser = MultiPartParser(
            http.headers, stream(), max_files=4, max_fields=4, max_part_size=MAX_METADATA_BYTES
        )
        try:
            form = await parser.parse()
        except MultiPartException as exc:
            raise InvalidRequest(_form_problem(parser, exc)) from exc
        try:
            files, metadata = {}, None
            for name, value in form.multi_items():
                if name == METADATA_FIELD:
                    if metadata is not None:
                        raise InvalidRequest("metadata: the form has more than one metadata field")
                    metadata = parse_metadata(value if isinstance(value, str) else await _head(value))
                elif not isinstance(value, UploadFile):
                    raise InvalidRequest(f"form field {name!r} must be a file")
                else:
                    file_name = name if name in (CONFIG_FILE, WEIGHTS_FILE) else value.filename or name
                    if file_name in files:  # which one to keep would be a guess
                        raise InvalidRequest(f"the form sends {file_name} more than once")
                    files[file_name] = value.file
            await asyncio.to_thread(write_files, files, staged, self.max_bytes)
        finally:
            await form.close()
        return metadata


def parse_metadata(raw: str | bytes) -> dict[str, Any]:
    """The `metadata` form field: a JSON object of at most MAX_METADATA_BYTES bytes (UTF-8)."""
    data = raw.encode() if isinstance(raw, str) else raw
    if len(data) > MAX_METADATA_BYTES:
        raise InvalidRequest(f"metadata: exceeds the {MAX_METADATA_BYTES}-byte limit")
    value = parse_json(data, "metadata")
    if not isinstance(value, dict):
        raise InvalidRequest(f"metadata: must be a JSON object, not {_json_type(value)}")
    return value


def _json_type(value: Any) -> str:
    names = {list: "an array", str: "a string", bool: "a boolean", int: "a number", float: "a number"}
    return "null" if value is None else names.get(type(value), type(value).__name__)


async def _head(upload: UploadFile) -> bytes:
    """A metadata field sent as a file: enough of it to parse, or to tell that it is too large."""
    return await upload.read(MAX_METADATA_BYTES + 1)


def _form_problem(parser: MultiPartParser, exc: MultiPartException) -> str:
    """The parser's complaint; a text field over the size limit is named (Starlette's message is not)."""
    if exc.message.startswith("Part exceeded maximum size"):
        name = getattr(getattr(parser, "_current_part", None), "field_name", None)
        if name == METADATA_FIELD:
            return f"metadata: exceeds the {MAX_METADATA_BYTES}-byte limit"
        if name:
            return f"form field {name!r} must be a file"
    return f"malformed multipart body: {exc.message}"
