"""HTTP runners over httpx: HttpRunner (httpx.Client) and AsyncHttpRunner (httpx.AsyncClient). They differ
only in the transport calls; everything else is `HttpSettings` and `_http_protocol`."""

from __future__ import annotations

import os
from collections.abc import AsyncIterable, AsyncIterator, Iterable, Iterator
from contextlib import ExitStack, asynccontextmanager, contextmanager
from dataclasses import dataclass
from typing import Any

import httpx

from adapterd.clients._core import AsyncRunner, Call, Retry, StreamCall, SyncRunner, api_key_or_env
from adapterd.clients._http_protocol import HttpRequest, answer, sse_data
from adapterd.clients.errors import ConnectionFailed, Timeout, from_http


@dataclass(frozen=True)
class HttpSettings:
    base_url: str
    headers: dict[str, str]
    timeout: float | None

    @classmethod
    def of(
        cls, base_url: str | None, url_env: str, default_url: str, api_key: str | None, timeout: float | None
    ) -> HttpSettings:
        """The URL given, else $url_env, else the default; the API key given, else $ADAPTERD_API_KEY."""
        url = (base_url or os.environ.get(url_env) or default_url).rstrip("/")
        key = api_key_or_env(api_key)
        return cls(url, {"Authorization": f"Bearer {key}"} if key else {}, timeout)

    @contextmanager
    def sending(self, request: HttpRequest) -> Iterator[dict[str, Any]]:
        """httpx's request arguments, with the request's files open; httpx's errors become typed ones."""
        with _transport_errors(self.base_url), ExitStack() as opened:
            files = [
                (part.name, (part.filename, part.open(opened), part.content_type)) for part in request.files
            ]
            read_timeout = self.timeout if request.timeout_reads else None
            yield {
                "method": request.method,
                "url": request.path,
                "json": request.json,
                "data": request.form or None,
                "files": files or None,
                "timeout": httpx.Timeout(self.timeout, read=read_timeout),
            }


@contextmanager
def _transport_errors(base_url: str) -> Iterator[None]:
    try:
        yield
    except httpx.TimeoutException as exc:
        raise Timeout(f"no answer from {base_url} in time ({type(exc).__name__})") from exc
    except httpx.TransportError as exc:
        raise ConnectionFailed(f"cannot reach the server at {base_url}: {exc or type(exc).__name__}") from exc


class HttpConnection:
    """What both HTTP runners hold: settings, the retry policy and an httpx client of `client_class`."""

    url_env = "ADAPTERD_URL"
    default_url = "http://127.0.0.1:8080"
    client_class: type[httpx.Client] | type[httpx.AsyncClient]

    def __init__(
        self,
        base_url: str | None = None,
        *,
        api_key: str | None = None,
        timeout: float | None = 60.0,
        max_retries: int = 2,
    ) -> None:
        """`base_url` defaults to $ADAPTERD_URL, `api_key` to $ADAPTERD_API_KEY. `timeout` bounds connecting
        and each wait for data; only idempotent calls are retried (`max_retries` times, with backoff)."""
        self.settings = HttpSettings.of(base_url, self.url_env, self.default_url, api_key, timeout)
        self.retry = Retry(max_retries)
        self._http: Any = self.client_class(base_url=self.settings.base_url, headers=self.settings.headers)

    @property
    def base_url(self) -> str:
        return self.settings.base_url


class HttpRunner(HttpConnection, SyncRunner):
    client_class = httpx.Client

    def _send(self, call: Call[Any]) -> Any:
        with self.settings.sending(call.request) as arguments:
            response = self._http.request(**arguments)
        return answer(response.status_code, response.content, call.not_found)

    @contextmanager
    def _open(self, call: StreamCall[Any]) -> Iterator[Iterable[Any]]:
        with self.settings.sending(call.request) as arguments, self._http.stream(**arguments) as response:
            if response.is_error:
                raise from_http(response.status_code, response.read(), call.not_found)
            yield (data for line in response.iter_lines() if (data := sse_data(line)) is not None)

    def close(self) -> None:
        self._http.close()


class AsyncHttpRunner(HttpConnection, AsyncRunner):
    client_class = httpx.AsyncClient

    async def _send(self, call: Call[Any]) -> Any:
        with self.settings.sending(call.request) as arguments:
            response = await self._http.request(**arguments)
        return answer(response.status_code, response.content, call.not_found)

    @asynccontextmanager
    async def _open(self, call: StreamCall[Any]) -> AsyncIterator[AsyncIterable[Any]]:
        with self.settings.sending(call.request) as arguments:
            async with self._http.stream(**arguments) as response:
                if response.is_error:
                    raise from_http(response.status_code, await response.aread(), call.not_found)
                yield (data async for line in response.aiter_lines() if (data := sse_data(line)) is not None)

    async def close(self) -> None:
        await self._http.aclose()
