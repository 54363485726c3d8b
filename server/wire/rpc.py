"""What every servicer method shares: authentication from metadata and the one error table's gRPC side.

`@rpc` wraps a servicer method written as `method(self, request, principal)` (a coroutine, or an async
generator for server streaming) into the `method(self, request, context)` that grpc.aio calls. Each
`AdapterdError` ends the call with its `grpc_code`; anything else is a bug: logged, answered INTERNAL.
"""

from __future__ import annotations

import functools
import inspect
import logging
from collections.abc import AsyncIterator, Callable
from contextlib import aclosing
from typing import Any, Protocol

import grpc

from adapterd.server.common.auth import ApiKeys
from adapterd.server.common.config import REPLICA_HEADER
from adapterd.server.common.errors import AdapterdError, bounded

log = logging.getLogger("adapterd.grpc")


class Servicer(Protocol):
    keys: ApiKeys  # the keys `@rpc` authenticates callers with


async def name_the_replica(servicer: Servicer, context: grpc.aio.ServicerContext) -> None:
    """A servicer with a `replica` name sends it first, as `x-adapterd-replica` initial metadata."""
    replica = getattr(servicer, "replica", None)
    if replica:
        await context.send_initial_metadata(((REPLICA_HEADER, replica),))


def authorization(context: grpc.aio.ServicerContext) -> str | None:
    """The `authorization` metadata value (`Bearer KEY` or the bare key), if sent."""
    for key, value in context.invocation_metadata() or ():
        if key == "authorization":
            return value if isinstance(value, str) else value.decode()
    return None


async def abort(context: grpc.aio.ServicerContext, exc: Exception, method: str) -> None:
    """End the call (`context.abort` raises): an AdapterdError with its own code and message; anything
    else is a bug of ours, logged and answered INTERNAL."""
    if isinstance(exc, AdapterdError):  # the error type travels too, so clients raise the same class as HTTP
        context.set_trailing_metadata((("adapterd-error-type", exc.error_type),))
        await context.abort(grpc.StatusCode[exc.grpc_code], bounded(str(exc)))
    log.error("gRPC %s failed", method, exc_info=exc)
    await context.abort(
        grpc.StatusCode.INTERNAL, f"internal error ({type(exc).__name__}); see the server log"
    )


def rpc(method: Callable[..., Any]) -> Callable[..., Any]:
    """Authenticate the caller, run `method(self, request, principal)`, map its errors to status codes."""
    if inspect.isasyncgenfunction(method):

        @functools.wraps(method)
        async def stream(
            self: Servicer, request: Any, context: grpc.aio.ServicerContext
        ) -> AsyncIterator[Any]:
            try:
                await name_the_replica(self, context)
                principal = self.keys.authenticate(authorization(context))
                # aclosing: a cancelled call closes the method's generator, which closes the Service's stream.
                async with aclosing(method(self, request, principal)) as messages:
                    async for message in messages:
                        yield message
            except Exception as exc:
                await abort(context, exc, method.__qualname__)

        return stream

    @functools.wraps(method)
    async def unary(self: Servicer, request: Any, context: grpc.aio.ServicerContext) -> Any:
        try:
            await name_the_replica(self, context)
            return await method(self, request, self.keys.authenticate(authorization(context)))
        except Exception as exc:
            await abort(context, exc, method.__qualname__)

    return unary
