"""gRPC runners: GrpcRunner (grpc channel) and AsyncGrpcRunner (grpc.aio channel). The generated stubs
work on both kinds of channel; the runners differ only in awaiting and in when the channel is made."""

from __future__ import annotations

import os
from collections.abc import AsyncIterable, AsyncIterator, Iterable, Iterator
from contextlib import AbstractContextManager, asynccontextmanager, contextmanager
from typing import Any

import grpc
import grpc.aio

from adapterd.clients._core import AsyncRunner, Call, Retry, StreamCall, SyncRunner, api_key_or_env
from adapterd.clients._grpc_protocol import GrpcRequest
from adapterd.clients.errors import NotFound, from_grpc
from adapterd.v1 import adapters_pb2_grpc, generation_pb2_grpc

ERROR_TYPE_KEY = "adapterd-error-type"  # trailing metadata naming the server's error_type, when sent


@contextmanager
def grpc_errors(not_found: type[NotFound]) -> Iterator[None]:
    """A failed call (sync or grpc.aio) as the typed error of its status code."""
    try:
        yield
    except grpc.RpcError as exc:
        error: Any = exc
        metadata = dict(error.trailing_metadata() or ())
        raise from_grpc(error.code().name, error.details(), metadata.get(ERROR_TYPE_KEY), not_found) from exc


class GrpcConnection:
    """What both gRPC runners hold: the target, call options, the retry policy and the stubs."""

    channel_module: Any  # grpc or grpc.aio: both have insecure_channel and secure_channel
    connects_at_init = True  # False for grpc.aio, whose channel belongs to the event loop that makes it

    def __init__(
        self,
        target: str | None = None,
        *,
        api_key: str | None = None,
        timeout: float | None = 60.0,
        max_retries: int = 2,
        credentials: grpc.ChannelCredentials | None = None,
    ) -> None:
        """`target` is "host:port", by default $ADAPTERD_GRPC_TARGET, else 127.0.0.1:50051; `credentials`
        (e.g. grpc.ssl_channel_credentials()) for TLS. `api_key` defaults to $ADAPTERD_API_KEY. `timeout` is
        each unary call's deadline (streams and uploads have none); only idempotent calls are retried
        (`max_retries` times, with backoff)."""
        self.target = target or os.environ.get("ADAPTERD_GRPC_TARGET") or "127.0.0.1:50051"
        self.retry = Retry(max_retries)
        self.timeout = timeout
        self._credentials = credentials
        key = api_key_or_env(api_key)
        self._metadata = (("authorization", f"Bearer {key}"),) if key else ()
        self._channel: Any = None
        self._stubs: dict[str, Any] = {}
        if self.connects_at_init:
            self._connect()

    def _connect(self) -> None:
        if self._credentials is None:
            self._channel = self.channel_module.insecure_channel(self.target)
        else:
            self._channel = self.channel_module.secure_channel(self.target, self._credentials)
        self._stubs = {
            "Generation": generation_pb2_grpc.GenerationStub(self._channel),
            "Adapters": adapters_pb2_grpc.AdaptersStub(self._channel),
        }

    def _rpc(self, request: GrpcRequest) -> Any:
        if self._channel is None:
            self._connect()
        return getattr(self._stubs[request.service], request.method)

    def _unary(self, call: Call[Any]) -> Any:
        """The stub's answer (sync) or awaitable (grpc.aio) for a request/response call."""
        request: GrpcRequest = call.request
        timeout = self.timeout if request.has_deadline else None
        return self._rpc(request)(request.message, timeout=timeout, metadata=self._metadata)

    @contextmanager
    def _streaming(self, call: StreamCall[Any]) -> Iterator[Any]:
        with grpc_errors(call.not_found):
            responses = self._rpc(call.request)(call.request.message, metadata=self._metadata)
            try:
                yield responses
            finally:
                responses.cancel()  # a no-op once the stream has ended


class GrpcRunner(GrpcConnection, SyncRunner):
    channel_module = grpc

    def _send(self, call: Call[Any]) -> Any:
        with grpc_errors(call.not_found):
            return self._unary(call)

    def _open(self, call: StreamCall[Any]) -> AbstractContextManager[Iterable[Any]]:
        return self._streaming(call)

    def close(self) -> None:
        if self._channel is not None:
            self._channel.close()
            self._channel = None


class AsyncGrpcRunner(GrpcConnection, AsyncRunner):
    """The grpc.aio channel is made at the first call, inside the event loop that makes it."""

    channel_module = grpc.aio
    connects_at_init = False

    async def _send(self, call: Call[Any]) -> Any:
        with grpc_errors(call.not_found):
            return await self._unary(call)

    @asynccontextmanager
    async def _open(self, call: StreamCall[Any]) -> AsyncIterator[AsyncIterable[Any]]:
        with self._streaming(call) as responses:
            yield responses

    async def close(self) -> None:
        if self._channel is not None:
            await self._channel.close()
            self._channel = None
