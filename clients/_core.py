"""The mechanism behind every client: each public method is written once, as a function that builds a
`Call` (what to send and how to read the answer) or a `StreamCall`; a runner sends it.

`@endpoint` / `@stream_endpoint` turn such a builder into the client method. On a `SyncRunner` the method
returns the result (or an iterator); on an `AsyncRunner` the same method returns an awaitable (or an
async iterator). The two runners are the only code where sync and async differ, and they differ only in
sending, sleeping and iterating; request building, parsing and error mapping are shared plain functions.
"""

from __future__ import annotations

import asyncio
import functools
import inspect
import os
import random
import time
from abc import ABC, abstractmethod
from collections.abc import AsyncIterable, AsyncIterator, Awaitable, Callable, Iterable, Iterator
from contextlib import AbstractAsyncContextManager, AbstractContextManager
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Concatenate, Generic, ParamSpec, TypeVar, overload

from adapterd.clients.errors import AdapterNotFound, NotFound, Unavailable

if TYPE_CHECKING:
    from typing_extensions import Self

P = ParamSpec("P")
T = TypeVar("T")


@dataclass(frozen=True)
class Call(Generic[T]):
    """One request/response call. `parse` reads the decoded answer into the result, or into the next Call
    to make (a method that needs two round trips). Only idempotent calls are retried."""

    request: Any  # the transport's own request: HttpRequest or GrpcRequest
    parse: Callable[[Any], T | Call[T]]
    idempotent: bool = False
    not_found: type[NotFound] = AdapterNotFound  # what a 404 / NOT_FOUND means for this call


@dataclass(frozen=True)
class StreamCall(Generic[T]):
    """A call answered by a stream of events. `reader()` makes a fresh reader per stream, which turns each
    event into the items to yield (none, one or more); it may keep state across events."""

    request: Any
    reader: Callable[[], Callable[[Any], Iterable[T]]]
    not_found: type[NotFound] = AdapterNotFound


@dataclass(frozen=True)
class Retry:
    """Exponential backoff with jitter for idempotent calls that found the server Unavailable."""

    max_retries: int = 2
    backoff: float = 0.5
    max_backoff: float = 8.0

    def delays(self, call: Call[Any]) -> Iterator[float]:
        if not call.idempotent:
            return
        for attempt in range(self.max_retries):
            yield min(self.max_backoff, self.backoff * 2**attempt) * random.uniform(0.5, 1.0)


def api_key_or_env(api_key: str | None) -> str | None:
    """The API key given, else $ADAPTERD_API_KEY, else none (an open server)."""
    return api_key if api_key is not None else os.environ.get("ADAPTERD_API_KEY") or None


class SyncRunner(ABC):
    retry: Retry

    def _call(self, call: Call[T]) -> T:
        delays = self.retry.delays(call)
        while True:
            try:
                result = call.parse(self._send(call))
            except Unavailable:
                if (delay := next(delays, None)) is None:
                    raise
                time.sleep(delay)
                continue
            if not isinstance(result, Call):
                return result
            call, delays = result, self.retry.delays(result)

    def _stream(self, call: StreamCall[T]) -> Iterator[T]:
        read = call.reader()
        with self._open(call) as events:
            for event in events:
                yield from read(event)

    @abstractmethod
    def _send(self, call: Call[Any]) -> Any:
        """Send the call's request; its decoded answer, or the typed error."""

    @abstractmethod
    def _open(self, call: StreamCall[Any]) -> AbstractContextManager[Iterable[Any]]:
        """Send the call's request; its decoded events while open. Closing early cancels the call."""

    @abstractmethod
    def close(self) -> None: ...

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()


class AsyncRunner(ABC):
    retry: Retry

    async def _call(self, call: Call[T]) -> T:
        delays = self.retry.delays(call)
        while True:
            try:
                result = call.parse(await self._send(call))
            except Unavailable:
                if (delay := next(delays, None)) is None:
                    raise
                await asyncio.sleep(delay)
                continue
            if not isinstance(result, Call):
                return result
            call, delays = result, self.retry.delays(result)

    async def _stream(self, call: StreamCall[T]) -> AsyncIterator[T]:
        read = call.reader()
        async with self._open(call) as events:
            async for event in events:
                for item in read(event):
                    yield item

    @abstractmethod
    async def _send(self, call: Call[Any]) -> Any: ...

    @abstractmethod
    def _open(self, call: StreamCall[Any]) -> AbstractAsyncContextManager[AsyncIterable[Any]]: ...

    @abstractmethod
    async def close(self) -> None: ...

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.close()


class endpoint(Generic[P, T]):
    """`method(self, ...) -> Call[T]` as a client method: `-> T` on a SyncRunner, `-> Awaitable[T]` on an
    AsyncRunner. The builder runs when the method is called; the runner sends what it built."""

    def __init__(self, build: Callable[Concatenate[Any, P], Call[T]]) -> None:
        self.build = build
        self.__doc__ = build.__doc__

    @overload
    def __get__(self, runner: None, owner: type) -> Self: ...
    @overload
    def __get__(self, runner: SyncRunner, owner: type) -> Callable[P, T]: ...
    @overload
    def __get__(self, runner: AsyncRunner, owner: type) -> Callable[P, Awaitable[T]]: ...
    def __get__(self, runner: Any, owner: type) -> Any:
        return self if runner is None else _bound(self.build, runner, runner._call)


class stream_endpoint(Generic[P, T]):
    """`method(self, ...) -> StreamCall[T]` as a client method: `-> Iterator[T]` on a SyncRunner,
    `-> AsyncIterator[T]` on an AsyncRunner. The request is sent when iteration starts."""

    def __init__(self, build: Callable[Concatenate[Any, P], StreamCall[T]]) -> None:
        self.build = build
        self.__doc__ = build.__doc__

    @overload
    def __get__(self, runner: None, owner: type) -> Self: ...
    @overload
    def __get__(self, runner: SyncRunner, owner: type) -> Callable[P, Iterator[T]]: ...
    @overload
    def __get__(self, runner: AsyncRunner, owner: type) -> Callable[P, AsyncIterator[T]]: ...
    def __get__(self, runner: Any, owner: type) -> Any:
        return self if runner is None else _bound(self.build, runner, runner._stream)


def _bound(build: Callable[..., Any], runner: Any, send: Callable[[Any], Any]) -> Callable[..., Any]:
    @functools.wraps(build)
    def method(*args: Any, **kwargs: Any) -> Any:
        return send(build(runner, *args, **kwargs))

    signature = inspect.signature(build)
    parameters = list(signature.parameters.values())[1:]  # without self; the runner decides what returns
    method.__signature__ = signature.replace(parameters=parameters, return_annotation=inspect.Signature.empty)  # type: ignore[attr-defined]
    return method
