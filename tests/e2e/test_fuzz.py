"""Property-based fuzzing (Hypothesis) of every HTTP route and every gRPC method of a real `adapterd serve` on
loopback: bodies built from each route's own field names with any JSON value, well-formed or hostile, and
messages of each method's own type with any field values. None may be a server error (5xx, INTERNAL,
UNKNOWN); afterwards the server answers, the registry is unchanged and the store holds no half-written file.

CI runs a fixed, derandomized budget; a longer random run is
`ADAPTERD_FUZZ_EXAMPLES=2000 ADAPTERD_FUZZ_RANDOM=1 pytest tests/e2e/test_fuzz.py`."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any
from urllib.parse import quote

import grpc
import httpx
import pytest
import schemathesis
from google.protobuf.descriptor import Descriptor, FieldDescriptor
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from schemathesis.checks import not_a_server_error
from schemathesis.specs.openapi.checks import (
    content_type_conformance,
    response_schema_conformance,
    status_code_conformance,
)

from adapterd.server.http.openapi import openapi_document
from adapterd.server.model.resolve import ResolvedModel
from adapterd.v1 import adapters_pb2, adapters_pb2_grpc, generation_pb2, generation_pb2_grpc
from tests.e2e.serving import Server, make_tiny_chat_model, running_server
from tests.e2e.test_http import FILES
from tests.reference import make_lora_adapter

EXAMPLES = int(os.environ.get("ADAPTERD_FUZZ_EXAMPLES", "60"))
FUZZ = settings(
    max_examples=EXAMPLES,
    deadline=None,
    derandomize=not os.environ.get("ADAPTERD_FUZZ_RANDOM"),
    database=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
COUNTS: dict[str, int] = {}


@pytest.fixture(scope="module")
def model(default_model: ResolvedModel, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_tiny_chat_model(tmp_path_factory.mktemp("tiny-chat-fuzz"), default_model.path)


@pytest.fixture(scope="module")
def server(model: Path, tmp_path_factory: pytest.TempPathFactory):
    root = tmp_path_factory.mktemp("fuzz-server")
    lora = make_lora_adapter(model, root / "lora", r=4, alpha=8, target_modules=["q_proj", "v_proj"])
    args = ("--max-rank", "8", "--allowed-lora-dir", str(root / "allowed"), "--max-upload-bytes", "1000000")
    (root / "allowed").mkdir()
    with running_server(model, root / "store", root / "log", *args) as running:
        files = {name: (name, (lora / name).read_bytes()) for name in FILES}
        assert httpx.put(f"{running.url}/v1/adapters/keep", files=files, timeout=60).status_code == 201
        running.root = root  # type: ignore[attr-defined]
        running.before = listing(running)  # type: ignore[attr-defined]
        running.rss_before = resident_mb(running)  # type: ignore[attr-defined]
        yield running


def listing(server: Server) -> list[dict[str, Any]]:
    adapters = httpx.get(f"{server.url}/v1/adapters", timeout=30).json()["data"]
    return sorted(({"id": a["id"], "version": a["version"]} for a in adapters), key=lambda a: a["id"])


def resident_mb(server: Server) -> float | None:
    """The server process's resident memory in MB (Linux), printed beside the counts: fuzzing must not grow it
    without bound (measured by the long run, not asserted)."""
    status = Path(f"/proc/{server.process.pid}/status")
    if not status.exists():
        return None
    kilobytes = next(line.split()[1] for line in status.read_text().splitlines() if line.startswith("VmRSS"))
    return int(kilobytes) / 1024


def staged_leftovers(store: Path) -> list[str]:
    """Files under the store's staging area (uploads in progress): none once every upload has answered."""
    staging = store / "tmp"
    return sorted(str(p.relative_to(store)) for p in staging.rglob("*"))


# -- JSON bodies ----------------------------------------------------------------------------------------------

SCALARS = (
    st.none()
    | st.booleans()
    | st.integers(min_value=-(2**70), max_value=2**70)
    | st.sampled_from([0, 1, -1, 2, 64, 2**31, 2**63, 2**64, 10**30])
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.sampled_from([1e-300, 5e-324, 1e300, -0.0, 0.5, 1.0, 2.0])
    | st.text(max_size=24)
    | st.sampled_from(["", "keep", "x/y", "\u0000", "Hello", "json", "regex", "choice", "text"])
)
VALUES = st.recursive(
    SCALARS,
    lambda children: (
        st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=10), children, max_size=4)
    ),
    max_leaves=12,
)
SMALL_COUNT = st.integers(min_value=1, max_value=6)


@st.composite
def bodies(
    draw: st.DrawFn, fields: dict[str, st.SearchStrategy[Any]], required: tuple[str, ...] = ()
) -> dict[str, Any]:
    """A body with any subset of `fields`, each a well-formed value; half the time one field (named or
    not) carries any JSON value instead, so the fuzzing reaches past the first check as well as into it."""
    names = draw(st.lists(st.sampled_from(sorted(fields)), unique=True, max_size=len(fields)))
    body = {name: draw(fields[name]) for name in (*required, *names)}
    if draw(st.booleans()):
        body[draw(st.sampled_from(sorted(fields)) | st.text(max_size=10))] = draw(VALUES)
    return body


TEXT = st.text(max_size=40)
ADAPTER = st.sampled_from(["keep", "missing", "", "x/y"])
SCHEMA = st.sampled_from(
    [{"type": "object"}, {"type": "string", "maxLength": 3}, {"enum": ["a", "b"]}, {"type": "integer"}]
)
GRAMMAR = st.sampled_from(["json", "json_schema", "regex"]).flatmap(
    lambda kind: st.fixed_dictionaries(
        {
            "type": st.just(kind),
            "value": SCHEMA if kind != "regex" else st.sampled_from(["[a-z]{1,3}", "\\d+"]),
        }
    )
)
SAMPLING = {
    "temperature": st.floats(0, 2),
    "top_p": st.floats(0.01, 1),
    "top_k": st.integers(0, 50),
    "seed": st.integers(0, 2**64 - 1),
    "stop": st.lists(st.text(min_size=1, max_size=3), max_size=2),
    "logit_bias": st.dictionaries(st.integers(0, 49151).map(str), st.floats(-100, 100), max_size=2),
    "repetition_penalty": st.floats(0.5, 2),
    "presence_penalty": st.floats(-2, 2),
    "frequency_penalty": st.floats(-2, 2),
    "min_tokens": st.integers(0, 3),
}
TGI_PARAMETERS = bodies(
    {
        **{
            k: v
            for k, v in SAMPLING.items()
            if k not in ("logit_bias", "presence_penalty", "frequency_penalty")
        },
        "max_new_tokens": SMALL_COUNT,
        "do_sample": st.booleans(),
        "adapter_id": ADAPTER,
        "best_of": st.integers(1, 3),
        "details": st.booleans(),
        "decoder_input_details": st.booleans(),
        "return_full_text": st.booleans(),
        "truncate": st.integers(1, 8),
        "grammar": GRAMMAR,
        "top_n_tokens": st.integers(0, 5),
    },
    required=("max_new_tokens",),
)
TGI = bodies({"inputs": TEXT, "parameters": TGI_PARAMETERS, "stream": st.booleans()}, required=("inputs",))
OPENAI_COMMON = {
    **SAMPLING,
    "n": st.integers(1, 3),
    "stream": st.booleans(),
    "best_of": st.integers(1, 3),
    "user": TEXT,
    "response_format": st.sampled_from([{"type": "text"}, {"type": "json_object"}])
    | SCHEMA.map(lambda s: {"type": "json_schema", "json_schema": {"name": "x", "schema": s}}),
    "guided_choice": st.lists(st.text(min_size=1, max_size=4), min_size=1, max_size=3),
    "guided_regex": st.sampled_from(["[a-z]{1,3}", "yes|no"]),
}
COMPLETIONS = bodies(
    {
        **OPENAI_COMMON,
        "model": ADAPTER,
        "max_tokens": SMALL_COUNT,
        "prompt": TEXT | st.lists(st.integers(0, 49151), min_size=1, max_size=8) | st.lists(TEXT, max_size=2),
        "logprobs": st.integers(0, 5),
        "echo": st.booleans(),
    },
    required=("model", "max_tokens"),
)
MESSAGE = st.fixed_dictionaries({"role": st.sampled_from(["user", "system", "assistant"]), "content": TEXT})
TOOL = st.fixed_dictionaries(
    {
        "type": st.just("function"),
        "function": st.fixed_dictionaries({"name": st.sampled_from(["f", "get"]), "parameters": SCHEMA}),
    }
)
CHAT = bodies(
    {
        **OPENAI_COMMON,
        "model": ADAPTER,
        "max_tokens": SMALL_COUNT,
        "messages": st.lists(MESSAGE, min_size=1, max_size=3),
        "tools": st.lists(TOOL, min_size=1, max_size=2),
        "tool_choice": st.sampled_from(["auto", "none", "required"]),
        "logprobs": st.booleans(),
        "top_logprobs": st.integers(0, 5),
    },
    required=("model", "max_tokens", "messages"),
)
TOKENIZE = bodies(
    {
        "inputs": TEXT,
        "prompt": TEXT,
        "messages": st.lists(MESSAGE, min_size=1, max_size=2),
        "add_special_tokens": st.booleans(),
        "tokens": st.lists(st.integers(0, 49151), max_size=8),
        "model": ADAPTER,
    }
)
LORA = bodies({"lora_name": st.sampled_from(["fuzzed", "x/y"]) | TEXT, "lora_path": TEXT})
ROUTES = {
    "/generate": TGI,
    "/generate_stream": TGI,
    "/": TGI,
    "/models/keep/generate": TGI,
    "/v1/completions": COMPLETIONS,
    "/v1/chat/completions": CHAT,
    "/tokenize": TOKENIZE,
    "/detokenize": TOKENIZE,
    "/v1/load_lora_adapter": LORA,
    "/v1/unload_lora_adapter": LORA.filter(lambda body: body.get("lora_name") != "keep"),
}


def no_server_error(response: httpx.Response, what: Any) -> None:
    answered = f"HTTP {response.status_code // 100}xx"
    COUNTS[answered] = COUNTS.get(answered, 0) + 1
    assert response.status_code < 500, (what, response.status_code, response.text[:500])
    if response.headers.get("content-type", "").startswith("text/event-stream"):
        assert '"internal' not in response.text, (what, response.text[:500])


@pytest.mark.parametrize("route", sorted(ROUTES))
def test_fuzzed_json_bodies_never_get_a_server_error(server: Server, route: str) -> None:
    with httpx.Client(base_url=server.url, timeout=120) as http:

        @FUZZ
        @given(body=ROUTES[route])
        def check(body: Any) -> None:
            COUNTS[route] = COUNTS.get(route, 0) + 1
            no_server_error(http.post(route, content=json.dumps(body)), body)

        check()


@FUZZ
@given(
    method=st.sampled_from(["GET", "PUT", "DELETE", "POST"]),
    adapter_id=st.text(min_size=1, max_size=40).filter(lambda i: i.strip("/") not in ("keep", "")),
    body=st.binary(max_size=64),
)
def test_fuzzed_adapter_routes_never_get_a_server_error(
    server: Server, method: str, adapter_id: str, body: bytes
) -> None:
    COUNTS["/v1/adapters/{id}"] = COUNTS.get("/v1/adapters/{id}", 0) + 1
    url = f"{server.url}/v1/adapters/{quote(adapter_id, safe='/')}"
    response = httpx.request(method, url, content=body, timeout=60)
    no_server_error(response, (method, adapter_id))


# -- gRPC messages ----------------------------------------------------------------------------------------------

INT_RANGES = {
    FieldDescriptor.TYPE_INT32: (-(2**31), 2**31 - 1),
    FieldDescriptor.TYPE_SINT32: (-(2**31), 2**31 - 1),
    FieldDescriptor.TYPE_UINT32: (0, 2**32 - 1),
    FieldDescriptor.TYPE_INT64: (-(2**63), 2**63 - 1),
    FieldDescriptor.TYPE_SINT64: (-(2**63), 2**63 - 1),
    FieldDescriptor.TYPE_UINT64: (0, 2**64 - 1),
}


def field_values(field: FieldDescriptor, depth: int) -> st.SearchStrategy[Any]:
    kind = field.type
    if kind == FieldDescriptor.TYPE_MESSAGE:
        if field.message_type.full_name == "google.protobuf.Struct" or depth > 2:
            return st.none()
        return message_dicts(field.message_type, depth + 1)
    if kind in INT_RANGES:
        low, high = INT_RANGES[kind]
        return st.integers(low, high) | st.sampled_from([0, 1, 2, 64, high])
    if kind in (FieldDescriptor.TYPE_FLOAT, FieldDescriptor.TYPE_DOUBLE):
        return st.floats(allow_nan=True, width=32 if kind == FieldDescriptor.TYPE_FLOAT else 64)
    if kind == FieldDescriptor.TYPE_BOOL:
        return st.booleans()
    if kind == FieldDescriptor.TYPE_STRING:
        return st.text(max_size=30) | st.sampled_from(["keep", "", "json", "regex"])
    if kind == FieldDescriptor.TYPE_BYTES:
        return st.binary(max_size=64)
    if kind == FieldDescriptor.TYPE_ENUM:
        return st.sampled_from([value.number for value in field.enum_type.values])
    return st.none()


def message_dicts(descriptor: Descriptor, depth: int = 0) -> st.SearchStrategy[dict[str, Any]]:
    """Any subset of the message's fields, each with any value of its type (repeated: a few)."""
    optional = {}
    for field in descriptor.fields:
        values = field_values(field, depth)
        optional[field.name] = st.lists(values, max_size=3) if field.is_repeated else values
    return st.fixed_dictionaries({}, optional=optional).map(
        lambda d: {k: v for k, v in d.items() if v is not None}
    )


def build(message_type: Any, fields: dict[str, Any]) -> Any:
    message = message_type()
    for name, value in fields.items():
        target = getattr(message, name)
        if isinstance(value, dict):
            target.CopyFrom(build(type(target), value))
        elif isinstance(value, list):
            for item in value:
                if isinstance(item, dict):
                    target.add().CopyFrom(build(type(target.add()), item))
                else:
                    target.append(item)
        else:
            setattr(message, name, value)
    return message


GRPC_CODES_NOT_ALLOWED = {grpc.StatusCode.INTERNAL, grpc.StatusCode.UNKNOWN}


def no_grpc_server_error(call: Any, what: Any) -> None:
    try:
        call()
    except grpc.RpcError as exc:
        COUNTS[f"gRPC {exc.code().name}"] = COUNTS.get(f"gRPC {exc.code().name}", 0) + 1
        assert exc.code() not in GRPC_CODES_NOT_ALLOWED, (what, exc.code(), exc.details())
    else:
        COUNTS["gRPC OK"] = COUNTS.get("gRPC OK", 0) + 1


@pytest.fixture(scope="module")
def channel(server: Server):
    with grpc.insecure_channel(server.grpc_target) as opened:
        yield opened


@FUZZ
@given(fields=message_dicts(generation_pb2.GenerateRequest.DESCRIPTOR), streaming=st.booleans())
def test_fuzzed_generation_messages_never_get_a_server_error(
    channel: grpc.Channel, fields: dict[str, Any], streaming: bool
) -> None:
    COUNTS["Generation"] = COUNTS.get("Generation", 0) + 1
    stub = generation_pb2_grpc.GenerationStub(channel)
    fields.setdefault("parameters", {})["max_new_tokens"] = 4
    request = build(generation_pb2.GenerateRequest, fields)
    call = (
        (lambda: list(stub.GenerateStream(request, timeout=60)))
        if streaming
        else (lambda: stub.Generate(request, timeout=60))
    )
    no_grpc_server_error(call, fields)


@FUZZ
@given(
    get=message_dicts(adapters_pb2.GetAdapterRequest.DESCRIPTOR),
    delete=message_dicts(adapters_pb2.DeleteAdapterRequest.DESCRIPTOR).filter(
        lambda d: d.get("id") != "keep"
    ),
    upload=st.lists(message_dicts(adapters_pb2.UploadAdapterRequest.DESCRIPTOR), min_size=1, max_size=3),
)
def test_fuzzed_adapter_messages_never_get_a_server_error(
    channel: grpc.Channel, get: dict[str, Any], delete: dict[str, Any], upload: list[dict[str, Any]]
) -> None:
    COUNTS["Adapters"] = COUNTS.get("Adapters", 0) + 1
    stub = adapters_pb2_grpc.AdaptersStub(channel)
    upload = [part for part in upload if part.get("header", {}).get("id") != "keep"]
    no_grpc_server_error(lambda: stub.ListAdapters(adapters_pb2.ListAdaptersRequest(), timeout=60), "list")
    no_grpc_server_error(lambda: stub.GetAdapter(build(adapters_pb2.GetAdapterRequest, get), timeout=60), get)
    no_grpc_server_error(
        lambda: stub.DeleteAdapter(build(adapters_pb2.DeleteAdapterRequest, delete), timeout=60), delete
    )
    parts = [build(adapters_pb2.UploadAdapterRequest, part) for part in upload]
    no_grpc_server_error(lambda: stub.UploadAdapter(iter(parts), timeout=60), upload)


# -- Schemathesis, from the server's own OpenAPI document --------------------------------------------------------

CAPPED_COUNTS = ("max_new_tokens", "max_tokens", "max_completion_tokens", "n", "best_of")
SCHEMA_CHECKS = [
    not_a_server_error,
    status_code_conformance,
    content_type_conformance,
    response_schema_conformance,
]


@pytest.fixture(scope="module")
def openapi_schema(server: Server) -> Any:
    schema = schemathesis.openapi.from_url(f"{server.url}/openapi.json")

    @schema.hook
    def map_body(context: Any, body: Any) -> Any:
        """Keep generation short (the document allows any count the context holds)."""
        parts = [body, body.get("parameters")] if isinstance(body, dict) else []
        for part in parts:
            for name in CAPPED_COUNTS:
                if isinstance(part, dict) and isinstance(part.get(name), int) and part[name] > 4:
                    part[name] = 4
        return body

    @schema.hook
    def filter_path_parameters(context: Any, path_parameters: Any) -> bool:
        return (path_parameters or {}).get("adapter_id") != "keep"  # the registry must stay as it was

    @schema.hook
    def filter_body(context: Any, body: Any) -> bool:
        return not (isinstance(body, dict) and body.get("lora_name") == "keep")

    return schema


DOCUMENTED = [(path, method) for path, item in openapi_document("0")["paths"].items() for method in item]


@pytest.mark.parametrize(("path", "method"), DOCUMENTED)
def test_every_documented_route_answers_as_documented(openapi_schema: Any, path: str, method: str) -> None:
    """Schemathesis generates requests from the server's /openapi.json; every answer is a documented status,
    content type and body shape, and never a server error."""
    operation = openapi_schema[path][method.upper()]

    @settings(FUZZ, max_examples=max(EXAMPLES // 2, 5))
    @given(case=operation.as_strategy())
    def check(case: Any) -> None:
        response = case.call(timeout=120)
        answered = f"openapi HTTP {response.status_code // 100}xx"
        COUNTS[answered] = COUNTS.get(answered, 0) + 1
        case.validate_response(response, checks=SCHEMA_CHECKS)

    check()


def test_after_the_fuzzing_the_server_answers_and_nothing_changed(server: Server) -> None:
    """Last in this module: every fuzzing run above went to this server."""
    print(f"fuzzing counts: {json.dumps(COUNTS, sort_keys=True)}")
    print(f"server RSS: {server.rss_before} MB after setup, {resident_mb(server)} MB now")  # type: ignore[attr-defined]
    assert sum(COUNTS.values()) > 0
    assert httpx.get(f"{server.url}/health").status_code == 200
    assert listing(server) == server.before  # type: ignore[attr-defined]
    assert staged_leftovers(server.root / "store") == []  # type: ignore[attr-defined]
    response = httpx.post(
        f"{server.url}/generate", json={"inputs": "Hi", "parameters": {"max_new_tokens": 2}}
    )
    assert response.status_code == 200
