"""`adapterd serve`: load the model once, then serve HTTP (uvicorn) and gRPC (grpc.aio) in one process."""

from __future__ import annotations

import argparse
import asyncio
import logging
import signal
import time
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import uvicorn

# Light imports only: the HTTP port is bound before torch, transformers and the engine are imported (seconds).
from adapterd.server.cli.loading import LoadingGate, LoadingService
from adapterd.server.common.auth import ApiKeys, KeyFileError
from adapterd.server.common.config import ServerConfig, default_cache_dir, serving_cpu_threads
from adapterd.server.common.protocol import Health
from adapterd.server.http.access_log import AccessLog
from adapterd.server.model.resolve import ModelNotFound

if TYPE_CHECKING:
    from adapterd.server.host.llm import LLM
    from adapterd.server.host.service import Service

log = logging.getLogger("adapterd")
STARTED = time.perf_counter()  # the server's start, nearly: this module is imported first
EXIT_UNHEALTHY = 3


def server_config(args: argparse.Namespace) -> ServerConfig:
    return ServerConfig(
        host=args.host,
        http_port=args.http_port,
        grpc_port=args.grpc_port,
        store=args.store,
        max_cpu_adapters=args.max_cpu_adapters,
        max_pending_requests=args.max_pending,
        max_upload_bytes=args.max_upload_bytes,
        api_keys=args.api_keys,
        allowed_lora_dirs=tuple(args.allowed_lora_dir or ()),
        exit_when_unhealthy=args.exit_when_unhealthy,
        replica_name=args.replica_name,
        metrics_tenant_adapters=args.metrics_tenant_adapters,
        trainer_url=args.trainer,
        access_log=args.access_log,
    )


def serve_command(args: argparse.Namespace) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    config = server_config(args)
    store = config.store_dir(default_cache_dir())
    load = {"model": args.model, "quantize": args.quantize, "device": args.device, "store": store}
    if args.ray:
        from adapterd.server.cli.ray_serve import ray_serve_command
        from adapterd.server.cli.run import engine_config

        replica_threads = max(1, int(args.ray_replica_cpus))
        return ray_serve_command(args, load, engine_config(args, cpu_threads=replica_threads), config)
    try:
        keys = ApiKeys.load(config.api_keys) if config.api_keys else ApiKeys.open()
    except (OSError, KeyFileError) as exc:
        log.error("cannot read --api-keys %s: %s", config.api_keys, exc)
        return 2
    loaded: list[LLM] = []

    def load_service() -> Service:
        started = time.perf_counter()
        from adapterd.server.cli.run import engine_config
        from adapterd.server.host.llm import LLM
        from adapterd.server.host.service import Service

        llm = LLM(
            engine=engine_config(args, cpu_threads=serving_cpu_threads()),
            max_cpu_adapters=config.max_cpu_adapters,
            **load,
        )
        loaded.append(llm)
        log.info(
            "ready: model %s (%s on %s) loaded in %.1f s, %.1f s after start; adapter store %s",
            llm.model_name,
            llm.placement.quantize,
            llm.placement.device,
            time.perf_counter() - started,
            time.perf_counter() - STARTED,
            store,
        )
        return Service(llm, config)

    try:
        healthy = asyncio.run(serve_while_loading(config, keys, load_service, f"the model {args.model!r}"))
    except OSError as exc:  # a port in use, an address not valid here, a model that cannot be read
        log.error("%s", exc)
        return 2
    except ModelNotFound as exc:
        log.error("cannot load the model: %s", exc)
        return 2
    finally:
        for llm in loaded:
            llm.close()
    log.info("stopped")
    return 0 if healthy else EXIT_UNHEALTHY


async def serve(service: Service, keys: ApiKeys) -> bool:
    """Serve an already loaded `service` until SIGINT / SIGTERM (see `serve_while_loading`)."""
    return await serve_while_loading(service.config, keys, lambda: service, "the model")


async def serve_while_loading(
    config: ServerConfig, keys: ApiKeys, load: Callable[[], Service], what: str
) -> bool:
    """Listen at once (answering "loading" until `load`, run in a thread, has made the service), then serve
    until SIGINT / SIGTERM (or, with --exit-when-unhealthy, until the engine is unhealthy); whether the
    engine was healthy at the end."""
    gate = LoadingGate(what)
    http = uvicorn.Server(
        uvicorn.Config(gate, host=config.host, port=config.http_port, log_level="warning", lifespan="off")
    )
    http_task = asyncio.create_task(http.serve())
    while not http.started:  # bound, or failed to bind (uvicorn logs why and exits its task)
        if http_task.done():
            raise OSError(f"cannot serve HTTP on {config.host}:{config.http_port} (see above)")
        await asyncio.sleep(0.02)
    log.info(
        "HTTP listening on %s:%d; loading %s (requests answer 503 / UNAVAILABLE until it is ready)",
        config.host,
        config.http_port,
        what,
    )
    grpc = await asyncio.to_thread(_import_the_rest)  # HTTP answers "loading" meanwhile
    stand_in: Any = LoadingService(config, what)
    address = f"{config.host}:{config.grpc_port}"
    grpc_server = await grpc.start_grpc_server(stand_in, keys, address, serving=False)
    stop = asyncio.Event()
    for signum in (signal.SIGINT, signal.SIGTERM):
        asyncio.get_running_loop().add_signal_handler(signum, stop.set)
    log.info("gRPC listening on %s:%d", config.host, config.grpc_port)
    try:
        service = await asyncio.to_thread(load)
    except BaseException:
        http.should_exit = True
        await http_task
        await grpc_server.stop(grace=0)
        raise
    from adapterd.server.http.app import build_app

    app = build_app(service, keys)
    stand_in.ready(service)
    gate.ready(AccessLog(app) if config.access_log else app)
    await grpc_server.set_serving(True, grpc.SERVICE_NAMES)

    async def on_health(health: Health) -> None:
        await grpc_server.set_serving(health.ok, grpc.SERVICE_NAMES)
        if not health.ok:
            log.error("the engine is unhealthy: %s", health.reason)
            if config.exit_when_unhealthy:
                stop.set()

    watcher = asyncio.create_task(service.watch_health(on_health))
    await asyncio.wait([http_task, asyncio.create_task(stop.wait())], return_when=asyncio.FIRST_COMPLETED)
    log.info("stopping: finishing the requests in flight")
    service.draining = True
    watcher.cancel()
    http.should_exit = True
    await http_task
    await grpc_server.stop(grace=2)
    if app.state.trainer is not None:
        await app.state.trainer.close()
    return service.health().ok or not config.exit_when_unhealthy


def _import_the_rest() -> Any:
    """The gRPC servers' module, and with it the engine's (torch, transformers): seconds of imports."""
    from adapterd.server.grpc import server

    return server


def add_serve_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--host", default="127.0.0.1", help="address to bind HTTP and gRPC to")
    parser.add_argument("--http-port", type=int, default=8080, help="HTTP port")
    parser.add_argument("--grpc-port", type=int, default=50051, help="gRPC port")
    parser.add_argument("--store", type=Path, help="adapter store directory (default: <cache>/store)")
    parser.add_argument(
        "--max-cpu-adapters",
        type=int,
        default=64,
        help="adapters kept in host memory (beyond: read from disk)",
    )
    parser.add_argument(
        "--max-pending",
        type=int,
        default=256,
        help="requests waiting for the engine before 429 / RESOURCE_EXHAUSTED",
    )
    parser.add_argument("--max-upload-bytes", type=int, default=2 * 1024**3, help="largest adapter upload")
    parser.add_argument(
        "--api-keys", type=Path, help="file of 'KEY ROLE [TENANT]' lines (default: open, no keys)"
    )
    parser.add_argument(
        "--trainer",
        metavar="URL",
        help="an adapterd trainer's HTTP URL: its /v1/training and /v1/evaluations routes are served here "
        "too (the console's Training page)",
    )
    parser.add_argument(
        "--no-access-log",
        dest="access_log",
        action="store_false",
        help="log no line per HTTP request (default: one line each, without query strings or bodies)",
    )
    parser.add_argument(
        "--exit-when-unhealthy",
        action="store_true",
        help=f"exit with status {EXIT_UNHEALTHY} once the engine is unhealthy (for a supervisor to restart)",
    )
    parser.add_argument(
        "--ray",
        action="store_true",
        help="serve on Ray Serve: --replicas engine replicas behind one adapter-affinity router (HTTP only)",
    )
    parser.add_argument("--replicas", type=int, default=1, help="engine replicas under --ray")
    parser.add_argument("--ray-address", help="an existing Ray cluster to join (default: start a local one)")
    parser.add_argument(
        "--ray-replica-cpus", type=float, default=1.0, help="CPUs Ray reserves for each replica"
    )
    parser.add_argument(
        "--replica-name",
        default="",
        help="this replica's name in the X-Adapterd-Replica header and /metrics (default: HOST:HTTP_PORT)",
    )
    parser.add_argument(
        "--metrics-tenant-adapters",
        action="store_true",
        help="name tenant adapters in the inference gateway's series of /metrics (open: expose it to the "
        "gateway only)",
    )
    parser.add_argument(
        "--allowed-lora-dir",
        type=Path,
        action="append",
        help="directory /v1/load_lora_adapter may read from (repeatable; default: none, the route refuses)",
    )
