"""GET /openapi.json documents exactly the app's routes, is a valid OpenAPI 3.2 document, and a real server's
answers to requests that use every option match it: Schemathesis checks each answer's status, content type
and body (each SSE event too). Fuzzing from the same document is in test_fuzz.py."""

from __future__ import annotations

import re
import shutil
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import httpx
import pytest
import schemathesis
from schemathesis.checks import not_a_server_error
from schemathesis.specs.openapi.checks import (
    content_type_conformance,
    response_schema_conformance,
    status_code_conformance,
)

from adapterd.server.common.auth import ApiKeys
from adapterd.server.http.app import build_app
from adapterd.server.http.openapi import openapi_document
from adapterd.server.model.resolve import ResolvedModel
from tests.e2e.serving import Server, make_tiny_chat_model, running_server
from tests.e2e.test_http import FILES, tar_of
from tests.reference import make_lora_adapter, make_prompt_adapter

CHECKS = [not_a_server_error, status_code_conformance, content_type_conformance, response_schema_conformance]
CONVERTOR = re.compile(r"\{(\w+):\w+\}")  # Starlette's {name:convertor} is OpenAPI's {name}
ADAPTER_IN_PATH = re.compile(r"^/(?P<prefix>v1/adapters|models)/(?P<adapter_id>[^/]+)(?P<rest>.*)$")
HELLO = {"inputs": "Hello there", "parameters": {"max_new_tokens": 3}}
MESSAGES = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}]
# No arguments: the forced call is short, so a tiny random model completes it within max_tokens.
NO_ARGUMENTS = {"type": "object", "properties": {}, "additionalProperties": False}
TOOLS = [{"type": "function", "function": {"name": "get", "parameters": NO_ARGUMENTS}}]


def documented(document: dict[str, Any]) -> set[tuple[str, str]]:
    return {(path, method) for path, item in document["paths"].items() for method in item}


@pytest.mark.parametrize("trainer_url", [None, "http://127.0.0.1:1"], ids=["alone", "with-trainer"])
def test_the_document_lists_every_route_of_the_app_and_no_other(trainer_url: str | None) -> None:
    config = SimpleNamespace(replica="test", trainer_url=trainer_url)
    app = build_app(SimpleNamespace(info=lambda: {"version": "0"}, config=config), ApiKeys.open())  # type: ignore[arg-type]
    served = {
        (CONVERTOR.sub(r"{\1}", route.path), method.lower())
        for route in app.routes
        for method in getattr(route, "methods", None) or ()
        if method != "HEAD"
    }
    assert documented(openapi_document("0", trainer=trainer_url is not None)) == served
    assert (("/v1/training/jobs", "post") in served) == (trainer_url is not None)


@pytest.mark.parametrize("trainer", [False, True], ids=["alone", "with-trainer"])
def test_the_document_is_valid_openapi(trainer: bool) -> None:
    schema = schemathesis.openapi.from_dict(openapi_document("0", trainer=trainer))
    schema.validate()  # against the OpenAPI 3.2 meta-schema
    operations = [result.ok() for result in schema.get_all_operations()]
    assert len(operations) == len(documented(openapi_document("0", trainer=trainer)))


@pytest.fixture(scope="module")
def server(default_model: ResolvedModel, tmp_path_factory: pytest.TempPathFactory):
    root = tmp_path_factory.mktemp("openapi")
    model = make_tiny_chat_model(root / "model", default_model.path)
    lora = make_lora_adapter(model, root / "lora", r=4, alpha=8, target_modules=["q_proj", "v_proj"])
    make_prompt_adapter(model, root / "soft", num_virtual_tokens=4)
    shutil.copytree(lora, root / "allowed" / "lora")
    args = ("--allowed-lora-dir", str(root / "allowed"))
    with running_server(model, root / "store", root / "log", *args) as running:
        running.root = root  # type: ignore[attr-defined]
        yield running


@pytest.fixture(scope="module")
def schema(server: Server) -> Any:
    return schemathesis.openapi.from_url(f"{server.url}/openapi.json")


def check(schema: Any, server: Server, method: str, path: str, expected: int, **request: Any) -> Any:
    """Send one request with httpx; its answer must be `expected` and as the document describes it."""
    response = httpx.request(method, f"{server.url}{path}", timeout=120, **request)
    assert response.status_code == expected, response.text[:500]
    response.request.read()  # a multipart body is a stream; Schemathesis reads the request too
    named = ADAPTER_IN_PATH.match(path)
    route, parameters = path, None
    if named:
        route = f"/{named['prefix']}/{{adapter_id}}{named['rest']}"
        parameters = {"adapter_id": named["adapter_id"]}
    schema[route][method].Case(path_parameters=parameters).validate_response(response, checks=CHECKS)
    return response


def test_generation_answers_as_documented(schema: Any, server: Server) -> None:
    files = {name: (name, (server.root / "lora" / name).read_bytes()) for name in FILES}  # type: ignore[attr-defined]
    check(schema, server, "PUT", "/v1/adapters/keep", 201, files=files)
    detailed = {"details": True, "decoder_input_details": True, "top_n_tokens": 2, "max_new_tokens": 3}
    for path in ("/generate", "/models/keep/generate"):
        check(schema, server, "POST", path, 200, json={"inputs": "Hello", "parameters": detailed})
    sampled = {"do_sample": True, "best_of": 2, "seed": 7, "details": True, "max_new_tokens": 3}
    check(schema, server, "POST", "/generate", 200, json={"inputs": "Hi", "parameters": sampled})
    regex = {"max_new_tokens": 3, "grammar": {"type": "regex", "value": "[a-z]{1,3}"}, "adapter_id": "keep"}
    check(schema, server, "POST", "/generate", 200, json={"inputs": "Hi", "parameters": regex})
    streamed = {"inputs": "Hello", "parameters": {"max_new_tokens": 3, "top_n_tokens": 2, "details": True}}
    for path in ("/generate_stream", "/models/keep/generate_stream"):
        events = check(schema, server, "POST", path, 200, json=streamed)
        assert events.text.count("data:") == 3
    for path in ("/", "/models/keep"):
        assert len(check(schema, server, "POST", path, 200, json=HELLO).json()) == 1
        check(schema, server, "POST", path, 200, json={**HELLO, "stream": True})
    check(schema, server, "POST", "/generate", 404, json={**HELLO, "parameters": {"adapter_id": "nope"}})
    check(schema, server, "POST", "/generate", 400, content=b"{not json")


def test_openai_answers_as_documented(schema: Any, server: Server) -> None:
    completions = [
        {"prompt": "Hello", "max_tokens": 3, "logprobs": 2, "echo": True},
        {"prompt": [1, 2, 3], "max_tokens": 0, "logprobs": 1, "echo": True},
        {"prompt": ["a", "b"], "max_tokens": 2, "n": 2, "best_of": 3, "temperature": 1.0, "seed": 1},
        {
            "prompt": "Hi",
            "max_tokens": 3,
            "logprobs": 1,
            "stream": True,
            "stream_options": {"include_usage": True},
        },
    ]
    for body in completions:
        check(schema, server, "POST", "/v1/completions", 200, json={"model": "keep", **body})
    chats = [
        {"max_tokens": 3, "logprobs": True, "top_logprobs": 2, "n": 2},
        {"max_tokens": 3, "stream": True, "logprobs": True, "stream_options": {"include_usage": True}},
        # One call only: with parallel calls allowed, a random model may list calls until max_tokens.
        {"max_tokens": 24, "tools": TOOLS, "tool_choice": "required", "parallel_tool_calls": False},
        {"max_tokens": 24, "tools": TOOLS, "tool_choice": "required", "stream": True},
        {"max_tokens": 8, "response_format": {"type": "json_object"}},
    ]
    for body in chats:
        check(
            schema,
            server,
            "POST",
            "/v1/chat/completions",
            200,
            json={"model": "keep", "messages": MESSAGES, **body},
        )
    called = check(
        schema,
        server,
        "POST",
        "/v1/chat/completions",
        200,
        json={"model": "keep", "messages": MESSAGES, **chats[2]},
    )
    assert called.json()["choices"][0]["message"].get("tool_calls"), called.json()["choices"][0]
    check(schema, server, "POST", "/v1/completions", 404, json={"model": "nope", "prompt": "Hi"})
    check(schema, server, "POST", "/v1/chat/completions", 400, json={"model": "keep", "messages": []})
    check(schema, server, "GET", "/v1/models", 200)


def test_adapters_tokenizer_and_operations_answer_as_documented(schema: Any, server: Server) -> None:
    root: Path = server.root  # type: ignore[attr-defined]
    files = {name: (name, (root / "soft" / name).read_bytes()) for name in FILES}
    check(schema, server, "PUT", "/v1/adapters/soft", 201, files=files, data={"metadata": '{"job": "x"}'})
    tar = {"content": tar_of(root / "soft"), "headers": {"content-type": "application/gzip"}}
    check(schema, server, "PUT", "/v1/adapters/soft", 200, **tar)
    check(schema, server, "PUT", "/v1/adapters/bad", 400, content=b"not a tar")
    check(schema, server, "GET", "/v1/adapters", 200)
    check(schema, server, "GET", "/v1/adapters/soft", 200)
    check(schema, server, "GET", "/v1/adapters/nope", 404)
    check(schema, server, "DELETE", "/v1/adapters/soft", 200)
    loaded = {"lora_name": "loaded", "lora_path": str(root / "allowed" / "lora")}
    check(schema, server, "POST", "/v1/load_lora_adapter", 200, json=loaded)
    check(schema, server, "POST", "/v1/unload_lora_adapter", 200, json={"lora_name": "loaded"})
    check(schema, server, "POST", "/v1/unload_lora_adapter", 404, json={"lora_name": "loaded"})
    check(schema, server, "POST", "/tokenize", 200, json={"prompt": "Hi there", "return_token_strs": True})
    check(schema, server, "POST", "/tokenize", 200, json={"messages": MESSAGES, "model": "keep"})
    check(schema, server, "POST", "/detokenize", 200, json={"tokens": [1, 2, 3]})
    for path in ("/tokenizer_info", "/health", "/ready", "/info", "/metrics", "/openapi.json"):
        check(schema, server, "GET", path, 200)
