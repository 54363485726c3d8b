"""The adapterd server's HTTP API without I/O: request building and answer parsing for Client and
AsyncClient. Generation uses the LoRAX/TGI routes (`details: true` gives token ids); chat uses the OpenAI
route; adapters use /v1/adapters."""

from __future__ import annotations

import json
from collections.abc import Mapping
from contextlib import ExitStack
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any
from urllib.parse import quote

from adapterd.clients._core import Call, StreamCall
from adapterd.clients.errors import AdapterNotFound, NotFound, from_body, from_http
from adapterd.clients.types import (
    CONFIG_FILE,
    WEIGHTS_FILE,
    Adapter,
    Generation,
    Messages,
    Sampling,
    Token,
    adapter_files,
    finish_reason,
)


@dataclass(frozen=True)
class FilePart:
    """One file of a multipart body; a Path is opened only when the request is sent."""

    name: str
    filename: str
    source: Path | bytes
    content_type: str = "application/octet-stream"

    def open(self, files: ExitStack) -> bytes | IO[bytes]:
        """The content to send: the bytes, or the file opened for as long as `files` is."""
        return self.source if isinstance(self.source, bytes) else files.enter_context(self.source.open("rb"))


@dataclass(frozen=True)
class HttpRequest:
    method: str
    path: str
    json: Any = None
    form: dict[str, str] = field(default_factory=dict)  # multipart text fields, sent with `files`
    files: tuple[FilePart, ...] = ()
    timeout_reads: bool = True  # False for a stream that may stay quiet for long (a training job's events)


def answer(status: int, content: bytes, not_found: type[NotFound] = AdapterNotFound) -> Any:
    """A response's decoded JSON body, or its typed error."""
    if status >= 400:
        raise from_http(status, content, not_found)
    return json.loads(content) if content else None


def sse_data(line: str) -> Any:
    """The decoded `data:` of one server-sent-events line; None for other lines and OpenAI's [DONE]."""
    if not line.startswith("data:"):
        return None
    data = line[5:].strip()
    if data == "[DONE]":
        return None
    try:
        return json.loads(data)
    except ValueError:
        return data


def adapter_path(adapter_id: str) -> str:
    return f"/v1/adapters/{quote(adapter_id, safe='/')}"


# -- generation ---------------------------------------------------------------------------------------------


def tgi_body(prompt: str, adapter_id: str | None, sampling: Sampling) -> dict[str, Any]:
    """LoRAX/TGI's body. Greedy unless temperature > 0: the TGI route samples whenever top_p or top_k is
    present, so they are sent only when sampling (as gRPC and chat ignore them then)."""
    parameters: dict[str, Any] = {
        "details": True,
        "max_new_tokens": sampling.max_new_tokens,
        "do_sample": sampling.is_sampling,
        "stop": list(sampling.stop),
        "adapter_id": adapter_id,
        **tgi_extras(sampling),
    }
    return {"inputs": prompt, "parameters": _given(parameters, sampling)}


def tgi_extras(sampling: Sampling) -> dict[str, Any]:
    """The newer options in the TGI route's names: its `grammar` (json, regex, and adapterd's choice and
    grammar types), LoRAX's response_format for any JSON object, `ignore_eos_token`, `min_new_tokens`."""
    extras = sampling.extras()
    if "ignore_eos" in extras:
        extras["ignore_eos_token"] = extras.pop("ignore_eos")
    if "min_tokens" in extras:
        extras["min_new_tokens"] = extras.pop("min_tokens")
    structured = sampling.structured
    if structured is not None:
        name, value = structured
        if name == "json_object":
            extras["response_format"] = {"type": "json_object"}
        else:
            kind = {"json_schema": "json"}.get(name, name)
            extras["grammar"] = {"type": kind, "value": list(value) if name == "choice" else value}
    return extras


def chat_extras(sampling: Sampling) -> dict[str, Any]:
    """The newer options in the OpenAI route's names: response_format for JSON, vLLM's structured_outputs
    for a regex, a grammar or a choice."""
    extras = sampling.extras()
    structured = sampling.structured
    if structured is not None:
        name, value = structured
        if name == "json_object":
            extras["response_format"] = {"type": "json_object"}
        elif name == "json_schema":
            extras["response_format"] = {
                "type": "json_schema",
                "json_schema": {"name": "output", "schema": value},
            }
        else:
            extras["structured_outputs"] = {name: list(value) if name == "choice" else value}
    return extras


def chat_body(messages: Messages, model: str, sampling: Sampling) -> dict[str, Any]:
    """OpenAI's chat body; temperature is always sent, as the OpenAI route's default is 1, not greedy."""
    body: dict[str, Any] = {
        "model": model,
        "messages": [dict(m) for m in messages],
        "max_tokens": sampling.max_new_tokens,
        "temperature": sampling.temperature or 0.0,
        "stop": list(sampling.stop) or None,
        **chat_extras(sampling),
    }
    return _given(body, sampling)


def _given(body: dict[str, Any], sampling: Sampling) -> dict[str, Any]:
    optional: dict[str, Any] = {"repetition_penalty": sampling.repetition_penalty, "seed": sampling.seed}
    if sampling.is_sampling:
        optional.update(temperature=sampling.temperature, top_p=sampling.top_p, top_k=sampling.top_k)
    return {name: value for name, value in {**body, **optional}.items() if value is not None}


def tgi_generation(body: dict[str, Any]) -> Generation:
    details = body["details"]
    return Generation(
        text=body["generated_text"],
        token_ids=[token["id"] for token in details["tokens"]],
        finish_reason=finish_reason(details["finish_reason"]),
        prompt_tokens=details["prompt_tokens"],
        generated_tokens=details["generated_tokens"],
    )


def chat_generation(body: dict[str, Any]) -> Generation:
    choice, usage = body["choices"][0], body["usage"]
    return Generation(
        text=choice["message"]["content"],
        token_ids=None,
        finish_reason=choice["finish_reason"],
        prompt_tokens=usage["prompt_tokens"],
        generated_tokens=usage["completion_tokens"],
    )


class TgiStreamReader:
    """/generate_stream's events as Tokens; the last event (with generated_text) also carries details."""

    def __init__(self) -> None:
        self.token_ids: list[int] = []

    def __call__(self, event: Any) -> list[Token]:
        if not isinstance(event, dict) or "token" not in event:
            raise from_body(event)  # an error after the stream began
        token = event["token"]
        self.token_ids.append(token["id"])
        if event.get("generated_text") is None:
            return [Token(token["id"], token["text"])]
        details = event["details"]
        generation = Generation(
            text=event["generated_text"],
            token_ids=self.token_ids,
            finish_reason=finish_reason(details["finish_reason"]),
            prompt_tokens=details["prompt_tokens"],
            generated_tokens=details["generated_tokens"],
        )
        return [Token(token["id"], token["text"], generation)]


# -- the server's methods -------------------------------------------------------------------------------------


class HttpServerCodec:
    """The server's methods as HTTP calls (see `_api.ServerCodec`)."""

    def generate(self, prompt: str, adapter_id: str | None, sampling: Sampling) -> Call[Generation]:
        return Call(HttpRequest("POST", "/generate", tgi_body(prompt, adapter_id, sampling)), tgi_generation)

    def generate_stream(self, prompt: str, adapter_id: str | None, sampling: Sampling) -> StreamCall[Token]:
        request = HttpRequest("POST", "/generate_stream", tgi_body(prompt, adapter_id, sampling))
        return StreamCall(request, TgiStreamReader)

    def chat(self, messages: Messages, adapter_id: str | None, sampling: Sampling) -> Call[Generation]:
        """The OpenAI route names the base model by its name: ask /info for it first when no adapter."""

        def chat_with(model: str) -> Call[Generation]:
            return Call(
                HttpRequest("POST", "/v1/chat/completions", chat_body(messages, model, sampling)),
                chat_generation,
            )

        if adapter_id:
            return chat_with(adapter_id)
        return Call(HttpRequest("GET", "/info"), lambda info: chat_with(info["model_id"]), idempotent=True)

    def list_adapters(self) -> Call[list[Adapter]]:
        return Call(
            HttpRequest("GET", "/v1/adapters"),
            lambda body: [Adapter.from_dict(a) for a in body["data"]],
            idempotent=True,
        )

    def get_adapter(self, adapter_id: str) -> Call[Adapter]:
        return Call(HttpRequest("GET", adapter_path(adapter_id)), Adapter.from_dict, idempotent=True)

    def upload_adapter(
        self, adapter_id: str, path: str | Path, metadata: Mapping[str, Any] | None
    ) -> Call[Adapter]:
        config, weights = adapter_files(path)
        files = (
            FilePart(CONFIG_FILE, CONFIG_FILE, config, "application/json"),
            FilePart(WEIGHTS_FILE, WEIGHTS_FILE, weights),
        )
        form = {} if metadata is None else {"metadata": json.dumps(dict(metadata))}
        request = HttpRequest("PUT", adapter_path(adapter_id), form=form, files=files)
        return Call(request, Adapter.from_dict)

    def delete_adapter(self, adapter_id: str) -> Call[None]:
        return Call(HttpRequest("DELETE", adapter_path(adapter_id)), lambda _: None)
