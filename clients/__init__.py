"""adapterd's Python clients: the server over HTTP and gRPC, and the trainer, sync and async.

    from adapterd.clients import Client, AdapterNotFound

    with Client("http://127.0.0.1:8080") as client:
        print(client.generate("Hello", max_new_tokens=8).text)

A plain `pip install adapterd` (httpx, grpcio, protobuf; no torch) is enough to use them.
"""

from adapterd.clients.client import (
    AsyncClient,
    AsyncGrpcClient,
    AsyncTrainerClient,
    Client,
    GrpcClient,
    TrainerClient,
)
from adapterd.clients.errors import (
    AdapterdClientError,
    AdapterNotFound,
    ConnectionFailed,
    InvalidRequest,
    JobNotFound,
    NotFound,
    Overloaded,
    PayloadTooLarge,
    PermissionDenied,
    ServerError,
    Timeout,
    Unauthorized,
    Unavailable,
)
from adapterd.clients.types import Adapter, Generation, SamplingOptions, Token

__all__ = [
    "Adapter",
    "AdapterNotFound",
    "AdapterdClientError",
    "AsyncClient",
    "AsyncGrpcClient",
    "AsyncTrainerClient",
    "Client",
    "ConnectionFailed",
    "Generation",
    "GrpcClient",
    "InvalidRequest",
    "JobNotFound",
    "NotFound",
    "Overloaded",
    "PayloadTooLarge",
    "PermissionDenied",
    "SamplingOptions",
    "ServerError",
    "Timeout",
    "Token",
    "TrainerClient",
    "Unauthorized",
    "Unavailable",
]
