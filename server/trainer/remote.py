"""The adapterd server as the trainer sees it: its info, generation for evaluation, and adapter uploads.

Everything goes through the server's public APIs: HTTP, or gRPC for uploads when `--server-grpc` is given.
Both uploads record the same metadata with the adapter and answer the same description. Kept in this one
module so it can move onto `adapterd.clients` once that package exists.
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import httpx

from adapterd.adapters.format import CONFIG_FILE, WEIGHTS_FILE
from adapterd.server.common.errors import AdapterdError, AdapterNotFound, InvalidRequest, Overloaded
from adapterd.server.trainer.data import Example
from adapterd.server.trainer.errors import ServerUnavailable

CHUNK_BYTES = 1 << 20
TIMEOUT = httpx.Timeout(600.0, connect=10.0)


class ServerClient:
    def __init__(self, url: str, api_key: str | None = None, grpc_target: str | None = None) -> None:
        self.url = url.rstrip("/")
        self.api_key = api_key
        self.grpc_target = grpc_target
        headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        self.http = httpx.AsyncClient(base_url=self.url, headers=headers, timeout=TIMEOUT)

    async def close(self) -> None:
        await self.http.aclose()

    async def info(self) -> dict[str, Any]:
        return await self._call("GET", "/info")

    async def adapter(self, adapter_id: str) -> dict[str, Any]:
        return await self._call("GET", f"/v1/adapters/{adapter_id}")

    async def generate(self, example: Example, adapter_id: str | None, base_name: str, budget: int) -> str:
        """Greedy text for one example: /generate for a prompt, /v1/chat/completions for messages."""
        if example.messages is None:
            parameters = {"max_new_tokens": budget, "adapter_id": adapter_id or ""}
            body = await self._call(
                "POST", "/generate", json={"inputs": example.prompt, "parameters": parameters}
            )
            return str(body["generated_text"])
        chat = {
            "model": adapter_id or base_name,
            "messages": list(example.messages),
            "max_tokens": budget,
            "temperature": 0,
        }
        body = await self._call("POST", "/v1/chat/completions", json=chat)
        return str(body["choices"][0]["message"]["content"])

    async def upload_adapter(
        self, adapter_id: str, adapter_dir: Path, metadata: dict[str, Any]
    ) -> dict[str, Any]:
        """Upload a PEFT directory with its metadata (a JSON object, stored with the adapter); the server
        serves it at once. Answers the server's description of the adapter."""
        if self.grpc_target:
            return await self._upload_grpc(adapter_id, adapter_dir, metadata)
        with (
            (adapter_dir / CONFIG_FILE).open("rb") as config,
            (adapter_dir / WEIGHTS_FILE).open("rb") as weights,
        ):
            files = {CONFIG_FILE: (CONFIG_FILE, config), WEIGHTS_FILE: (WEIGHTS_FILE, weights)}
            form = {"metadata": json.dumps(metadata, ensure_ascii=False, allow_nan=False)}
            return await self._call("PUT", f"/v1/adapters/{adapter_id}", data=form, files=files)

    async def _upload_grpc(
        self, adapter_id: str, adapter_dir: Path, metadata: dict[str, Any]
    ) -> dict[str, Any]:
        import grpc

        from adapterd.v1 import adapters_pb2, adapters_pb2_grpc

        header = adapters_pb2.UploadHeader(
            id=adapter_id, adapter_config=(adapter_dir / CONFIG_FILE).read_bytes()
        )
        header.metadata.update(metadata)

        async def parts() -> AsyncIterator[Any]:
            yield adapters_pb2.UploadAdapterRequest(header=header)
            with (adapter_dir / WEIGHTS_FILE).open("rb") as weights:
                while chunk := weights.read(CHUNK_BYTES):
                    yield adapters_pb2.UploadAdapterRequest(weights_chunk=chunk)

        auth = (("authorization", f"Bearer {self.api_key}"),) if self.api_key else ()
        assert self.grpc_target is not None
        async with grpc.aio.insecure_channel(self.grpc_target) as channel:
            try:
                response = await adapters_pb2_grpc.AdaptersStub(channel).UploadAdapter(parts(), metadata=auth)
            except grpc.aio.AioRpcError as exc:
                raise _grpc_error(exc, self.grpc_target) from exc
        return adapter_dict(response.adapter)

    async def _call(self, method: str, path: str, **kwargs: Any) -> Any:
        try:
            response = await self.http.request(method, path, **kwargs)
        except httpx.HTTPError as exc:
            raise ServerUnavailable(f"cannot reach the adapterd server at {self.url}: {exc}") from exc
        if response.status_code >= 400:
            raise _http_error(response)
        return response.json()


def adapter_dict(message: Any) -> dict[str, Any]:
    """A gRPC `Adapter` as the HTTP description: every field present, integers as numbers, an unset
    rank / num_virtual_tokens as None."""
    from google.protobuf import json_format

    description = json_format.MessageToDict(
        message,
        always_print_fields_with_no_presence=True,
        preserving_proto_field_name=True,
        unquote_int64_if_possible=True,
    )
    for name in ("rank", "num_virtual_tokens"):
        description.setdefault(name, None)
    return description


def _http_error(response: httpx.Response) -> AdapterdError:
    """The server's error as ours: its message, and a status that keeps the client's fault the client's."""
    try:
        error = response.json().get("error")
        message = error.get("message") if isinstance(error, dict) else error
    except (ValueError, AttributeError):
        message = None
    return _error(
        response.status_code, f"the server answered {response.status_code}: {message or response.text}"
    )


def _grpc_error(exc: Any, target: str) -> AdapterdError:
    statuses = {"NOT_FOUND": 404, "INVALID_ARGUMENT": 400, "RESOURCE_EXHAUSTED": 429, "UNAVAILABLE": 503}
    status = statuses.get(exc.code().name, 502)
    return _error(status, f"the server at {target} answered {exc.code().name}: {exc.details()}")


def _error(status: int, message: str) -> AdapterdError:
    if status == 404:
        return AdapterNotFound(message)
    if status in (400, 413, 422):
        return InvalidRequest(message)
    if status == 429:
        return Overloaded(message)
    return ServerUnavailable(message)
