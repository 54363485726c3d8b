"""Hostile input against a real `adapterd serve` on loopback: each case a fuzzing run found a 500 for, or a
request that hurt another client's, answers a clear 4xx (or serves) and changes nothing; the neighbours of
a hostile request keep their exact tokens."""

from __future__ import annotations

import json
import threading
import time
from pathlib import Path
from typing import Any

import grpc
import httpx
import pytest
from safetensors.torch import load_file, save_file

from adapterd.server.model.resolve import ResolvedModel
from adapterd.v1 import adapters_pb2, adapters_pb2_grpc
from tests.e2e.serving import Server, make_tiny_chat_model, running_server
from tests.e2e.test_http import FILES
from tests.reference import make_lora_adapter, make_prompt_adapter

ADMIN, TENANT = "adminkey", "acmekey"
GREEDY = {"max_new_tokens": 12}


@pytest.fixture(scope="module")
def model(default_model: ResolvedModel, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_tiny_chat_model(tmp_path_factory.mktemp("tiny-chat-hostile"), default_model.path)


@pytest.fixture(scope="module")
def lora(model: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_lora_adapter(
        model, tmp_path_factory.mktemp("lora") / "a", r=4, alpha=8, target_modules=["q_proj", "v_proj"]
    )


@pytest.fixture(scope="module")
def server(model: Path, lora: Path, tmp_path_factory: pytest.TempPathFactory):
    root = tmp_path_factory.mktemp("hostile-server")
    keys = root / "keys"
    keys.write_text(f"{ADMIN} admin\n{TENANT} admin acme\n")
    args = ("--api-keys", str(keys), "--max-rank", "8", "--allowed-lora-dir", str(root))
    with running_server(model, root / "store", root / "log", *args) as running:
        running.root = root  # type: ignore[attr-defined]
        assert upload(running, "keep", lora).status_code == 201
        yield running


def post(server: Server, path: str, body: Any = None, key: str = ADMIN, **kw: Any) -> httpx.Response:
    headers = {"authorization": f"Bearer {key}", **kw.pop("headers", {})}
    if body is not None:
        kw["json"] = body
    return httpx.post(f"{server.url}{path}", headers=headers, **{"timeout": 60, **kw})


def upload(server: Server, adapter_id: str, adapter: Path, key: str = ADMIN) -> httpx.Response:
    files = {name: (name, (adapter / name).read_bytes()) for name in FILES}
    headers = {"authorization": f"Bearer {key}"}
    return httpx.put(f"{server.url}/v1/adapters/{adapter_id}", headers=headers, files=files, timeout=60)


def generated(server: Server, parameters: dict[str, Any], prompt: str = "Once upon a time") -> str:
    response = post(server, "/generate", {"inputs": prompt, "parameters": {**GREEDY, **parameters}})
    assert response.status_code == 200, (parameters, response.text)
    return str(response.json()["generated_text"])


def listing(server: Server) -> list[dict[str, Any]]:
    response = httpx.get(f"{server.url}/v1/adapters", headers={"authorization": f"Bearer {ADMIN}"})
    return sorted(response.json()["data"], key=lambda a: a["id"])


def message(response: httpx.Response) -> str:
    error = response.json()["error"]
    return str(error if isinstance(error, str) else error["message"])


EXTREME_SAMPLING = [
    {"temperature": 1e-300, "do_sample": True, "seed": 1},
    {"temperature": 5e-324, "do_sample": True, "seed": 2},
    {"temperature": 1e-300, "top_p": 1e-300, "do_sample": True, "seed": 3},
    {"temperature": 1.0, "top_p": 5e-324, "do_sample": True, "seed": 4},
    {"temperature": 1e300, "do_sample": True, "seed": 5},
    {"repetition_penalty": 1e-300},
    {"repetition_penalty": 5e-324, "temperature": 0.7, "do_sample": True, "seed": 6},
    {"repetition_penalty": 1e300, "temperature": 0.7, "do_sample": True, "seed": 7},
]


def test_extreme_sampling_values_are_served_and_never_hurt_a_neighbour(server: Server) -> None:
    """Each value is valid and finite; the sampler computes with it (temperature -> 0 and top_p -> 0 are
    greedy decoding in the limit), and an innocent request in the same batch keeps its greedy tokens."""
    alone = generated(server, {"adapter_id": "keep"}, "The innocent request")
    for hostile in EXTREME_SAMPLING:
        results: dict[str, str] = {}

        def innocent(into: dict[str, str] = results) -> None:
            into["innocent"] = generated(server, {"adapter_id": "keep"}, "The innocent request")

        neighbour = threading.Thread(target=innocent)
        neighbour.start()
        text = generated(server, {**hostile, "max_new_tokens": 24})
        neighbour.join(timeout=60)
        assert results.get("innocent") == alone, hostile
        if hostile.get("temperature", 1) < 1e-100 or hostile.get("top_p", 1) < 1e-100:
            assert text == generated(server, {"max_new_tokens": 24}), hostile  # the greedy limit


def test_sampling_values_no_sampler_can_use_are_refused(server: Server) -> None:
    cases = [
        ({"seed": 2**64}, "seed"),
        ({"seed": -(2**63) - 1}, "seed"),
        ({"temperature": 1e309}, "JSON"),  # json reads 1e309 as inf: not a finite number
    ]
    for parameters, needle in cases:
        body = json.dumps({"inputs": "x", "parameters": parameters}).replace("Infinity", "1e309")
        response = post(server, "/generate", content=body, headers={"content-type": "application/json"})
        assert response.status_code == 400, (parameters, response.text)
        assert needle in message(response), response.text
    assert generated(server, {"seed": -1, "temperature": 0.5, "do_sample": True})  # a negative seed is fine
    assert generated(server, {"seed": 2**64 - 1, "temperature": 0.5, "do_sample": True, "best_of": 2})


def raw_post(server: Server, path: str, body: bytes) -> httpx.Response:
    return post(server, path, content=body, headers={"content-type": "application/json"})


def test_malformed_json_bodies_are_a_4xx_on_every_json_route(server: Server) -> None:
    deep = b'{"inputs": "x", "deep": ' + b"[" * 100_000 + b"]" * 100_000 + b"}"
    huge_integer = b'{"inputs": "x", "unknown": ' + b"7" * 5000 + b"}"
    cases = {
        "nested": deep,
        "digits": huge_integer,
        "surrogate": b'{"inputs": "\\udfff", "prompt": "\\udfff", "model": "x", "messages": '
        b'[{"role": "user", "content": "\\ud800"}], "lora_name": "x", "lora_path": "\\udfff"}',
        "NaN": b'{"inputs": "x", "prompt": "x", "model": "x", "parameters": {"temperature": NaN}}',
    }
    routes = ["/generate", "/generate_stream", "/v1/completions", "/v1/chat/completions", "/tokenize"]
    routes += ["/v1/load_lora_adapter", "/models/keep/generate"]
    for needle, body in cases.items():
        for route in routes:
            response = raw_post(server, route, body)
            assert 400 <= response.status_code < 500, (needle, route, response.status_code, response.text)
            assert needle in message(response), (needle, route, response.text)
    too_big = b'{"inputs": "' + b"a" * (17 * 1024**2) + b'"}'
    response = raw_post(server, "/generate", too_big)
    assert response.status_code == 413 and "limit" in message(response)


def test_paths_that_no_string_can_name_are_refused(server: Server, tmp_path: Path) -> None:
    for path in ["a\x00b", "\udfff"]:
        body = json.dumps({"lora_name": "x", "lora_path": path}).encode()
        response = raw_post(server, "/v1/load_lora_adapter", body)
        assert 400 <= response.status_code < 500, (path, response.text)


def test_an_id_with_a_trailing_newline_is_its_own_invalid_id(server: Server, lora: Path) -> None:
    before = listing(server)
    headers = {"authorization": f"Bearer {ADMIN}"}
    files = {name: (name, (lora / name).read_bytes()) for name in FILES}
    for quoted in ["keep%0A", "keep%0D%0A", "keep%00"]:
        response = httpx.put(f"{server.url}/v1/adapters/{quoted}", headers=headers, files=files, timeout=60)
        assert 400 <= response.status_code < 500, (quoted, response.text)
        assert "invalid adapter id" in message(response), response.text
        assert httpx.delete(f"{server.url}/v1/adapters/{quoted}", headers=headers).status_code == 404
    assert listing(server) == before


def variant(
    source: Path, dest: Path, config: dict[str, Any] | None = None, tensors: dict | None = None
) -> Path:
    dest.mkdir(parents=True)
    settings = json.loads((source / FILES[0]).read_text())
    (dest / FILES[0]).write_text(json.dumps({**settings, **(config or {})}))
    save_file({**load_file(source / FILES[1]), **(tensors or {})}, dest / FILES[1])
    return dest


# Backtracks exponentially over a module name, in `re` (PEFT's) and in `regex` alike.
BACKTRACKING = r"(?:(?:[\w.])|(?:[\w.]))*_p"


def test_adapters_the_engine_could_never_serve_are_refused_at_upload(
    server: Server, model: Path, lora: Path, tmp_path: Path
) -> None:
    before = listing(server)
    weights = load_file(lora / FILES[1])
    a_key = next(key for key in weights if "lora_A" in key)
    long_index = a_key.replace("layers.0.", "layers." + "9" * 5000 + ".", 1)
    cases = {
        "lora_alpha": variant(lora, tmp_path / "alpha", {"lora_alpha": 1e300}),
        "max_virtual_tokens": make_prompt_adapter(model, tmp_path / "long-prompt", num_virtual_tokens=200),
        "layer": variant(lora, tmp_path / "index", tensors={long_index: weights[a_key]}),
        "target_modules": variant(lora, tmp_path / "regex", {"target_modules": BACKTRACKING}),
    }
    for needle, adapter in cases.items():
        response = upload(server, f"bad-{len(needle)}", adapter)
        assert 400 <= response.status_code < 500, (needle, response.text)
        assert needle in message(response), (needle, response.text)
    assert httpx.get(f"{server.url}/health").status_code == 200
    assert listing(server) == before


def test_a_multipart_upload_with_a_file_twice_is_refused(server: Server, lora: Path) -> None:
    before = listing(server)
    parts = [(name, (name, (lora / name).read_bytes())) for name in FILES]
    parts.append((FILES[1], (FILES[1], (lora / FILES[1]).read_bytes()[:-8] + b"\0" * 8)))
    response = httpx.put(
        f"{server.url}/v1/adapters/twice",
        headers={"authorization": f"Bearer {ADMIN}"},
        files=parts,
        timeout=60,
    )
    assert response.status_code == 400 and "more than once" in message(response), response.text
    assert listing(server) == before


def test_errors_echo_a_bounded_part_of_a_huge_id(server: Server) -> None:
    huge = "x" * 1_000_000
    for path in ["/generate", "/v1/completions"]:
        response = post(
            server, path, {"inputs": "x", "prompt": "x", "model": huge, "parameters": {"adapter_id": huge}}
        )
        assert response.status_code == 404 and len(response.content) < 4096, (path, len(response.content))
    with grpc.insecure_channel(server.grpc_target) as channel:
        stub = adapters_pb2_grpc.AdaptersStub(channel)
        with pytest.raises(grpc.RpcError) as caught:
            stub.GetAdapter(adapters_pb2.GetAdapterRequest(id=huge), metadata=[("authorization", ADMIN)])
    assert caught.value.code() == grpc.StatusCode.NOT_FOUND
    assert len(caught.value.details() or "") < 4096


def test_the_bearer_scheme_is_case_insensitive(server: Server) -> None:
    for scheme in ["bearer", "BEARER", "Bearer"]:
        response = httpx.get(f"{server.url}/v1/adapters", headers={"authorization": f"{scheme} {ADMIN}"})
        assert response.status_code == 200, scheme


def test_metrics_name_no_tenant_adapter(server: Server, lora: Path) -> None:
    assert upload(server, "acme/secret-plan", lora, key=TENANT).status_code == 201
    body = {"inputs": "Hi", "parameters": {"max_new_tokens": 2, "adapter_id": "acme/secret-plan"}}
    assert post(server, "/generate", body, key=TENANT).status_code == 200
    assert generated(server, {"adapter_id": "keep", "max_new_tokens": 2})
    metrics = httpx.get(f"{server.url}/metrics").text
    assert "secret-plan" not in metrics
    requests = [line for line in metrics.splitlines() if line.startswith("adapterd_requests_total{")]
    assert any('adapter="acme/*"' in line for line in requests), requests
    assert any('adapter="keep"' in line for line in requests), requests


def gauge(server: Server, name: str) -> float:
    for line in httpx.get(f"{server.url}/metrics").text.splitlines():
        if line.startswith(name + " "):
            return float(line.split()[1])
    raise AssertionError(f"no {name} in /metrics")


@pytest.mark.parametrize(
    ("path", "body"),
    [
        ("/generate", {"inputs": "Once", "parameters": {"max_new_tokens": 4000}}),
        ("/v1/completions", {"model": "keep", "prompt": "Once", "max_tokens": 4000, "n": 2}),
    ],
)
def test_a_non_streaming_request_is_cancelled_when_its_client_leaves(
    server: Server, path: str, body: dict[str, Any]
) -> None:
    """4000 tokens are seconds of work on the tiny model; the client gives up after 1 s."""
    with pytest.raises(httpx.ReadTimeout):
        answer = post(server, path, {**body, "ignore_eos": True}, timeout=1)
        pytest.fail(f"answered in time: {answer.text[:300]}")
    deadline = time.monotonic() + 10
    while gauge(server, "adapterd_running_batch_size") and time.monotonic() < deadline:
        time.sleep(0.05)
    assert gauge(server, "adapterd_running_batch_size") == 0
    tokens = gauge(server, "adapterd_generated_tokens_total")
    time.sleep(0.5)
    assert gauge(server, "adapterd_generated_tokens_total") == tokens


CORRUPT = [b"\xff\xff\xff", b"\x0a\x02\xff\xfe"]  # not protobuf at all; a string field that is not UTF-8


def test_corrupt_grpc_messages_are_invalid_argument_on_every_kind_of_method(server: Server) -> None:
    """grpcio's deserializer answered UNKNOWN before any servicer ran."""
    before = listing(server)
    metadata = [("authorization", ADMIN)]
    with grpc.insecure_channel(server.grpc_target) as channel:
        calls = {
            "/adapterd.v1.Adapters/GetAdapter": lambda raw: channel.unary_unary(
                "/adapterd.v1.Adapters/GetAdapter"
            )(raw, metadata=metadata),
            "/adapterd.v1.Generation/Generate": lambda raw: channel.unary_unary(
                "/adapterd.v1.Generation/Generate"
            )(raw, metadata=metadata),
            "/adapterd.v1.Generation/GenerateStream": lambda raw: list(
                channel.unary_stream("/adapterd.v1.Generation/GenerateStream")(raw, metadata=metadata)
            ),
            "/adapterd.v1.Adapters/UploadAdapter": lambda raw: channel.stream_unary(
                "/adapterd.v1.Adapters/UploadAdapter"
            )(iter([raw]), metadata=metadata),
        }
        for method, call in calls.items():
            for raw in CORRUPT:
                with pytest.raises(grpc.RpcError) as caught:
                    call(raw)
                assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT, (method, caught.value)
                assert "not a valid request message" in (caught.value.details() or "")
        stub = adapters_pb2_grpc.AdaptersStub(channel)
        assert stub.GetAdapter(adapters_pb2.GetAdapterRequest(id="keep"), metadata=metadata).id == "keep"
    assert listing(server) == before


def test_a_request_without_a_key_is_refused_before_its_body_is_read(server: Server) -> None:
    """17 MiB is over the JSON body limit: a key check after reading would answer 413, not 401."""
    big = b'{"inputs": "' + b"a" * (17 * 1024**2) + b'"}'
    headers = {"content-type": "application/json"}
    for key_header in ({}, {"authorization": "Bearer wrong"}):
        response = httpx.post(
            f"{server.url}/generate", content=big, headers={**headers, **key_header}, timeout=60
        )
        assert response.status_code == 401 and response.json()["error_type"] == "unauthorized"
    assert raw_post(server, "/generate", big).status_code == 413  # with the key: read, and over the limit
    assert httpx.get(f"{server.url}/health").status_code == 200  # open routes stay open
