"""GET /openapi.json: an OpenAPI 3.2 document of every HTTP route, its bodies as served
(`openapi_schemas`), and the status codes each can answer. tests/e2e/test_openapi.py holds it to the app's
routes and Schemathesis to the responses."""

from __future__ import annotations

from typing import Any

from adapterd.adapters.format import ADAPTER_ID_PATTERN
from adapterd.server.common.config import MAX_JSON_BODY_BYTES
from adapterd.server.http.openapi_schemas import SCHEMAS, STRING, Schema, array, ref

JSON = "application/json"
SSE = "text/event-stream"
REASONS = {
    "200": "OK",
    "201": "Created: a new adapter",
    "400": "Invalid request (malformed JSON, a field out of range, text that cannot be encoded)",
    "401": "A missing or unknown API key (with --api-keys)",
    "403": "The key's role or tenant does not allow it",
    "404": "Unknown adapter",
    "413": f"The body is too large (JSON bodies: {MAX_JSON_BODY_BYTES} bytes; uploads: --max-upload-bytes)",
    "422": "The adapter cannot be served by this model (shapes, rank, kind, values)",
    "429": "Overloaded: the waiting queue is full",
    "502": "The trainer (--trainer) did not answer",
    "503": "Not serving: the engine is unhealthy or the server is shutting down",
}
GENERATE_ERRORS = ("400", "401", "403", "404", "413", "422", "429", "503")


def _content(schema: Schema, media: str = JSON) -> dict[str, Any]:
    return {media: {"schema": schema}}


def _events(*payloads: Schema, done: bool = False) -> dict[str, Any]:
    """A text/event-stream of `data:` events, each one of `payloads` as JSON (an error after the first token
    arrives as an error event), then `data: [DONE]` when `done` (OpenAI's end of stream)."""
    data = [{**STRING, "contentMediaType": JSON, "contentSchema": p} for p in payloads]
    if done:
        data.append({"const": "[DONE]"})
    event = {"type": "object", "properties": {"data": {"anyOf": data}}, "required": ["data"]}
    return {SSE: {"itemSchema": event}}


def _responses(ok: dict[str, Any], errors: tuple[str, ...], tgi: bool = False) -> dict[str, Any]:
    error = _content(ref("TgiError" if tgi else "Error"))
    answers = {code: {"description": REASONS.get(code, "OK"), "content": body} for code, body in ok.items()}
    answers.update({code: {"description": REASONS[code], "content": error} for code in errors})
    return answers


def _operation(
    summary: str,
    tag: str,
    ok: dict[str, Any],
    errors: tuple[str, ...] = (),
    body: dict[str, Any] | None = None,
    tgi: bool = False,
    adapter_in_path: bool = False,
) -> dict[str, Any]:
    operation: dict[str, Any] = {"summary": summary, "tags": [tag], "responses": _responses(ok, errors, tgi)}
    if body is not None:
        operation["requestBody"] = {"required": True, "content": body}
    if adapter_in_path:
        operation["parameters"] = [ADAPTER_ID]
    return operation


ADAPTER_ID = {
    "name": "adapter_id",
    "in": "path",
    "required": True,
    "description": "1-128 characters of A-Z a-z 0-9 . _ -, starting with a letter or digit; or tenant/name",
    "schema": {**STRING, "pattern": ADAPTER_ID_PATTERN.pattern},
}


def _tgi(summary: str, stream: bool | None, adapter_in_path: bool = False) -> dict[str, Any]:
    """A TGI/LoRAX route: `stream` True answers SSE, False JSON, None (POST /) either, by `stream`."""
    sse = _events(ref("TgiStreamEvent"), ref("TgiError"))
    if stream is None:
        answer = {**_content(array(ref("TgiResponse"), minItems=1, maxItems=1)), **sse}
    else:
        answer = sse if stream else _content(ref("TgiResponse"))
    return _operation(
        summary,
        "TGI / LoRAX",
        {"200": answer},
        GENERATE_ERRORS,
        body=_content(ref("TgiRequest")),
        tgi=True,
        adapter_in_path=adapter_in_path,
    )


def _openai(summary: str, request: str, response: str, chunk: str) -> dict[str, Any]:
    answer = {**_content(ref(response)), **_events(ref(chunk), ref("Error"), done=True)}
    return _operation(summary, "OpenAI", {"200": answer}, GENERATE_ERRORS, body=_content(ref(request)))


def _get(summary: str, tag: str, schema: Schema, errors: tuple[str, ...] = ("401", "403")) -> dict[str, Any]:
    return _operation(summary, tag, {"200": _content(schema)}, errors)


def _post(summary: str, tag: str, request: str, answer: str, errors: tuple[str, ...]) -> dict[str, Any]:
    """A POST of a JSON body (schema `request`) answered 200 with JSON (schema `answer`)."""
    return _operation(summary, tag, {"200": _content(ref(answer))}, errors, body=_content(ref(request)))


def _paths() -> dict[str, dict[str, Any]]:
    adapters = "Adapters"
    upload_body = {
        "multipart/form-data": {"schema": ref("UploadForm")},
        "application/x-tar": {"schema": {**STRING, "format": "binary"}},
        "application/gzip": {"schema": {**STRING, "format": "binary"}},
    }
    upload = _operation(
        "Upload an adapter (PEFT files as a form, or a tar of its directory); 200 when it replaced one",
        adapters,
        {"201": _content(ref("Adapter")), "200": _content(ref("Adapter"))},
        ("400", "401", "403", "413", "422", "503"),
        body=upload_body,
        adapter_in_path=True,
    )
    show = _get("An adapter's description", adapters, ref("Adapter"), ("401", "403", "404"))
    delete = _get("Delete an adapter", adapters, ref("DeletedAdapter"), ("401", "403", "404"))
    json_errors = ("400", "401", "403", "404", "413")
    tokens = "Tokenizer (vLLM)"
    health = {"200": _content(ref("Health")), "503": _content(ref("Health"))}
    return {
        "/": {"post": _tgi("Generate (LoRAX's root route): a one-element array, or SSE with stream", None)},
        "/generate": {"post": _tgi("Generate (TGI)", False)},
        "/generate_stream": {"post": _tgi("Generate, streaming one event per token (TGI)", True)},
        "/models/{adapter_id}": {"post": _tgi("POST / with the adapter in the path", None, True)},
        "/models/{adapter_id}/generate": {
            "post": _tgi("/generate with the adapter in the path", False, True)
        },
        "/models/{adapter_id}/generate_stream": {
            "post": _tgi("/generate_stream with the adapter in the path", True, True)
        },
        "/v1/completions": {
            "post": _openai("Completions (OpenAI)", "CompletionRequest", "Completion", "CompletionChunk")
        },
        "/v1/chat/completions": {
            "post": _openai(
                "Chat completions (OpenAI)", "ChatCompletionRequest", "ChatCompletion", "ChatCompletionChunk"
            )
        },
        "/v1/models": {
            "get": _get("The base model and the adapters the caller may use", "OpenAI", ref("ModelList"))
        },
        "/v1/adapters": {"get": _get("The adapters the caller may use", adapters, ref("AdapterList"))},
        "/v1/adapters/{adapter_id}": {"put": upload, "get": show, "delete": delete},
        "/v1/load_lora_adapter": {
            "post": _post(
                "Register an adapter from a directory on the server (vLLM)",
                adapters,
                "LoadLoraRequest",
                "Adapter",
                ("400", "401", "403", "413", "422", "503"),
            )
        },
        "/v1/unload_lora_adapter": {
            "post": _post(
                "Delete an adapter (vLLM)", adapters, "UnloadLoraRequest", "DeletedAdapter", json_errors
            )
        },
        "/tokenize": {
            "post": _post(
                "Tokenize a prompt or chat messages",
                tokens,
                "TokenizeRequest",
                "TokenizeResponse",
                json_errors,
            )
        },
        "/detokenize": {
            "post": _post(
                "Token ids back to text",
                tokens,
                "DetokenizeRequest",
                "DetokenizeResponse",
                ("400", "401", "403", "413"),
            )
        },
        "/tokenizer_info": {
            "get": _get(
                "The tokenizer's special tokens and chat template",
                tokens,
                ref("TokenizerInfo"),
                ("400", "401", "403"),
            )
        },
        "/health": {"get": _operation("Liveness: whether the engine can serve", "Operations", health)},
        "/ready": {"get": _operation("Readiness: healthy and not shutting down", "Operations", health)},
        "/info": {
            "get": _operation(
                "The model and the engine's limits", "Operations", {"200": _content(ref("Info"))}
            )
        },
        "/metrics": {
            "get": _operation(
                "Prometheus metrics (tenant adapters counted per tenant)",
                "Operations",
                {"200": _content(STRING, "text/plain")},
            )
        },
        "/openapi.json": {
            "get": _operation("This document", "Operations", {"200": _content({"type": "object"})})
        },
        "/ui": {
            "get": _operation(
                "The web console (its files under /ui/; its pages call this API)",
                "Console",
                {"200": _content(STRING, "text/html")},
            )
        },
    }


def _trainer_paths() -> dict[str, dict[str, Any]]:
    """The trainer's routes, forwarded as they are (--trainer): the trainer's own API, documented there."""
    job = {"type": "object", "required": ["id", "status"]}
    form = {"multipart/form-data": {"schema": {"type": "object"}}}
    errors = ("400", "401", "403", "404", "413", "502")
    tag = "Training (forwarded to --trainer)"
    forwarded = {"200": _content(job)}

    def of_a_job(operation: dict[str, Any]) -> dict[str, Any]:
        job_id = {"name": "job_id", "in": "path", "required": True, "schema": STRING}
        return {**operation, "parameters": [job_id]}

    return {
        "/v1/training/jobs": {
            "get": _operation("The training jobs", tag, {"200": _content({"type": "object"})}, errors),
            "post": _operation("Submit a training job", tag, {"202": _content(job)}, errors, body=form),
        },
        "/v1/training/jobs/{job_id}": {"get": of_a_job(_operation("A training job", tag, forwarded, errors))},
        "/v1/training/jobs/{job_id}/events": {
            "get": of_a_job(
                _operation(
                    "A job's progress as server-sent events", tag, {"200": _content(STRING, SSE)}, errors
                )
            )
        },
        "/v1/training/jobs/{job_id}/cancel": {
            "post": of_a_job(_operation("Cancel a job", tag, forwarded, errors))
        },
        "/v1/evaluations": {
            "post": _operation(
                "Score the base or an adapter on held-out JSONL",
                tag,
                {"200": _content({"type": "object"})},
                errors,
                body=form,
            )
        },
    }


def openapi_document(version: str, trainer: bool = False) -> dict[str, Any]:
    """The document; `trainer`: with the forwarded training routes (--trainer)."""
    return {
        "openapi": "3.2.0",
        "info": {
            "title": "adapterd",
            "version": version,
            "description": "One base model, many LoRA and soft-prompt adapters per request: TGI/LoRAX, "
            "OpenAI and vLLM routes, adapter uploads. With --api-keys, send Authorization: Bearer KEY.",
        },
        "paths": {**_paths(), **(_trainer_paths() if trainer else {})},
        "security": [{}, {"apiKey": []}],  # open, or a Bearer key when the server has --api-keys
        "components": {
            "schemas": SCHEMAS,
            "securitySchemes": {"apiKey": {"type": "http", "scheme": "bearer"}},
        },
    }
