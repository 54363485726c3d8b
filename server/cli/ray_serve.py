"""`adapterd serve --ray --replicas N`: adapterd on Ray Serve, one engine per replica, behind one router.

- `AdapterdReplica` (N replicas; one GPU each, or CPUs): the model, its engine and adapterd's own Starlette
  app, so every route, client, error shape and stream answers as under `adapterd serve`. The replicas share
  one adapter store, which the registry reads at every lookup: an upload through any replica serves on all.
- `AdapterRouter` (the HTTP ingress, no model): reads a request's adapter id (`parameters.adapter_id`, `model`,
  or `/models/{id}/...`) and hands the request to a replica through a handle with that id as Ray's
  multiplexed model id, so a replica that already holds the adapter gets it. Base-model requests and every
  other route go to the less loaded of two replicas (Ray's power of two choices).

No `@serve.batch`: it would split batches by model id; the engine's continuous batch mixes adapters itself.
gRPC is not served under Ray (Ray's proxy speaks HTTP to this app).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import os
import signal
import threading
from collections.abc import AsyncIterator, MutableMapping
from dataclasses import replace
from typing import Any

from adapterd.server.common.config import MAX_JSON_BODY_BYTES, EngineConfig, ServerConfig

log = logging.getLogger("adapterd")
ROUTER = "AdapterRouter"
REPLICAS = "AdapterdReplica"
GENERATION_PATHS = (
    "/",
    "/generate",
    "/generate_stream",
    "/v1/completions",
    "/v1/chat/completions",
    "/tokenize",
)
SCOPE_KEYS = (
    "type",
    "asgi",
    "http_version",
    "method",
    "scheme",
    "path",
    "raw_path",
    "query_string",
    "headers",
)


def adapter_of(path: str, body: bytes, base_model: str) -> str:
    """The adapter a request asks for ("" for the base model, or a route that generates nothing)."""
    if path.startswith("/models/"):
        named = path.removeprefix("/models/")
        for suffix in ("/generate_stream", "/generate"):
            named = named.removesuffix(suffix)
        return "" if named == base_model else named
    if path not in GENERATION_PATHS or not body or len(body) > MAX_JSON_BODY_BYTES:
        return ""
    try:
        parsed = json.loads(body)
    except ValueError:
        return ""  # the replica answers the 400
    if not isinstance(parsed, dict):
        return ""
    parameters = parsed.get("parameters")
    asked = parameters.get("adapter_id") if isinstance(parameters, dict) else None
    asked = asked or parsed.get("model")
    return asked if isinstance(asked, str) and asked != base_model else ""


class AdapterdReplica:
    """One engine and adapterd's HTTP app; requests arrive as (ASGI scope, body) and leave as ASGI messages."""

    def __init__(self, load: dict[str, Any], engine: EngineConfig, config: ServerConfig) -> None:
        from ray import serve

        from adapterd.server.common.auth import ApiKeys
        from adapterd.server.host.llm import LLM
        from adapterd.server.host.service import Service
        from adapterd.server.http.app import build_app

        replica = serve.get_replica_context().replica_id.unique_id
        config = replace(config, replica_name=f"{replica}@{os.uname().nodename}:{os.getpid()}")
        self.llm = LLM(engine=engine, max_cpu_adapters=config.max_cpu_adapters, **load)
        keys = ApiKeys.load(config.api_keys) if config.api_keys else ApiKeys.open()
        self.service = Service(self.llm, config)
        self.app = build_app(self.service, keys)

        async def hold(adapter_id: str) -> str:
            """Ray's record that this replica holds the adapter (the engine loads it on the request itself)."""
            return adapter_id

        self.hold = serve.multiplexed(max_num_models_per_replica=engine.max_gpu_adapters)(hold)

    def base_model(self) -> str:
        return self.llm.model_name

    def check_health(self) -> None:
        """Ray replaces a replica whose engine cannot serve."""
        health = self.service.health()
        if not health.ok:
            raise RuntimeError(health.reason)

    async def serve_http(self, scope: dict[str, Any], body: bytes) -> AsyncIterator[MutableMapping[str, Any]]:
        from ray import serve

        adapter_id = serve.get_multiplexed_model_id()
        if adapter_id:
            await self.hold(adapter_id)
        messages: asyncio.Queue[MutableMapping[str, Any] | None] = asyncio.Queue()
        pending = [{"type": "http.request", "body": body, "more_body": False}]

        async def receive() -> dict[str, Any]:
            if pending:
                return pending.pop()
            await asyncio.Event().wait()  # a client that leaves cancels this generator instead
            raise AssertionError  # pragma: no cover

        async def send(message: MutableMapping[str, Any]) -> None:
            await messages.put(message)

        task = asyncio.create_task(self.app(scope, receive, send))
        task.add_done_callback(lambda _: messages.put_nowait(None))
        try:
            while (message := await messages.get()) is not None:
                yield message
        finally:
            task.cancel()

    def __del__(self) -> None:
        llm = getattr(self, "llm", None)
        if llm is not None:
            llm.close()


class AdapterRouter:
    """The ingress: one HTTP request in, the chosen replica's ASGI messages out."""

    def __init__(self, replicas: Any) -> None:
        self.replicas = replicas
        self.base_model: str | None = None

    def __serve_build_asgi_app__(self) -> Any:  # Ray Serve's hook: the ingress's ASGI app
        async def app(scope: dict[str, Any], receive: Any, send: Any) -> None:  # ASGI 3 (a plain function)
            await self.asgi(scope, receive, send)

        return app

    async def asgi(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] == "lifespan":
            await _lifespan(receive, send)
            return
        if scope["type"] != "http":
            return
        body = await _body(receive)
        if self.base_model is None:
            self.base_model = await self.replicas.base_model.remote()
        adapter_id = adapter_of(scope["path"], body, self.base_model or "")
        handle = self.replicas.options(stream=True, multiplexed_model_id=adapter_id)
        plain = {key: scope[key] for key in SCOPE_KEYS if key in scope}
        plain["headers"] = [(bytes(k), bytes(v)) for k, v in scope.get("headers", ())]
        async for message in handle.serve_http.remote(plain, body):
            await send(message)


async def _body(receive: Any) -> bytes:
    chunks, more = [], True
    while more:
        message = await receive()
        if message["type"] == "http.disconnect":
            break
        chunks.append(message.get("body", b""))
        more = message.get("more_body", False)
    return b"".join(chunks)


async def _lifespan(receive: Any, send: Any) -> None:
    while True:
        message = await receive()
        if message["type"] == "lifespan.startup":
            await send({"type": "lifespan.startup.complete"})
        elif message["type"] == "lifespan.shutdown":
            await send({"type": "lifespan.shutdown.complete"})
            return


def build_app(
    load: dict[str, Any], engine: EngineConfig, config: ServerConfig, replicas: int, gpus: float, cpus: float
) -> Any:
    """The Ray Serve application: the router bound to `replicas` engine replicas."""
    from ray import serve

    replica = serve.deployment(
        name=REPLICAS,
        num_replicas=replicas,
        ray_actor_options={"num_gpus": gpus, "num_cpus": cpus},
        max_ongoing_requests=config.max_pending_requests,
        health_check_period_s=2,
        health_check_timeout_s=30,
    )(AdapterdReplica)
    router = serve.deployment(
        name=ROUTER,
        ray_actor_options={"num_cpus": 0},
        max_ongoing_requests=config.max_pending_requests * replicas,
    )(serve.ingress()(AdapterRouter))
    return router.bind(replica.bind(load, engine, config))


def ray_serve_command(
    args: argparse.Namespace, load: dict[str, Any], engine: EngineConfig, config: ServerConfig
) -> int:
    """Start (or join, with --ray-address) a Ray cluster, run the application on config's host and HTTP port,
    and serve until SIGINT / SIGTERM."""
    import ray
    from ray import serve

    ray.init(address=args.ray_address, include_dashboard=False, log_to_driver=False)
    gpus = 1.0 if load.get("device") in ("cuda", "auto") and ray.cluster_resources().get("GPU") else 0.0
    serve.start(http_options={"host": config.host, "port": config.http_port})
    app = build_app(load, engine, config, args.replicas, gpus, args.ray_replica_cpus)
    serve.run(app, name="adapterd", route_prefix="/")
    log.info(
        "adapterd on Ray Serve: %d replicas behind http://%s:%d", args.replicas, config.host, config.http_port
    )
    stop = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.set())
    stop.wait()
    serve.shutdown()
    ray.shutdown()
    return 0
