"""The clients: the server over HTTP (Client, AsyncClient) and gRPC (GrpcClient, AsyncGrpcClient), and the
trainer over HTTP (TrainerClient, AsyncTrainerClient). Each is its methods (written once, in `_api` and
`_trainer`) on a transport's codec and a sync or async runner."""

from __future__ import annotations

from adapterd.clients._api import ServerApi
from adapterd.clients._grpc import AsyncGrpcRunner, GrpcRunner
from adapterd.clients._grpc_protocol import GrpcServerCodec
from adapterd.clients._http import AsyncHttpRunner, HttpRunner
from adapterd.clients._http_protocol import HttpServerCodec
from adapterd.clients._trainer import TrainerApi


class Client(ServerApi, HttpRunner):
    """The adapterd server over HTTP: `Client(base_url=None, *, api_key=None, timeout=60.0, max_retries=2)`.

    with Client("http://127.0.0.1:8080") as client:
        print(client.generate("The capital of France is", adapter_id="my-lora", max_new_tokens=8).text)
    """

    _codec = HttpServerCodec()


class AsyncClient(ServerApi, AsyncHttpRunner):
    """Client's methods as coroutines (and generate_stream as an async iterator)."""

    _codec = HttpServerCodec()


class GrpcClient(ServerApi, GrpcRunner):
    """The adapterd server over gRPC: `GrpcClient(target=None, *, api_key=None, timeout=60.0, max_retries=2,
    credentials=None)`; `target` defaults to $ADAPTERD_GRPC_TARGET, else 127.0.0.1:50051. The same methods,
    results and errors as Client."""

    _codec = GrpcServerCodec()


class AsyncGrpcClient(ServerApi, AsyncGrpcRunner):
    """GrpcClient's methods as coroutines (and generate_stream as an async iterator)."""

    _codec = GrpcServerCodec()


class TrainerClient(TrainerApi, HttpRunner):
    """The trainer over HTTP: `TrainerClient(base_url=None, *, api_key=None, timeout=60.0, max_retries=2)`;
    `base_url` defaults to $ADAPTERD_TRAINER_URL, else http://127.0.0.1:8081."""

    url_env = "ADAPTERD_TRAINER_URL"
    default_url = "http://127.0.0.1:8081"


class AsyncTrainerClient(TrainerApi, AsyncHttpRunner):
    """TrainerClient's methods as coroutines (and watch as an async iterator)."""

    url_env = TrainerClient.url_env
    default_url = TrainerClient.default_url
