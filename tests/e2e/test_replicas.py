"""Replicas on one adapter store (two real `adapterd serve` processes): each sees the other's uploads,
replacements and deletes at once; concurrent uploads of one id through both leave one consistent history;
every answer names its replica; and /metrics carries the series the inference gateway's endpoint picker
reads, parsed with prometheus_client's own text parser."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import grpc
import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from adapterd.server.model.resolve import ResolvedModel
from adapterd.v1 import generation_pb2, generation_pb2_grpc
from tests.e2e.serving import Server, make_tiny_chat_model, running_server
from tests.e2e.test_fuzz import staged_leftovers
from tests.e2e.test_http import upload_multipart
from tests.reference import make_lora_adapter


@pytest.fixture(scope="module")
def model(default_model: ResolvedModel, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_tiny_chat_model(tmp_path_factory.mktemp("tiny-chat-replicas"), default_model.path)


@pytest.fixture(scope="module")
def loras(model: Path, tmp_path_factory: pytest.TempPathFactory) -> list[Path]:
    root = tmp_path_factory.mktemp("replica-loras")
    return [
        make_lora_adapter(
            model,
            root / f"lora{seed}",
            r=4,
            alpha=16,
            target_modules=["q_proj", "v_proj"],
            seed=seed,
            scale=2.0,
        )
        for seed in range(3)
    ]


@pytest.fixture(scope="module")
def replicas(model: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Server, Server, Path]]:
    root = tmp_path_factory.mktemp("replicas")
    store = root / "store"
    with (
        running_server(model, store, root / "a.log", "--replica-name", "A", "--max-batch", "1") as a,
        running_server(model, store, root / "b.log", "--replica-name", "B", "--metrics-tenant-adapters") as b,
    ):
        yield a, b, store


def greedy(server: Server, adapter_id: str | None, status: int = 200) -> str:
    parameters = {"max_new_tokens": 8, **({"adapter_id": adapter_id} if adapter_id else {})}
    response = httpx.post(
        f"{server.url}/generate", json={"inputs": "The weather", "parameters": parameters}, timeout=120
    )
    assert response.status_code == status, response.text
    return response.json()["generated_text"] if status == 200 else ""


def version(server: Server, adapter_id: str) -> int:
    return int(httpx.get(f"{server.url}/v1/adapters/{adapter_id}", timeout=30).json()["version"])


def test_replicas_on_one_store_see_each_others_uploads_replacements_and_deletes(
    replicas: tuple[Server, Server, Path], loras: list[Path]
) -> None:
    a, b, _ = replicas
    assert upload_multipart(a, "shared", loras[0]).status_code == 201
    first = greedy(a, "shared")
    assert greedy(b, "shared") == first != greedy(b, None)  # B serves what A uploaded, as A does

    assert upload_multipart(b, "shared", loras[1]).status_code == 200  # replaced through B
    second = greedy(b, "shared")
    assert second != first
    assert greedy(a, "shared") == second  # A serves the new version at once, not the one it had loaded
    assert version(a, "shared") == version(b, "shared") == 2

    assert httpx.delete(f"{a.url}/v1/adapters/shared", timeout=30).status_code == 200
    greedy(b, "shared", status=404)  # refused by B at once
    assert "shared" not in {m["id"] for m in httpx.get(f"{b.url}/v1/models").json()["data"]}

    # The version number starts again at 1 after a delete; B must not serve its old copy of version 1.
    assert upload_multipart(b, "shared", loras[2]).status_code == 201
    third = greedy(b, "shared")
    assert third not in (first, second) and greedy(a, "shared") == third


def test_concurrent_uploads_of_one_id_through_both_replicas_leave_one_history(
    replicas: tuple[Server, Server, Path], loras: list[Path]
) -> None:
    a, b, store = replicas
    jobs = [(server, lora) for server in (a, b) for lora in loras]  # 6 uploads of "race" at once
    with ThreadPoolExecutor(len(jobs)) as pool:
        answers = list(pool.map(lambda job: upload_multipart(job[0], "race", job[1]), jobs))
    assert sorted(r.status_code for r in answers) == [200] * 5 + [201]
    versions = sorted(r.json()["version"] for r in answers)
    assert versions == list(range(1, len(jobs) + 1))  # each upload got its own version, none lost
    last = max(answers, key=lambda r: r.json()["version"]).json()
    for server in (a, b):
        shown = httpx.get(f"{server.url}/v1/adapters/race", timeout=30).json()
        assert (shown["version"], shown["sha256"]) == (last["version"], last["sha256"])
    assert greedy(a, "race") == greedy(b, "race")
    assert staged_leftovers(store) == []
    kept = sorted(p.name for p in (store / "adapters" / "_" / "race" / "versions").iterdir())
    assert kept == [str(len(jobs) - 1), str(len(jobs))]  # the current version and the one before it


def test_every_answer_names_its_replica_over_http_and_grpc(replicas: tuple[Server, Server, Path]) -> None:
    a, b, _ = replicas
    for server, name in ((a, "A"), (b, "B")):
        for path in ("/health", "/v1/models", "/v1/adapters/nope"):
            assert httpx.get(f"{server.url}{path}").headers["x-adapterd-replica"] == name
        stream = httpx.post(
            f"{server.url}/generate_stream",
            json={"inputs": "Hi", "parameters": {"max_new_tokens": 2}},
            timeout=60,
        )
        assert stream.headers["x-adapterd-replica"] == name
        assert gauges(server)[("adapterd_replica", (("replica", name),))] == 1
        with grpc.insecure_channel(server.grpc_target) as channel:
            stub = generation_pb2_grpc.GenerationStub(channel)
            request = generation_pb2.GenerateRequest(prompt="Hi", parameters={"max_new_tokens": 2})
            _, call = stub.Generate.with_call(request, timeout=60)
            assert dict(call.initial_metadata())["x-adapterd-replica"] == name
            with pytest.raises(grpc.RpcError) as refused:
                stub.Generate(generation_pb2.GenerateRequest(prompt="Hi", adapter_id="nope"), timeout=60)
            assert dict(refused.value.initial_metadata())["x-adapterd-replica"] == name  # type: ignore[attr-defined]


def gauges(server: Server) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    text = httpx.get(f"{server.url}/metrics", timeout=30).text
    return {
        (sample.name, tuple(sorted(sample.labels.items()))): sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
    }


def lora_info(samples: dict[tuple[str, tuple[tuple[str, str], ...]], float]) -> tuple[dict[str, str], float]:
    [(labels, value)] = [(dict(k[1]), v) for k, v in samples.items() if k[0] == "vllm:lora_requests_info"]
    return labels, value


def test_metrics_carry_the_gateway_series_while_requests_run_and_wait(
    replicas: tuple[Server, Server, Path], loras: list[Path]
) -> None:
    a, b, _ = replicas
    for i, lora in enumerate(loras):
        assert upload_multipart(a, f"busy{i}", lora).status_code in (200, 201)
    assert upload_multipart(a, "tenant/secret", loras[0]).status_code in (200, 201)
    idle = gauges(a)
    assert idle[("vllm:num_requests_waiting", ())] == 0 and idle[("vllm:num_requests_running", ())] == 0
    assert 0 <= idle[("vllm:kv_cache_usage_perc", ())] <= 1

    long = {"max_new_tokens": 400, "ignore_eos_token": True}
    bodies = [{"inputs": "Once", "parameters": {**long, "adapter_id": f"busy{i}"}} for i in range(3)]
    bodies.append({"inputs": "Once", "parameters": {**long, "adapter_id": "tenant/secret"}})
    seen: list[dict[tuple[str, tuple[tuple[str, str], ...]], float]] = []
    done = threading.Event()

    def scrape() -> None:
        deadline = time.monotonic() + 60
        while not done.is_set() and time.monotonic() < deadline:
            seen.append(gauges(a))
            time.sleep(0.05)

    scraper = threading.Thread(target=scrape)
    scraper.start()
    with ThreadPoolExecutor(len(bodies)) as pool:  # --max-batch 1 on A: one runs, the others wait
        answers = list(pool.map(lambda body: httpx.post(f"{a.url}/generate", json=body, timeout=120), bodies))
    done.set()
    scraper.join()
    assert all(r.status_code == 200 for r in answers)

    busy = [s for s in seen if s[("vllm:num_requests_waiting", ())] >= 1]
    assert busy, "no scrape saw a waiting request"
    sample = busy[0]
    assert sample[("vllm:num_requests_running", ())] == 1
    assert sample[("vllm:kv_cache_usage_perc", ())] > 0
    labels, written = lora_info(sample)
    assert labels["max_lora"] == idle_info_max(a)
    waiting = labels["waiting_lora_adapters"].split(",")
    assert waiting and set(waiting) <= {"busy0", "busy1", "busy2"}  # the tenant's adapter is not named
    assert " " not in labels["running_lora_adapters"]
    assert set(labels["running_lora_adapters"].split(",")) & {"busy0", "busy1", "busy2"}
    assert (
        abs(written - time.time()) < 120
    )  # the value is the time it was written (the picker keeps the latest)
    assert all("tenant/secret" not in "".join(lora_info(s)[0].values()) for s in seen)

    greedy(b, "tenant/secret")  # B names tenant adapters (--metrics-tenant-adapters)
    assert "tenant/secret" in lora_info(gauges(b))[0]["running_lora_adapters"].split(",")


def idle_info_max(server: Server) -> str:
    return str(httpx.get(f"{server.url}/info").json()["max_gpu_adapters"])
