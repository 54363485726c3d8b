"""The gRPC API of a real `adapterd serve` process on loopback: health, reflection, uploads, generation
against PEFT's greedy tokens, adapter management, status codes, API keys and cancellation."""

from __future__ import annotations

import asyncio
import hashlib
import io
import json
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import grpc
import httpx
import pytest
import torch
from google.protobuf import json_format
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc
from transformers import AutoTokenizer

from adapterd.server.model.resolve import ResolvedModel
from adapterd.server.model.tokenizer import encode_chat
from adapterd.v1 import adapters_pb2, adapters_pb2_grpc, generation_pb2, generation_pb2_grpc
from tests.e2e import serving
from tests.reference import (
    greedy_forward,
    greedy_generate,
    load_base,
    load_peft,
    make_lora_adapter,
    make_prompt_adapter,
)

PROMPT = "The three primary colours are"
NUM_TOKENS = 16
MAX_UPLOAD_BYTES = 1_000_000
SERVICES = ("adapterd.v1.Generation", "adapterd.v1.Adapters")
KEYS = "adminkey admin\nuserkey user\nacmekey user acme\n"
SERVE_ARGS = ("--max-rank", "64", "--max-gpu-adapters", "4", "--kv-cache-tokens", "4096")


@dataclass
class Server:
    """A running `adapterd serve` and a gRPC channel to it."""

    process: serving.Server
    channel: grpc.Channel

    @property
    def http(self) -> str:
        return self.process.url

    @property
    def generation(self) -> generation_pb2_grpc.GenerationStub:
        return generation_pb2_grpc.GenerationStub(self.channel)

    @property
    def adapters(self) -> adapters_pb2_grpc.AdaptersStub:
        return adapters_pb2_grpc.AdaptersStub(self.channel)


@contextmanager
def grpc_server(model_dir: Path, work_dir: Path, *extra: str) -> Iterator[Server]:
    args = (*SERVE_ARGS, "--max-upload-bytes", str(MAX_UPLOAD_BYTES), *extra)
    with (
        serving.running_server(model_dir, work_dir / "store", work_dir / "server.log", *args) as process,
        grpc.insecure_channel(process.grpc_target) as channel,
    ):
        yield Server(process, channel)


# -- requests ---------------------------------------------------------------------------------------------


def upload_parts(
    adapter_id: str, adapter_dir: Path, num_chunks: int = 3, metadata: dict[str, Any] | None = None
) -> list[adapters_pb2.UploadAdapterRequest]:
    """A header, then adapter_model.safetensors split into `num_chunks` chunks."""
    header = adapters_pb2.UploadHeader(id=adapter_id, adapter_config=config_bytes(adapter_dir))
    if metadata is not None:
        header.metadata.update(metadata)
    weights = (adapter_dir / "adapter_model.safetensors").read_bytes()
    size = -(-len(weights) // num_chunks)
    chunks = [weights[i : i + size] for i in range(0, len(weights), size)]
    return [
        adapters_pb2.UploadAdapterRequest(header=header),
        *(adapters_pb2.UploadAdapterRequest(weights_chunk=c) for c in chunks),
    ]


def config_bytes(adapter_dir: Path, **changes: Any) -> bytes:
    raw = (adapter_dir / "adapter_config.json").read_bytes()
    return json.dumps({**json.loads(raw), **changes}).encode() if changes else raw


def upload(
    server: Server, parts: list[adapters_pb2.UploadAdapterRequest], key: str | None = None
) -> adapters_pb2.UploadAdapterResponse:
    return server.adapters.UploadAdapter(iter(parts), metadata=auth(key))


def request(adapter_id: str = "", max_new_tokens: int = NUM_TOKENS, **params: Any) -> Any:
    parameters = generation_pb2.GenerationParameters(max_new_tokens=max_new_tokens, ignore_eos=True, **params)
    return generation_pb2.GenerateRequest(prompt=PROMPT, adapter_id=adapter_id, parameters=parameters)


def auth(key: str | None) -> tuple[tuple[str, str], ...]:
    return (("authorization", f"Bearer {key}"),) if key else ()


def adapter_ids(server: Server, key: str | None = None) -> list[str]:
    return [
        a.id
        for a in server.adapters.ListAdapters(adapters_pb2.ListAdaptersRequest(), metadata=auth(key)).adapters
    ]


@contextmanager
def raises_status(code: grpc.StatusCode, *words: str) -> Iterator[None]:
    """The call fails with `code`, and its message names each of `words`."""
    with pytest.raises(grpc.RpcError) as failure:
        yield
    error: Any = failure.value
    assert error.code() == code, error.details()
    for word in words:
        assert word in error.details()


def metric(server: Server, name: str) -> float:
    for line in httpx.get(f"{server.http}/metrics", timeout=5).text.splitlines():
        if line.startswith(f"{name} "):
            return float(line.split()[1])
    raise AssertionError(f"metric {name} not found")


# -- fixtures ---------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def model_dir(default_model: ResolvedModel, tmp_path_factory: pytest.TempPathFactory) -> Path:
    # max_position_embeddings 4096: room for the long generation that the cancellation test cuts short.
    return serving.make_tiny_chat_model(tmp_path_factory.mktemp("tiny-llama-text"), default_model.path)


@pytest.fixture(scope="module")
def tokenizer(model_dir: Path) -> Any:
    return AutoTokenizer.from_pretrained(model_dir)


@pytest.fixture(scope="module")
def adapter_dirs(model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("grpc-adapters")
    return {
        "lora": make_lora_adapter(model_dir, root / "lora", r=8, alpha=16, target_modules="all-linear"),
        "soft": make_prompt_adapter(model_dir, root / "soft", num_virtual_tokens=4, seed=1),
    }


@pytest.fixture(scope="module")
def expected(model_dir: Path, adapter_dirs: dict[str, Path], tokenizer: Any) -> dict[str, list[int]]:
    """PEFT's greedy tokens for PROMPT: base, LoRA (generate) and soft prompt (full forward passes)."""
    ids = tokenizer(PROMPT).input_ids
    return {
        "": greedy_generate(load_base(model_dir), ids, NUM_TOKENS),
        "lora": greedy_generate(load_peft(model_dir, adapter_dirs["lora"]), ids, NUM_TOKENS),
        "soft": greedy_forward(load_peft(model_dir, adapter_dirs["soft"]), ids, NUM_TOKENS),
    }


@pytest.fixture(scope="module")
def server(model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    with grpc_server(model_dir, tmp_path_factory.mktemp("grpc-server")) as running:
        yield running


@pytest.fixture(scope="module")
def uploaded(server: Server, adapter_dirs: dict[str, Path]) -> dict[str, adapters_pb2.UploadAdapterResponse]:
    return {
        "lora": upload(server, upload_parts("lora", adapter_dirs["lora"], metadata={"job": {"id": "j-1"}})),
        "soft": upload(server, upload_parts("soft", adapter_dirs["soft"], num_chunks=2)),
    }


@pytest.fixture(scope="module")
def keyed_server(model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    work_dir = tmp_path_factory.mktemp("grpc-keyed-server")
    (work_dir / "keys.txt").write_text(KEYS)
    with grpc_server(model_dir, work_dir, "--api-keys", str(work_dir / "keys.txt")) as running:
        yield running


# -- health and reflection --------------------------------------------------------------------------------


def test_health_reports_serving(server: Server):
    stub = health_pb2_grpc.HealthStub(server.channel)
    for service in ("", *SERVICES):
        answer = stub.Check(health_pb2.HealthCheckRequest(service=service))
        assert answer.status == health_pb2.HealthCheckResponse.SERVING, service
    with raises_status(grpc.StatusCode.NOT_FOUND):
        stub.Check(health_pb2.HealthCheckRequest(service="adapterd.v1.Nothing"))


def test_reflection_lists_and_describes_the_services(server: Server):
    stub = reflection_pb2_grpc.ServerReflectionStub(server.channel)
    asks = [
        reflection_pb2.ServerReflectionRequest(list_services=""),
        reflection_pb2.ServerReflectionRequest(file_containing_symbol="adapterd.v1.Adapters"),
    ]
    listed, described = stub.ServerReflectionInfo(iter(asks))
    names = {s.name for s in listed.list_services_response.service}
    assert names >= {*SERVICES, "grpc.health.v1.Health", "grpc.reflection.v1alpha.ServerReflection"}
    files = described.file_descriptor_response.file_descriptor_proto
    assert any(b"UploadAdapter" in f for f in files)


# -- uploads and generation -------------------------------------------------------------------------------


def test_upload_answers_the_description(
    uploaded: dict[str, adapters_pb2.UploadAdapterResponse], adapter_dirs: dict[str, Path], model_dir: Path
):
    lora, soft = uploaded["lora"], uploaded["soft"]
    assert not lora.replaced and not soft.replaced
    assert (lora.adapter.id, lora.adapter.type, lora.adapter.rank, lora.adapter.version) == (
        "lora",
        "lora",
        8,
        1,
    )
    assert not lora.adapter.HasField("num_virtual_tokens")
    assert set(lora.adapter.target_modules) >= {"q_proj", "v_proj", "down_proj"}
    assert json_format.MessageToDict(lora.adapter.metadata) == {"job": {"id": "j-1"}}
    assert (soft.adapter.type, soft.adapter.num_virtual_tokens) == ("prompt_tuning", 4)
    assert not soft.adapter.HasField("rank") and not soft.adapter.target_modules
    for name, answer in uploaded.items():
        files = (
            config_bytes(adapter_dirs[name]) + (adapter_dirs[name] / "adapter_model.safetensors").read_bytes()
        )
        assert answer.adapter.sha256 == hashlib.sha256(files).hexdigest()
        assert answer.adapter.size_bytes == len(files)
        assert answer.adapter.base_model == model_dir.name
        assert answer.adapter.residency in ("disk", "cpu", "gpu")
        assert answer.adapter.created_at.endswith("Z")


@pytest.mark.parametrize("adapter_id", ["", "lora", "soft"])
def test_generate_and_stream_equal_peft(
    server: Server, uploaded: Any, expected: dict[str, list[int]], tokenizer: Any, adapter_id: str
):
    done = server.generation.Generate(request(adapter_id))
    assert list(done.token_ids) == expected[adapter_id]
    assert (done.finish_reason, done.generated_tokens) == ("length", NUM_TOKENS)
    assert done.prompt_tokens == len(tokenizer(PROMPT).input_ids)
    assert done.text == tokenizer.decode(done.token_ids, skip_special_tokens=True)

    events = list(server.generation.GenerateStream(request(adapter_id)))
    assert [e.WhichOneof("event") for e in events] == ["token"] * NUM_TOKENS + ["done"]
    assert [e.token.token_id for e in events[:-1]] == list(done.token_ids)
    assert "".join(e.token.text for e in events[:-1]) == done.text
    assert events[-1].done == done


def test_generate_from_chat_messages(server: Server, tokenizer: Any):
    turns = [{"role": "user", "content": "What is the capital of France?"}]
    messages = generation_pb2.ChatMessages(messages=[generation_pb2.ChatMessage(**t) for t in turns])
    params = generation_pb2.GenerationParameters(max_new_tokens=4, ignore_eos=True)
    done = server.generation.Generate(generation_pb2.GenerateRequest(messages=messages, parameters=params))
    assert done.prompt_tokens == len(encode_chat(tokenizer, turns))
    assert done.generated_tokens == 4


def test_unset_parameters_take_the_defaults(server: Server, expected: dict[str, list[int]]):
    """No max_new_tokens: the server's 64; no temperature: greedy."""
    parameters = generation_pb2.GenerationParameters(ignore_eos=True)
    done = server.generation.Generate(generation_pb2.GenerateRequest(prompt=PROMPT, parameters=parameters))
    assert done.generated_tokens == 64
    assert list(done.token_ids[:NUM_TOKENS]) == expected[""]


def test_list_get_replace_and_delete(server: Server, uploaded: Any, adapter_dirs: dict[str, Path]):
    first = upload(server, upload_parts("temp", adapter_dirs["lora"]))
    second = upload(server, upload_parts("temp", adapter_dirs["soft"]))
    assert (first.replaced, first.adapter.version) == (False, 1)
    assert (second.replaced, second.adapter.version, second.adapter.type) == (True, 2, "prompt_tuning")
    assert adapter_ids(server) == ["lora", "soft", "temp"]
    shown = server.adapters.GetAdapter(adapters_pb2.GetAdapterRequest(id="temp"))
    assert (shown.id, shown.version, shown.sha256) == ("temp", 2, second.adapter.sha256)

    server.adapters.DeleteAdapter(adapters_pb2.DeleteAdapterRequest(id="temp"))
    assert adapter_ids(server) == ["lora", "soft"]
    with raises_status(grpc.StatusCode.NOT_FOUND, "temp"):
        server.adapters.GetAdapter(adapters_pb2.GetAdapterRequest(id="temp"))
    with raises_status(grpc.StatusCode.NOT_FOUND, "temp"):
        server.adapters.DeleteAdapter(adapters_pb2.DeleteAdapterRequest(id="temp"))


# -- errors -----------------------------------------------------------------------------------------------


def test_unknown_adapter_is_not_found(server: Server):
    with raises_status(grpc.StatusCode.NOT_FOUND, "nope"):
        server.generation.Generate(request("nope"))
    with raises_status(grpc.StatusCode.NOT_FOUND, "nope"):
        list(server.generation.GenerateStream(request("nope")))
    with raises_status(grpc.StatusCode.NOT_FOUND, "nope"):
        server.adapters.GetAdapter(adapters_pb2.GetAdapterRequest(id="nope"))


@pytest.mark.parametrize(
    ("params", "named"),
    [
        ({"temperature": -1.0}, "temperature"),
        ({"top_p": 2.0}, "top_p"),
        ({"max_new_tokens": 0}, "max_new_tokens"),
        ({"top_k": -3}, "top_k"),
        ({"stop": [""]}, "stop"),
    ],
)
def test_bad_parameters_are_invalid_argument(server: Server, params: dict[str, Any], named: str):
    max_new_tokens = params.pop("max_new_tokens", NUM_TOKENS)
    with raises_status(grpc.StatusCode.INVALID_ARGUMENT, named):
        server.generation.Generate(request(max_new_tokens=max_new_tokens, **params))
    with raises_status(grpc.StatusCode.INVALID_ARGUMENT, named):
        list(server.generation.GenerateStream(request(max_new_tokens=max_new_tokens, **params)))


def test_missing_prompt_is_invalid_argument(server: Server):
    with raises_status(grpc.StatusCode.INVALID_ARGUMENT, "prompt"):
        server.generation.Generate(generation_pb2.GenerateRequest())
    with raises_status(grpc.StatusCode.INVALID_ARGUMENT, "messages"):
        server.generation.Generate(generation_pb2.GenerateRequest(messages=generation_pb2.ChatMessages()))


def _pickled_weights(adapter_dir: Path) -> bytes:
    from safetensors.torch import load_file

    buffer = io.BytesIO()
    torch.save(load_file(adapter_dir / "adapter_model.safetensors"), buffer)
    return buffer.getvalue()


MALFORMED_UPLOADS = {
    # name: (how to break a good upload of the LoRA adapter, words the error message must contain)
    "no-header-first": (lambda parts, _: parts[1:] + parts[:1], ["first message", "header"]),
    "empty-stream": (lambda parts, _: [], ["header"]),
    "two-headers": (lambda parts, _: [*parts, parts[0]], ["header"]),
    "no-weights": (lambda parts, _: parts[:1], ["no weights", "adapter_model.safetensors"]),
    "pickle-weights": (
        lambda parts, d: [parts[0], adapters_pb2.UploadAdapterRequest(weights_chunk=_pickled_weights(d))],
        ["adapter_model.safetensors", "safetensors"],
    ),
    "dora-without-magnitudes": (
        lambda parts, d: [_with_config(parts[0], config_bytes(d, use_dora=True)), *parts[1:]],
        ["lora_magnitude_vector", "DoRA magnitude vector"],
    ),
    "loha": (
        lambda parts, d: [_with_config(parts[0], config_bytes(d, peft_type="LOHA")), *parts[1:]],
        ["peft_type", "LOHA"],
    ),
    "not-json": (lambda parts, _: [_with_config(parts[0], b"{oops"), *parts[1:]], ["adapter_config.json"]),
    "bad-id": (lambda parts, _: [_with_id(parts[0], "../etc"), *parts[1:]], ["adapter id"]),
    "too-large": (
        lambda parts, _: [parts[0], *[adapters_pb2.UploadAdapterRequest(weights_chunk=bytes(400_000))] * 3],
        ["limit", str(MAX_UPLOAD_BYTES)],
    ),
}


def _with_config(header_part: Any, config: bytes) -> Any:
    part = adapters_pb2.UploadAdapterRequest()
    part.CopyFrom(header_part)
    part.header.adapter_config = config
    return part


def _with_id(header_part: Any, adapter_id: str) -> Any:
    part = adapters_pb2.UploadAdapterRequest()
    part.CopyFrom(header_part)
    part.header.id = adapter_id
    return part


@pytest.mark.parametrize("case", list(MALFORMED_UPLOADS))
def test_malformed_upload_is_invalid_argument_and_changes_nothing(
    server: Server, uploaded: Any, adapter_dirs: dict[str, Path], case: str
):
    before = adapter_ids(server)
    breaks, words = MALFORMED_UPLOADS[case]
    parts = breaks(upload_parts("broken", adapter_dirs["lora"]), adapter_dirs["lora"])
    with raises_status(grpc.StatusCode.INVALID_ARGUMENT, *words):
        upload(server, parts)
    assert adapter_ids(server) == before


# -- API keys ---------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def keyed_adapters(keyed_server: Server, adapter_dirs: dict[str, Path]) -> None:
    for adapter_id in ("public", "acme/mine", "globex/theirs"):
        upload(keyed_server, upload_parts(adapter_id, adapter_dirs["lora"]), key="adminkey")


def test_missing_or_wrong_key_is_unauthenticated(keyed_server: Server):
    with raises_status(grpc.StatusCode.UNAUTHENTICATED, "API key"):
        adapter_ids(keyed_server)
    with raises_status(grpc.StatusCode.UNAUTHENTICATED, "API key"):
        keyed_server.generation.Generate(request(), metadata=auth("wrongkey"))
    with raises_status(grpc.StatusCode.UNAUTHENTICATED):
        list(keyed_server.generation.GenerateStream(request()))


def test_bare_key_is_accepted(keyed_server: Server):
    done = keyed_server.generation.Generate(
        request(max_new_tokens=2), metadata=(("authorization", "userkey"),)
    )
    assert done.generated_tokens == 2


def test_user_key_may_not_upload_or_delete(keyed_server: Server, keyed_adapters: None, adapter_dirs: Any):
    with raises_status(grpc.StatusCode.PERMISSION_DENIED):
        upload(keyed_server, upload_parts("mine", adapter_dirs["lora"]), key="userkey")
    with raises_status(grpc.StatusCode.PERMISSION_DENIED):
        keyed_server.adapters.DeleteAdapter(
            adapters_pb2.DeleteAdapterRequest(id="public"), metadata=auth("userkey")
        )
    assert "mine" not in adapter_ids(keyed_server, "adminkey")


def test_tenant_key_sees_its_own_and_public_adapters_only(keyed_server: Server, keyed_adapters: None):
    assert adapter_ids(keyed_server, "adminkey") == ["acme/mine", "globex/theirs", "public"]
    assert adapter_ids(keyed_server, "acmekey") == ["acme/mine", "public"]
    for adapter_id in ("acme/mine", "public"):
        keyed_server.generation.Generate(request(adapter_id, max_new_tokens=2), metadata=auth("acmekey"))
    with raises_status(grpc.StatusCode.NOT_FOUND, "globex/theirs"):
        keyed_server.adapters.GetAdapter(
            adapters_pb2.GetAdapterRequest(id="globex/theirs"), metadata=auth("acmekey")
        )
    with raises_status(grpc.StatusCode.NOT_FOUND, "globex/theirs"):
        keyed_server.generation.Generate(request("globex/theirs"), metadata=auth("acmekey"))


# -- cancellation -----------------------------------------------------------------------------------------


def test_cancelled_stream_stops_the_generation(server: Server):
    call = server.generation.GenerateStream(request(max_new_tokens=4000))
    started = time.monotonic()
    for num_tokens, event in enumerate(call, start=1):
        assert event.WhichOneof("event") == "token"
        if num_tokens == 2:
            call.cancel()
            break
    while metric(server, "adapterd_running_batch_size") > 0:
        assert time.monotonic() - started < 5, "the cancelled sequence is still running"
        time.sleep(0.05)
    stub = health_pb2_grpc.HealthStub(server.channel)
    assert stub.Check(health_pb2.HealthCheckRequest()).status == health_pb2.HealthCheckResponse.SERVING
    assert server.generation.Generate(request(max_new_tokens=3)).generated_tokens == 3


# -- binding ----------------------------------------------------------------------------------------------


def test_busy_port_is_a_clear_error():
    from adapterd.server.common.auth import ApiKeys
    from adapterd.server.grpc.server import start_grpc_server
    from adapterd.server.wire.grpc_server import GrpcBindError

    async def bind_twice() -> None:
        occupant = grpc.aio.server()  # grpc's defaults, SO_REUSEPORT included
        port = occupant.add_insecure_port("127.0.0.1:0")
        await occupant.start()
        try:
            with pytest.raises(GrpcBindError, match=f"127.0.0.1:{port}.*--grpc-port"):
                service = SimpleNamespace(config=SimpleNamespace(replica="test"))  # never called
                await start_grpc_server(service, ApiKeys.open(), f"127.0.0.1:{port}")  # type: ignore[arg-type]
        finally:
            await occupant.stop(None)

    asyncio.run(bind_twice())
