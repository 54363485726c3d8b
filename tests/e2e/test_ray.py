"""`adapterd serve --ray --replicas 2`: a local Ray cluster (CPU), two engine replicas on a tiny model behind
the adapter-affinity router, driven over HTTP as a user would. Requests for an adapter keep going to the
replica that holds it (counted from the X-Adapterd-Replica header); an upload through the ingress serves on every replica; a killed replica is replaced
by Ray and a client that retries loses no request; greedy tokens are PEFT's."""

from __future__ import annotations

import os
import signal
import subprocess
import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from adapterd.server.model.resolve import ResolvedModel
from tests.e2e.serving import ADAPTERD, Server, make_tiny_chat_model, start_server
from tests.e2e.test_http import upload_multipart
from tests.reference import make_lora_adapter, peft_greedy

ADAPTERS = [f"ray{i}" for i in range(4)]
REQUESTS_EACH = 10
RAY = str(Path(ADAPTERD).with_name("ray"))


@pytest.fixture(scope="module")
def model(default_model: ResolvedModel, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_tiny_chat_model(tmp_path_factory.mktemp("tiny-chat-ray"), default_model.path)


@pytest.fixture(scope="module")
def loras(model: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("ray-loras")
    return {
        name: make_lora_adapter(
            model, root / name, r=4, alpha=16, target_modules=["q_proj", "v_proj"], seed=i, scale=2.0
        )
        for i, name in enumerate(ADAPTERS)
    }


@pytest.fixture(scope="module")
def cluster(model: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    root = tmp_path_factory.mktemp("ray-serve")
    args = ("--ray", "--replicas", "2", "--ray-replica-cpus", "0.5")
    server = start_server(model, root / "store", root / "serve.log", *args, timeout=300)
    try:
        yield server
    finally:
        server.stop()  # SIGTERM: the command shuts Serve and its local Ray cluster down
        subprocess.run([RAY, "stop", "--force"], capture_output=True, timeout=120)  # anything left over


def generate(server: Server, adapter_id: str | None, **parameters: object) -> httpx.Response:
    body = {
        "inputs": "The weather",
        "parameters": {"max_new_tokens": 6, "adapter_id": adapter_id, **parameters},
    }
    return httpx.post(f"{server.url}/generate", json=body, timeout=120)


def replica(response: httpx.Response) -> str:
    return response.headers["x-adapterd-replica"]


def with_retries(server: Server, adapter_id: str, seconds: float = 120) -> httpx.Response:
    """What a careful client does: retry a failed call (a replica died under it) until it is answered."""
    deadline = time.monotonic() + seconds
    while True:
        try:
            response = generate(server, adapter_id)
            if response.status_code < 500:
                return response
        except httpx.TransportError:
            if time.monotonic() > deadline:
                raise
        if time.monotonic() > deadline:
            return response
        time.sleep(0.5)


def test_requests_for_an_adapter_go_to_the_replica_that_holds_it(
    cluster: Server, loras: dict[str, Path]
) -> None:
    for name, path in loras.items():
        response = upload_multipart(cluster, name, path)
        assert response.status_code == 201, response.text
    served: dict[str, Counter[str]] = {}
    for name in ADAPTERS:
        first = generate(cluster, name)
        assert first.status_code == 200, first.text
        time.sleep(0.5)  # Ray's replicas report the adapters they hold every 0.1 s
        served[name] = Counter(replica(generate(cluster, name)) for _ in range(REQUESTS_EACH - 1))
    followed = sum(counts.most_common(1)[0][1] for counts in served.values())
    assert followed >= 0.9 * len(ADAPTERS) * (REQUESTS_EACH - 1), served
    holders = {counts.most_common(1)[0][0] for counts in served.values()}
    assert len(holders) == 2, served  # the adapters spread over both replicas


def test_greedy_tokens_through_the_router_are_pefts(
    cluster: Server, model: Path, loras: dict[str, Path]
) -> None:
    name = ADAPTERS[0]
    if upload_multipart(cluster, name, loras[name]).status_code not in (200, 201):
        pytest.fail("upload failed")
    prompt = httpx.post(f"{cluster.url}/tokenize", json={"prompt": "The weather", "model": name}).json()[
        "tokens"
    ]
    answer = generate(cluster, name, details=True, ignore_eos_token=True).json()
    assert [t["id"] for t in answer["details"]["tokens"]] == peft_greedy(model, loras[name], prompt, 6)


def test_a_killed_replica_is_replaced_and_retrying_clients_lose_nothing(
    cluster: Server, loras: dict[str, Path]
) -> None:
    for name, path in loras.items():
        assert upload_multipart(cluster, name, path).status_code in (200, 201)
    before = {replica(generate(cluster, None)) for _ in range(8)}
    victim = replica(generate(cluster, ADAPTERS[1]))
    assert len(before) == 2 and victim in before
    os.kill(int(victim.rsplit(":", 1)[1]), signal.SIGKILL)  # the replica's name ends with its pid
    answers = [with_retries(cluster, ADAPTERS[i % len(ADAPTERS)]) for i in range(16)]
    assert [r.status_code for r in answers] == [200] * len(answers)
    # Every adapter, those the victim held too, serves on the survivor: uploads through the ingress went to
    # either replica, and all of them serve on each (one shared store).
    assert victim not in {replica(r) for r in answers}
    deadline = time.monotonic() + 180
    while time.monotonic() < deadline:  # Ray starts a replacement
        now = {replica(generate(cluster, None)) for _ in range(8)}
        if len(now) == 2 and victim not in now:
            break
        time.sleep(2)
    assert len(now) == 2 and victim not in now, now
