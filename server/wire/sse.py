"""Server-sent events over a `Service` stream; leaving the response early cancels the request."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from typing import Any

from starlette.responses import StreamingResponse

from adapterd.server.common.errors import AdapterdError

SSE_HEADERS = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}


def sse_line(payload: Any) -> str:
    return f"data: {payload if isinstance(payload, str) else json.dumps(payload, ensure_ascii=False)}\n\n"


def sse_response(chunks: AsyncIterator[Any], on_error: Any) -> StreamingResponse:
    """Stream `chunks` as SSE `data:` lines; an error after the headers went out becomes an error event."""

    async def body() -> AsyncIterator[str]:
        try:
            async for chunk in chunks:
                yield sse_line(chunk)
        except AdapterdError as exc:
            yield sse_line(on_error(exc))
        finally:
            await chunks.aclose()  # type: ignore[attr-defined]

    return StreamingResponse(body(), media_type="text/event-stream", headers=SSE_HEADERS)


async def first_then_rest(chunks: AsyncIterator[Any]) -> AsyncIterator[Any]:
    """Pull the first chunk now (so errors before generation become plain HTTP errors), then the rest."""
    first = await chunks.__anext__()

    async def rest() -> AsyncIterator[Any]:
        try:
            yield first
            async for chunk in chunks:
                yield chunk
        finally:
            await chunks.aclose()  # type: ignore[attr-defined]

    return rest()
