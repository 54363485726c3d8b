"""The gRPC server of `adapterd serve`: Generation and Adapters, standard health checking and reflection."""

from __future__ import annotations

from dataclasses import dataclass

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from adapterd.server.auth import ApiKeys
from adapterd.server.grpc.adapters import AdaptersServicer
from adapterd.server.grpc.generation import GenerationServicer
from adapterd.server.service import Service
from adapterd.v1 import adapters_pb2, adapters_pb2_grpc, generation_pb2, generation_pb2_grpc

SERVICE_NAMES = (
    generation_pb2.DESCRIPTOR.services_by_name["Generation"].full_name,
    adapters_pb2.DESCRIPTOR.services_by_name["Adapters"].full_name,
)
# Uploads arrive in chunks; this bounds one message (a chunk), not the upload (--max-upload-bytes does).
MAX_MESSAGE_BYTES = 64 * 1024**2


class GrpcBindError(OSError):
    pass


@dataclass
class GrpcServer:
    server: grpc.aio.Server
    health: health.aio.HealthServicer

    async def stop(self, grace: float) -> None:
        """Report NOT_SERVING to health checkers first, then finish in-flight calls for `grace` seconds."""
        await self.health.enter_graceful_shutdown()
        await self.server.stop(grace)


async def start_grpc_server(service: Service, keys: ApiKeys, address: str) -> GrpcServer:
    """Serve Generation, Adapters, health and reflection on `address` ("host:port")."""
    server = grpc.aio.server(
        options=[
            ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
            ("grpc.so_reuseport", 0),  # a port already in use is an error, not a second listener
        ]
    )
    generation_pb2_grpc.add_GenerationServicer_to_server(GenerationServicer(service, keys), server)
    adapters_pb2_grpc.add_AdaptersServicer_to_server(AdaptersServicer(service, keys), server)
    health_servicer = health.aio.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    reflection.enable_server_reflection(
        (*SERVICE_NAMES, health.SERVICE_NAME, reflection.SERVICE_NAME), server
    )
    try:
        server.add_insecure_port(address)
    except RuntimeError as exc:  # grpc only says "Failed to bind"; the usual causes are these
        raise GrpcBindError(
            f"cannot serve gRPC on {address}: the port is in use or the address is not valid here "
            "(choose another with --grpc-port / --host)"
        ) from exc
    for name in ("", *SERVICE_NAMES):
        await health_servicer.set(name, health_pb2.HealthCheckResponse.SERVING)
    await server.start()
    return GrpcServer(server, health_servicer)
