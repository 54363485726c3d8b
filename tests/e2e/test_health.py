"""Health that means it: `adapterd serve`'s HTTP and gRPC servers (in this process, on loopback ports, so the
engine can be broken from here) turn unhealthy when engine steps keep failing, recover when a step works
again, and with --exit-when-unhealthy the server stops so a supervisor restarts it."""

from __future__ import annotations

import asyncio
import os
import signal
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager
from typing import Any

import grpc
import httpx
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from adapterd.server.cli.serve import serve
from adapterd.server.common.auth import ApiKeys
from adapterd.server.common.config import MAX_FAILED_STEPS_IN_A_ROW, EngineConfig, ServerConfig
from adapterd.server.host.llm import LLM
from adapterd.server.host.service import Service
from adapterd.server.model.resolve import ResolvedModel
from tests.e2e.serving import free_port, make_tiny_chat_model

SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING


@pytest.fixture(scope="module")
def llm(default_model: ResolvedModel, tmp_path_factory: pytest.TempPathFactory) -> Iterator[LLM]:
    model = make_tiny_chat_model(tmp_path_factory.mktemp("tiny-chat-health"), default_model.path)
    engine = LLM(model=str(model), quantize="none", device="cpu", engine=EngineConfig(kv_cache_tokens=1024))
    yield engine
    engine.close()


@asynccontextmanager
async def serving(service: Service) -> AsyncIterator[tuple[httpx.AsyncClient, asyncio.Task[bool]]]:
    """`serve(service)` on its ports, up; on leaving, stopped as a supervisor stops it (SIGTERM, which its
    own handler takes) unless it stopped by itself."""
    server = asyncio.create_task(serve(service, ApiKeys.open()))
    async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{service.config.http_port}", timeout=30) as http:

        async def up() -> bool:
            assert not server.done(), server.exception()
            try:
                return (await http.get("/health")).status_code == 200
            except httpx.TransportError:
                return False

        try:
            await wait_for(up, 60)
            yield http, server
        finally:
            if not server.done():
                os.kill(os.getpid(), signal.SIGTERM)
            await asyncio.wait_for(asyncio.shield(server), timeout=30)


def broken_step() -> None:
    raise RuntimeError("CUDA error: an illegal memory access was encountered (simulated)")


async def wait_for(check: Any, timeout: float = 10) -> None:
    deadline = asyncio.get_running_loop().time() + timeout
    while not await check():
        assert asyncio.get_running_loop().time() < deadline, "timed out"
        await asyncio.sleep(0.1)


async def grpc_status(target: str) -> int:
    async with grpc.aio.insecure_channel(target) as channel:
        reply = await health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(service=""))
        return int(reply.status)


def test_failing_steps_turn_both_health_checks_unhealthy_until_a_step_works(
    llm: LLM, monkeypatch: pytest.MonkeyPatch
) -> None:
    config = ServerConfig(http_port=free_port(), grpc_port=free_port())
    target = f"127.0.0.1:{config.grpc_port}"
    body = {"inputs": "x", "parameters": {"max_new_tokens": 2}}

    async def scenario() -> None:
        service = Service(llm, config)
        async with serving(service) as (http, server):
            assert (await http.get("/ready")).json() == {"status": "ok"}
            assert await grpc_status(target) == SERVING

            monkeypatch.setattr(llm.engine, "step", broken_step)
            for _ in range(MAX_FAILED_STEPS_IN_A_ROW):
                failed = await http.post("/generate", json=body)
                assert failed.status_code == 500 and "engine step" in failed.json()["error"]
            for route in ("/health", "/ready"):
                answer = await http.get(route)
                assert answer.status_code == 503 and answer.json()["status"] == "unhealthy", route
                assert "illegal memory access" in answer.json()["reason"]

            async def grpc_is(status: int) -> bool:
                return await grpc_status(target) == status

            await wait_for(lambda: grpc_is(NOT_SERVING))

            monkeypatch.undo()  # the device is back: the next step works
            assert (await http.post("/generate", json=body)).status_code == 200
            assert (await http.get("/health")).status_code == 200
            await wait_for(lambda: grpc_is(SERVING))
        assert server.result() is True

    asyncio.run(scenario())


def test_with_exit_when_unhealthy_the_server_stops_itself(llm: LLM, monkeypatch: pytest.MonkeyPatch) -> None:
    config = ServerConfig(http_port=free_port(), grpc_port=free_port(), exit_when_unhealthy=True)

    async def scenario() -> bool:
        async with serving(Service(llm, config)) as (http, server):
            monkeypatch.setattr(llm.engine, "step", broken_step)
            for _ in range(MAX_FAILED_STEPS_IN_A_ROW):
                await http.post("/generate", json={"inputs": "x", "parameters": {"max_new_tokens": 2}})
            await asyncio.wait_for(asyncio.shield(server), timeout=30)  # it stops by itself
        monkeypatch.undo()
        return server.result()

    assert asyncio.run(scenario()) is False  # serve_command turns this into exit status 3
