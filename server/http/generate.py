"""LoRAX/TGI-compatible generation: POST /generate, /generate_stream and / (errors: {error, error_type})."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

from starlette.requests import Request
from starlette.responses import JSONResponse, Response

from adapterd.server.errors import AdapterdError, InvalidRequest
from adapterd.server.http.params import NUMBER, field, json_body, stop_list
from adapterd.server.http.sse import first_then_rest, sse_response
from adapterd.server.protocol import Completion, GenerateRequest, TokenEvent, sampling_params
from adapterd.server.service import Service

FINISH_REASONS = {
    "length": "length",
    "eos": "eos_token",
    "stop": "stop_sequence",
    "cancelled": "length",
    "error": "length",
}


def tgi_error(exc: AdapterdError) -> dict[str, str]:
    return {"error": str(exc), "error_type": exc.error_type}


def parse(body: dict[str, Any]) -> tuple[GenerateRequest, bool]:
    """(the request, whether details were asked for)"""
    inputs = field(body, "inputs", str)
    if not inputs:
        raise InvalidRequest("inputs must be a non-empty string")
    p = field(body, "parameters", dict, {})
    temperature = field(p, "temperature", NUMBER)
    samples = bool(field(p, "do_sample", bool, False)) or bool(temperature)  # else greedy; top_k/top_p unused
    params = sampling_params(
        max_new_tokens=field(p, "max_new_tokens", int, 20),
        temperature=(temperature or 1.0) if samples else 0.0,
        top_p=field(p, "top_p", NUMBER),
        top_k=field(p, "top_k", int),
        repetition_penalty=field(p, "repetition_penalty", NUMBER),
        seed=field(p, "seed", int),
        stop=stop_list(p.get("stop")),
    )
    request = GenerateRequest(prompt=inputs, adapter_id=field(p, "adapter_id", str) or None, params=params)
    return request, bool(field(p, "details", bool, False))


def details(
    done: Completion, request: GenerateRequest, tokens: list[dict[str, Any]] | None
) -> dict[str, Any]:
    out: dict[str, Any] = {
        "finish_reason": FINISH_REASONS[done.finish_reason],
        "generated_tokens": len(done.token_ids),
        "prompt_tokens": done.prompt_tokens,
        "seed": request.params.seed,
    }
    if tokens is not None:
        out["tokens"] = tokens
    return out


def token_json(event: TokenEvent) -> dict[str, Any]:
    return {"id": event.token_id, "text": event.text, "logprob": None, "special": False}


class GenerateRoutes:
    def __init__(self, service: Service, principal: Any) -> None:
        self.service = service
        self.principal = principal

    async def generate(self, request: Request) -> Response:
        return JSONResponse(await self._generate(request, await json_body(request)))

    async def generate_stream(self, request: Request) -> Response:
        return await self._stream(request, await json_body(request))

    async def root(self, request: Request) -> Response:
        body = await json_body(request)
        if field(body, "stream", bool, False):
            return await self._stream(request, body)
        return JSONResponse([await self._generate(request, body)])

    async def _generate(self, http: Request, body: dict[str, Any]) -> dict[str, Any]:
        request, want_details = parse(body)
        tokens: list[dict[str, Any]] = []
        events = self.service.stream(request, self.principal(http))
        async for event in events:
            if isinstance(event, TokenEvent):
                tokens.append(token_json(event))
            else:
                done = event
        out: dict[str, Any] = {"generated_text": done.text}
        if want_details:
            out["details"] = details(done, request, tokens)
        return out

    async def _stream(self, http: Request, body: dict[str, Any]) -> Response:
        request, _ = parse(body)
        events = await first_then_rest(self.service.stream(request, self.principal(http)))
        return sse_response(self._chunks(request, events), tgi_error)

    async def _chunks(self, request: GenerateRequest, events: AsyncIterator[Any]) -> AsyncIterator[Any]:
        """TGI's shape: one event per token; the last one also carries generated_text and details."""
        last: TokenEvent | None = None
        async for event in events:
            if isinstance(event, TokenEvent) and not event.is_last:
                yield {"token": token_json(event), "generated_text": None, "details": None}
            elif isinstance(event, TokenEvent):
                last = event  # its Completion comes next
            elif last is not None:
                yield {
                    "token": token_json(last),
                    "generated_text": event.text,
                    "details": details(event, request, None),
                }
