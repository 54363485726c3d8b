"""A grpc.aio server as both of ours run it (`adapterd serve`, `adapterd trainer`): one bounded message size,
standard health checking and reflection, and a bind failure that says what to do."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

# Uploads arrive in chunks; this bounds one message (a chunk), not the upload (--max-upload-bytes does).
MAX_MESSAGE_BYTES = 64 * 1024**2


class GrpcBindError(OSError):
    pass


@dataclass
class GrpcServer:
    server: grpc.aio.Server
    health: health.aio.HealthServicer

    async def set_serving(self, serving: bool, service_names: Sequence[str]) -> None:
        """Report every service, and the server as a whole, SERVING or NOT_SERVING to health checkers."""
        status = (
            health_pb2.HealthCheckResponse.SERVING if serving else health_pb2.HealthCheckResponse.NOT_SERVING
        )
        for name in ("", *service_names):
            await self.health.set(name, status)

    async def stop(self, grace: float) -> None:
        """Report NOT_SERVING to health checkers first, then finish in-flight calls for `grace` seconds."""
        await self.health.enter_graceful_shutdown()
        await self.server.stop(grace)


async def start_server(
    address: str, add_servicers: Callable[[grpc.aio.Server], None], service_names: Sequence[str]
) -> GrpcServer:
    """Serve what `add_servicers` adds (the services `service_names`), health and reflection on `address`
    ("host:port"); each service, and the server as a whole, reports SERVING once it listens."""
    server = grpc.aio.server(
        options=[
            ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
            ("grpc.so_reuseport", 0),  # a port already in use is an error, not a second listener
        ]
    )
    add_servicers(server)
    health_servicer = health.aio.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    reflection.enable_server_reflection(
        (*service_names, health.SERVICE_NAME, reflection.SERVICE_NAME), server
    )
    try:
        server.add_insecure_port(address)
    except RuntimeError as exc:  # grpc only says "Failed to bind"; the usual causes are these
        raise GrpcBindError(
            f"cannot serve gRPC on {address}: the port is in use or the address is not valid here "
            "(choose another with --grpc-port / --host)"
        ) from exc
    for name in ("", *service_names):
        await health_servicer.set(name, health_pb2.HealthCheckResponse.SERVING)
    await server.start()
    return GrpcServer(server, health_servicer)
