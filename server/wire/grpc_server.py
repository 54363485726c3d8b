"""A grpc.aio server as both of ours run it (`adapterd serve`, `adapterd trainer`): one bounded message size,
standard health checking and reflection, and a bind failure that says what to do."""

from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import Any

import grpc
from google.protobuf.message import DecodeError
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

# Uploads arrive in chunks; this bounds one message (a chunk), not the upload (--max-upload-bytes does).
MAX_MESSAGE_BYTES = 64 * 1024**2


class GrpcBindError(OSError):
    pass


@dataclass
class GrpcServer:
    server: grpc.aio.Server
    health: health.aio.HealthServicer

    async def set_serving(self, serving: bool, service_names: Sequence[str]) -> None:
        """Report every service, and the server as a whole, SERVING or NOT_SERVING to health checkers."""
        status = (
            health_pb2.HealthCheckResponse.SERVING if serving else health_pb2.HealthCheckResponse.NOT_SERVING
        )
        for name in ("", *service_names):
            await self.health.set(name, status)

    async def stop(self, grace: float) -> None:
        """Report NOT_SERVING to health checkers first, then finish in-flight calls for `grace` seconds."""
        await self.health.enter_graceful_shutdown()
        await self.server.stop(grace)


# (request streaming, response streaming) -> the handler's behaviour attribute and its constructor
_HANDLER_KINDS = {
    (False, False): ("unary_unary", grpc.unary_unary_rpc_method_handler),
    (False, True): ("unary_stream", grpc.unary_stream_rpc_method_handler),
    (True, False): ("stream_unary", grpc.stream_unary_rpc_method_handler),
    (True, True): ("stream_stream", grpc.stream_stream_rpc_method_handler),
}


class MalformedMessagesAreInvalid(grpc.aio.ServerInterceptor):
    """A request that is not a valid protobuf message of its method's type (corrupt bytes, a string field
    that is not UTF-8) ends with INVALID_ARGUMENT: grpcio's own deserializer would answer UNKNOWN, before
    any servicer runs. Each handler takes raw bytes and parses them here instead."""

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler]],
        details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler:
        handler = await continuation(details)
        if handler is None or handler.request_deserializer is None:
            return handler
        streaming = (handler.request_streaming, handler.response_streaming)
        name, make = _HANDLER_KINDS[streaming]
        behaviour = _parsing(getattr(handler, name), handler.request_deserializer, details.method, *streaming)
        return make(behaviour, request_deserializer=None, response_serializer=handler.response_serializer)


async def _parsed(parse: Callable[[bytes], Any], raw: bytes, method: str, context: Any) -> Any:
    try:
        return parse(raw)
    except DecodeError as exc:
        await context.abort(
            grpc.StatusCode.INVALID_ARGUMENT, f"{method}: not a valid request message ({exc})"
        )


async def _each_parsed(
    requests: AsyncIterator[bytes], parse: Callable[[bytes], Any], method: str, context: Any
) -> AsyncIterator[Any]:
    async for raw in requests:
        yield await _parsed(parse, raw, method, context)


def _parsing(
    behaviour: Any,
    parse: Callable[[bytes], Any],
    method: str,
    request_streaming: bool,
    response_streaming: bool,
) -> Any:
    """`behaviour` taking raw bytes (or a stream of them), parsed by `parse`. grpc.aio runs a behaviour as a
    coroutine or an async generator only when it is one, so the wrapper is one too."""

    async def request(incoming: Any, context: Any) -> Any:
        if request_streaming:
            return _each_parsed(incoming, parse, method, context)
        return await _parsed(parse, incoming, method, context)

    if response_streaming:

        async def stream(incoming: Any, context: Any) -> AsyncIterator[Any]:
            async for reply in behaviour(await request(incoming, context), context):
                yield reply

        return stream

    async def unary(incoming: Any, context: Any) -> Any:
        return await behaviour(await request(incoming, context), context)

    return unary


async def start_server(
    address: str,
    add_servicers: Callable[[grpc.aio.Server], None],
    service_names: Sequence[str],
    serving: bool = True,
) -> GrpcServer:
    """Serve what `add_servicers` adds (the services `service_names`), health and reflection on `address`
    ("host:port"); each service, and the server as a whole, reports SERVING once it listens (`serving`
    False: NOT_SERVING, until `set_serving`)."""
    server = grpc.aio.server(
        interceptors=[MalformedMessagesAreInvalid()],
        options=[
            ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
            ("grpc.so_reuseport", 0),  # a port already in use is an error, not a second listener
        ],
    )
    add_servicers(server)
    health_servicer = health.aio.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    reflection.enable_server_reflection(
        (*service_names, health.SERVICE_NAME, reflection.SERVICE_NAME), server
    )
    try:
        server.add_insecure_port(address)
    except RuntimeError as exc:  # grpc only says "Failed to bind"; the usual causes are these
        raise GrpcBindError(
            f"cannot serve gRPC on {address}: the port is in use or the address is not valid here "
            "(choose another with --grpc-port / --host)"
        ) from exc
    status = health_pb2.HealthCheckResponse.SERVING if serving else health_pb2.HealthCheckResponse.NOT_SERVING
    for name in ("", *service_names):
        await health_servicer.set(name, status)
    await server.start()
    return GrpcServer(server, health_servicer)
