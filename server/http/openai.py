"""OpenAI-compatible routes: /v1/completions, /v1/chat/completions (stream and not), /v1/models.
`model` is the adapter id, or the base model's name for the base model."""

from __future__ import annotations

import time
import uuid
from collections.abc import AsyncIterator
from typing import Any

from starlette.requests import Request
from starlette.responses import JSONResponse, Response

from adapterd.server.errors import AdapterdError, InvalidRequest
from adapterd.server.http.params import NUMBER, field, json_body, messages_field, stop_list
from adapterd.server.http.sse import first_then_rest, sse_response
from adapterd.server.protocol import Completion, GenerateRequest, TokenEvent, sampling_params
from adapterd.server.service import Service

FINISH_REASONS = {"length": "length", "eos": "stop", "stop": "stop", "cancelled": "stop", "error": "stop"}
CHAT_MAX_TOKENS = 256  # when the request names no max_tokens (OpenAI: until the context ends)
UNSUPPORTED_IF_SET = {"n": 1, "best_of": 1, "echo": False, "logprobs": None, "suffix": None}


def openai_error(exc: AdapterdError) -> dict[str, Any]:
    return {"error": {"message": str(exc), "type": exc.error_type, "param": None, "code": exc.http_status}}


def _params(body: dict[str, Any], max_tokens_default: int | None) -> Any:
    for name, allowed in UNSUPPORTED_IF_SET.items():
        if body.get(name) not in (None, allowed) and not (name == "logprobs" and body.get(name) is False):
            raise InvalidRequest(f"{name}={body[name]!r} is not supported")
    max_tokens = field(body, "max_completion_tokens", int) or field(
        body, "max_tokens", int, max_tokens_default
    )
    return sampling_params(
        max_new_tokens=max_tokens,
        temperature=field(body, "temperature", NUMBER, 1.0),
        top_p=field(body, "top_p", NUMBER),
        top_k=field(body, "top_k", int),
        repetition_penalty=field(body, "repetition_penalty", NUMBER),
        seed=field(body, "seed", int),
        stop=stop_list(body.get("stop")),
    )


def _model(body: dict[str, Any]) -> str:
    model = field(body, "model", str)
    if not model:
        raise InvalidRequest("model is required: an adapter id or the base model's name")
    return model


def _usage(done: Completion) -> dict[str, int]:
    generated = len(done.token_ids)
    return {
        "prompt_tokens": done.prompt_tokens,
        "completion_tokens": generated,
        "total_tokens": done.prompt_tokens + generated,
    }


class OpenAIRoutes:
    def __init__(self, service: Service, principal: Any) -> None:
        self.service = service
        self.principal = principal

    async def completions(self, http: Request) -> Response:
        body = await json_body(http)
        prompt = body.get("prompt")
        if isinstance(prompt, list) and len(prompt) == 1:
            prompt = prompt[0]
        if not isinstance(prompt, str) or not prompt:
            raise InvalidRequest("prompt must be a non-empty string (one prompt per request)")
        model = _model(body)
        request = GenerateRequest(prompt=prompt, adapter_id=model, params=_params(body, 16))
        return await self._respond(http, body, request, model, chat=False)

    async def chat_completions(self, http: Request) -> Response:
        body = await json_body(http)
        model = _model(body)
        request = GenerateRequest(
            messages=messages_field(body.get("messages")),
            adapter_id=model,
            params=_params(body, CHAT_MAX_TOKENS),
        )
        return await self._respond(http, body, request, model, chat=True)

    async def models(self, http: Request) -> Response:
        base = self.service.model_name
        created = int(time.time())
        data = [{"id": base, "object": "model", "created": created, "owned_by": "adapterd", "parent": None}]
        for adapter in await self.service.list_adapters(self.principal(http)):
            data.append(
                {
                    "id": adapter["id"],
                    "object": "model",
                    "created": created,
                    "owned_by": "adapterd",
                    "parent": base,
                }
            )
        return JSONResponse({"object": "list", "data": data})

    async def _respond(
        self, http: Request, body: dict[str, Any], request: GenerateRequest, model: str, chat: bool
    ) -> Response:
        principal = self.principal(http)
        if field(body, "stream", bool, False):
            events = await first_then_rest(self.service.stream(request, principal))
            options = field(body, "stream_options", dict, {})
            chunks = _StreamChunks(model, chat, bool(options.get("include_usage")))
            return sse_response(chunks.render(events), openai_error)
        done = await self.service.generate(request, principal)
        return JSONResponse(_response(done, model, chat))


def _response(done: Completion, model: str, chat: bool) -> dict[str, Any]:
    reason = FINISH_REASONS[done.finish_reason]
    if chat:
        choice = {
            "index": 0,
            "message": {"role": "assistant", "content": done.text},
            "finish_reason": reason,
            "logprobs": None,
        }
    else:
        choice = {"index": 0, "text": done.text, "finish_reason": reason, "logprobs": None}
    return {
        "id": f"{'chatcmpl' if chat else 'cmpl'}-{uuid.uuid4().hex}",
        "object": "chat.completion" if chat else "text_completion",
        "created": int(time.time()),
        "model": model,
        "choices": [choice],
        "usage": _usage(done),
    }


class _StreamChunks:
    def __init__(self, model: str, chat: bool, include_usage: bool) -> None:
        self.id = f"{'chatcmpl' if chat else 'cmpl'}-{uuid.uuid4().hex}"
        self.model = model
        self.chat = chat
        self.include_usage = include_usage
        self.created = int(time.time())

    def chunk(self, text: str | None, finish_reason: str | None, usage: dict[str, int] | None = None) -> dict:
        choices = []
        if text is not None or finish_reason is not None:
            if self.chat:
                choices = [
                    {
                        "index": 0,
                        "delta": {"content": text} if text is not None else {},
                        "finish_reason": finish_reason,
                        "logprobs": None,
                    }
                ]
            else:
                choices = [{"index": 0, "text": text or "", "finish_reason": finish_reason, "logprobs": None}]
        return {
            "id": self.id,
            "object": "chat.completion.chunk" if self.chat else "text_completion",
            "created": self.created,
            "model": self.model,
            "choices": choices,
            **({"usage": usage} if usage is not None else {}),
        }

    async def render(self, events: AsyncIterator[Any]) -> AsyncIterator[Any]:
        if self.chat:
            first = self.chunk("", None)
            first["choices"][0]["delta"] = {"role": "assistant", "content": ""}
            yield first
        async for event in events:
            if isinstance(event, TokenEvent):
                if event.text:
                    yield self.chunk(event.text, None)
            else:
                yield self.chunk(None, FINISH_REASONS[event.finish_reason])
                if self.include_usage:
                    yield self.chunk(None, None, _usage(event))
        yield "[DONE]"
