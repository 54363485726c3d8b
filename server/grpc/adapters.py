"""The `adapterd.v1.Adapters` servicer: list, describe, upload (client streaming) and delete adapters."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

from google.protobuf import json_format

from adapterd.adapters.format import CONFIG_FILE, WEIGHTS_FILE
from adapterd.server.common.auth import ApiKeys, Principal
from adapterd.server.common.errors import InvalidRequest, PayloadTooLarge
from adapterd.server.host.service import Service, check_metadata
from adapterd.server.wire.rpc import rpc
from adapterd.v1 import adapters_pb2 as pb
from adapterd.v1 import adapters_pb2_grpc

# Description keys copied as they are; rank / num_virtual_tokens are set only when present.
PLAIN_FIELDS = ("id", "type", "target_modules", "base_model", "version", "sha256", "size_bytes", "created_at")


def adapter_message(description: dict[str, Any]) -> pb.Adapter:
    """A `Service` description dict as the proto message."""
    message = pb.Adapter(**{name: description[name] for name in PLAIN_FIELDS})
    message.residency = description.get("residency", "disk")
    for name in ("rank", "num_virtual_tokens"):
        if description.get(name) is not None:
            setattr(message, name, description[name])
    message.metadata.update(description.get("metadata") or {})
    return message


async def read_header(parts: AsyncIterator[pb.UploadAdapterRequest]) -> pb.UploadHeader:
    first = await anext(parts, None)
    if first is None or first.WhichOneof("part") != "header":
        raise InvalidRequest(
            "the first message of an upload must be a header (the adapter id and adapter_config.json)"
        )
    return first.header


async def receive_weights(
    parts: AsyncIterator[pb.UploadAdapterRequest], path: Path, size: int, max_bytes: int
) -> None:
    """Write the remaining weights chunks to `path`; `size` bytes came before, `max_bytes` is the limit."""
    start = size
    with open(path, "xb") as weights:
        async for part in parts:
            if part.WhichOneof("part") != "weights_chunk":
                raise InvalidRequest(
                    "only the first message of an upload may be a header; then weights chunks"
                )
            size += len(part.weights_chunk)
            check_size(size, max_bytes)
            await asyncio.to_thread(weights.write, part.weights_chunk)  # up to 64 MB: off the event loop
    if size == start:
        raise InvalidRequest(f"no weights: send {WEIGHTS_FILE} in weights_chunk messages after the header")


def check_size(size: int, max_bytes: int) -> None:
    if size > max_bytes:
        raise PayloadTooLarge(f"upload exceeds the {max_bytes}-byte limit (--max-upload-bytes)")


def struct_dict(struct: Any) -> dict[str, Any]:
    """The header's metadata as a dict; a NaN or infinite number (no JSON for it) is the client's error."""
    try:
        metadata: dict[str, Any] = json_format.MessageToDict(struct)
    except ValueError as exc:
        raise InvalidRequest(f"metadata: {exc}") from exc
    return metadata


class AdaptersServicer(adapters_pb2_grpc.AdaptersServicer):
    def __init__(self, service: Service, keys: ApiKeys) -> None:
        self.service = service
        self.keys = keys
        self.replica = service.config.replica  # sent as x-adapterd-replica metadata

    @rpc
    async def ListAdapters(
        self, request: pb.ListAdaptersRequest, principal: Principal
    ) -> pb.ListAdaptersResponse:
        adapters = await self.service.list_adapters(principal)
        return pb.ListAdaptersResponse(adapters=[adapter_message(a) for a in adapters])

    @rpc
    async def GetAdapter(self, request: pb.GetAdapterRequest, principal: Principal) -> pb.Adapter:
        return adapter_message(await self.service.get_adapter(request.id, principal))

    @rpc
    async def DeleteAdapter(
        self, request: pb.DeleteAdapterRequest, principal: Principal
    ) -> pb.DeleteAdapterResponse:
        await self.service.delete_adapter(request.id, principal)
        return pb.DeleteAdapterResponse()

    @rpc
    async def UploadAdapter(
        self, requests: AsyncIterator[pb.UploadAdapterRequest], principal: Principal
    ) -> pb.UploadAdapterResponse:
        parts = aiter(requests)
        header = await read_header(parts)
        principal.require_owner(header.id)  # before receiving any weights
        metadata = struct_dict(header.metadata) if header.HasField("metadata") else None
        if metadata is not None:
            check_metadata(metadata)  # before receiving any weights, too
        config, max_bytes = header.adapter_config, self.service.config.max_upload_bytes
        check_size(len(config), max_bytes)
        with self.service.llm.adapters.store.staging() as staged:
            (staged / CONFIG_FILE).write_bytes(config)
            await receive_weights(parts, staged / WEIGHTS_FILE, len(config), max_bytes)
            description, replaced = await self.service.upload(header.id, staged, principal, metadata)
        return pb.UploadAdapterResponse(adapter=adapter_message(description), replaced=replaced)
