"""A non-streaming answer whose client left is not computed to the end: the work is cancelled (the engine
drops its sequences within a step), as a streaming response's is when the stream closes."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable
from contextlib import suppress
from typing import TypeVar

from starlette.requests import Request

T = TypeVar("T")


class ClientDisconnected(Exception):
    """The client closed the connection before its answer was ready; nobody is left to answer."""


async def unless_disconnected(http: Request, work: Awaitable[T]) -> T:
    """`work`'s result, or ClientDisconnected once the client goes away first (`work` cancelled). Call it
    after the body was read: from then on the only message the connection can bring is the disconnect."""
    task = asyncio.ensure_future(work)
    watcher = asyncio.create_task(_disconnect(http))
    try:
        await asyncio.wait({task, watcher}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        watcher.cancel()
    if task.done():
        return task.result()
    task.cancel()
    with suppress(asyncio.CancelledError):
        await task
    raise ClientDisconnected


async def _disconnect(http: Request) -> None:
    while (await http.receive())["type"] != "http.disconnect":
        pass
