"""The gRPC server of `adapterd serve`: Generation and Adapters, standard health checking and reflection."""

from __future__ import annotations

import grpc

from adapterd.server.common.auth import ApiKeys
from adapterd.server.grpc.adapters import AdaptersServicer
from adapterd.server.grpc.generation import GenerationServicer
from adapterd.server.host.service import Service
from adapterd.server.wire.grpc_server import GrpcServer, start_server
from adapterd.v1 import adapters_pb2, adapters_pb2_grpc, generation_pb2, generation_pb2_grpc

SERVICE_NAMES = (
    generation_pb2.DESCRIPTOR.services_by_name["Generation"].full_name,
    adapters_pb2.DESCRIPTOR.services_by_name["Adapters"].full_name,
)


async def start_grpc_server(
    service: Service, keys: ApiKeys, address: str, serving: bool = True
) -> GrpcServer:
    """Serve Generation, Adapters, health and reflection on `address` ("host:port"); health reports
    `serving` (NOT_SERVING while the model loads)."""

    def add_servicers(server: grpc.aio.Server) -> None:
        generation_pb2_grpc.add_GenerationServicer_to_server(GenerationServicer(service, keys), server)
        adapters_pb2_grpc.add_AdaptersServicer_to_server(AdaptersServicer(service, keys), server)

    return await start_server(address, add_servicers, SERVICE_NAMES, serving)
