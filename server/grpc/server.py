"""The gRPC server of `adapterd serve`: Generation and Adapters, standard health checking and reflection."""

from __future__ import annotations

import asyncio

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

_background: set[asyncio.Task[None]] = set()


class GrpcBindError(OSError):
    pass


def build_grpc_server(service: Service, keys: ApiKeys, address: str) -> grpc.aio.Server:
    """A grpc.aio server bound to `address` ("host:port"), not started. Call it on the loop that runs it."""
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
    _set_serving(health_servicer)
    try:
        server.add_insecure_port(address)
    except RuntimeError as exc:  # grpc only says "Failed to bind"; the usual causes are these
        raise GrpcBindError(
            f"cannot serve gRPC on {address}: the port is in use or the address is not valid here "
            "(choose another with --grpc-port / --host)"
        ) from exc
    return server


def _set_serving(health_servicer: health.aio.HealthServicer) -> None:
    """Mark the server ("") and each service SERVING. The task runs before the server answers any call:
    the loop runs ready tasks in order, and the server can start serving only after this one was queued."""

    async def set_all() -> None:
        for name in ("", *SERVICE_NAMES):
            await health_servicer.set(name, health_pb2.HealthCheckResponse.SERVING)

    task = asyncio.get_running_loop().create_task(set_all())
    _background.add(task)
    task.add_done_callback(_background.discard)
