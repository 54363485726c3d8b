"""One log line per HTTP request, when its answer has been sent: client, method, path, status, time and bytes
(`adapterd.access` at INFO; `--no-access-log` turns it off). Never the query string, headers or bodies: they
may carry keys and prompts."""

from __future__ import annotations

import logging
import time

from starlette.types import ASGIApp, Message, Receive, Scope, Send

log = logging.getLogger("adapterd.access")


class AccessLog:
    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started, status, sent = time.perf_counter(), 0, 0

        async def counted(message: Message) -> None:
            nonlocal status, sent
            if message["type"] == "http.response.start":
                status = message["status"]
            elif message["type"] == "http.response.body":
                sent += len(message.get("body", b""))
            await send(message)

        try:
            await self.app(scope, receive, counted)
        finally:
            client = scope.get("client") or ("-", 0)
            log.info(
                '%s "%s %s" %s %.3fs %dB',
                client[0],
                scope["method"],
                scope["path"],
                status or "-",
                time.perf_counter() - started,
                sent,
            )
