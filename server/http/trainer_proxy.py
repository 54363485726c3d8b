"""With `--trainer URL`, the server forwards the trainer's HTTP routes as they are (bodies and event streams
streamed both ways, the caller's key passed on), so the console and any client reach training through one
origin. The trainer checks the key and answers; the server adds nothing of its own but a 502 when the trainer
cannot be reached."""

from __future__ import annotations

from collections.abc import AsyncIterator
from urllib.parse import quote

import httpx
from starlette.requests import Request
from starlette.responses import Response, StreamingResponse
from starlette.routing import Route

from adapterd.server.common.errors import TrainerUnreachable

TRAINER_ROUTES = (
    ("/v1/training/jobs", ("GET", "POST")),
    ("/v1/training/jobs/{job_id}", ("GET",)),
    ("/v1/training/jobs/{job_id}/events", ("GET",)),
    ("/v1/training/jobs/{job_id}/cancel", ("POST",)),
    ("/v1/evaluations", ("POST",)),
)
REQUEST_HEADERS = ("authorization", "content-type", "content-length", "accept")
RESPONSE_HEADERS = ("content-type", "cache-control")
# Event streams stay open while a job runs: no read timeout; a trainer that is down is noticed at connect.
TIMEOUT = httpx.Timeout(connect=5.0, read=None, write=60.0, pool=5.0)


class TrainerProxy:
    def __init__(self, trainer_url: str) -> None:
        self.trainer_url = trainer_url.rstrip("/")
        self.client = httpx.AsyncClient(base_url=self.trainer_url, timeout=TIMEOUT)

    def routes(self) -> list[Route]:
        return [Route(path, self.forward, methods=list(methods)) for path, methods in TRAINER_ROUTES]

    async def forward(self, request: Request) -> Response:
        headers = {name: request.headers[name] for name in REQUEST_HEADERS if name in request.headers}
        upstream = self.client.build_request(
            request.method,
            quote(request.url.path),
            params=request.url.query,
            headers=headers,
            content=request.stream() if request.method == "POST" else None,
        )
        try:
            response = await self.client.send(upstream, stream=True)
        except httpx.HTTPError as exc:
            raise TrainerUnreachable(f"the trainer at {self.trainer_url} did not answer: {exc}") from exc
        kept = {name: response.headers[name] for name in RESPONSE_HEADERS if name in response.headers}
        return StreamingResponse(_relay(response), status_code=response.status_code, headers=kept)

    async def close(self) -> None:
        await self.client.aclose()


async def _relay(response: httpx.Response) -> AsyncIterator[bytes]:
    """The trainer's body as it arrives; closed when the caller leaves (an event stream it stopped reading)."""
    try:
        async for chunk in response.aiter_raw():
            yield chunk
    except httpx.HTTPError:
        return  # the trainer went away mid-answer: the caller sees the body end
    finally:
        await response.aclose()
