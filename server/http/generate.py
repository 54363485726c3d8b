"""LoRAX/TGI-compatible generation: POST /generate, /generate_stream and / (errors: {error, error_type}).

The shapes are those TGI's router writes and its clients (`text-generation`, `lorax-client`,
`huggingface_hub.InferenceClient`) parse: `details` with `prefill`, `tokens`, `top_tokens` and
`best_of_sequences`; a stream of `{index, token, top_tokens, generated_text, details}` events. The same routes
under `/models/{adapter_id}` select the adapter by path, for clients that cannot send `adapter_id`.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

from starlette.requests import Request
from starlette.responses import JSONResponse, Response

from adapterd.server.common.errors import InvalidRequest
from adapterd.server.common.protocol import (
    Completion,
    GenerateRequest,
    TokenEvent,
    TokenLogprob,
    best_first,
    sampling_params,
)
from adapterd.server.host.service import Service
from adapterd.server.http.disconnect import unless_disconnected
from adapterd.server.wire.error_bodies import tgi_error
from adapterd.server.wire.params import NUMBER, field, json_body, stop_list
from adapterd.server.wire.sse import first_then_rest, sse_response
from adapterd.server.wire.structured import one_constraint, response_format, sampling_extras, tgi_grammar

FINISH_REASONS = {
    "length": "length",
    "eos": "eos_token",
    "stop": "stop_sequence",
    "cancelled": "length",
    "error": "length",
}
MAX_BEST_OF = 8
# Parameters TGI or LoRAX define that adapterd does not honour: refused when set to anything but these.
UNSUPPORTED = {
    "typical_p": (None,),
    "watermark": (None, False),
    "merged_adapters": (None,),
}


@dataclass(frozen=True)
class TgiRequest:
    request: GenerateRequest
    want_details: bool
    want_prefill: bool
    top_n: int  # alternatives per generated token: TGI's top_n_tokens or LoRAX's return_k_alternatives
    best_of: int
    full_text: bool  # return_full_text: the prompt in front of generated_text


# OpenAI's names for TGI's parameters: refused with the right name, not silently ignored.
OPENAI_NAMES = {
    "max_tokens": "max_new_tokens",
    "max_completion_tokens": "max_new_tokens",
    "n": "best_of",
    "logprobs": "details (and top_n_tokens for alternatives)",
    "top_logprobs": "top_n_tokens",
}


def parse(body: dict[str, Any], path_adapter: str | None = None) -> TgiRequest:
    inputs = field(body, "inputs", str)
    if not inputs:
        raise InvalidRequest("inputs must be a non-empty string")
    p = field(body, "parameters", dict, {})
    for name, ours in OPENAI_NAMES.items():
        if name in p:
            raise InvalidRequest(
                f"parameters.{name} is OpenAI's name; these (TGI) routes take {ours} "
                "(other parameters they do not know are ignored, as TGI ignores them)",
                param=f"parameters.{name}",
            )
    for name, allowed in UNSUPPORTED.items():
        if p.get(name) not in allowed:
            raise InvalidRequest(f"parameters.{name} is not supported")
    temperature = field(p, "temperature", NUMBER)
    samples = bool(field(p, "do_sample", bool, False)) or bool(temperature)  # else greedy; top_k/top_p unused
    top_n = _top_n(p)
    want_prefill = bool(field(p, "decoder_input_details", bool, False))
    max_new_tokens = field(p, "max_new_tokens", int, 20)
    if max_new_tokens < 1:
        raise InvalidRequest("parameters.max_new_tokens must be >= 1")
    params = sampling_params(
        max_new_tokens=max_new_tokens,
        temperature=(temperature or 1.0) if samples else 0.0,
        top_p=field(p, "top_p", NUMBER),
        top_k=field(p, "top_k", int),
        repetition_penalty=field(p, "repetition_penalty", NUMBER),
        seed=field(p, "seed", int),
        stop=stop_list(p.get("stop")),
        ignore_eos=field(p, "ignore_eos_token", bool),
        top_logprobs=top_n,
        prompt_logprobs=0 if want_prefill else None,
        constraint=one_constraint(
            tgi_grammar(p.get("grammar")),
            response_format(p.get("response_format"), "parameters.response_format"),
        ),
        **sampling_extras(p, "parameters.", min_tokens="min_new_tokens"),
    )
    truncate = field(p, "truncate", int)
    if truncate is not None and truncate < 1:
        raise InvalidRequest("parameters.truncate must be >= 1")
    best_of = field(p, "best_of", int, 1)
    if not 1 <= best_of <= MAX_BEST_OF:
        raise InvalidRequest(f"parameters.best_of must be in 1..{MAX_BEST_OF}")
    if best_of > 1 and not samples:
        raise InvalidRequest("parameters.best_of > 1 needs sampling (do_sample or a temperature)")
    request = GenerateRequest(
        prompt=inputs, adapter_id=_adapter(p, path_adapter), params=params, truncate=truncate
    )
    return TgiRequest(
        request=request,
        want_details=bool(field(p, "details", bool, False)),
        want_prefill=want_prefill,
        top_n=top_n,
        best_of=best_of,
        full_text=bool(field(p, "return_full_text", bool, False)),
    )


def _top_n(p: dict[str, Any]) -> int:
    top_n, alternatives = field(p, "top_n_tokens", int), field(p, "return_k_alternatives", int)
    for name, value in (("top_n_tokens", top_n), ("return_k_alternatives", alternatives)):
        if value is not None and value < 0:
            raise InvalidRequest(f"parameters.{name} must be >= 0")
    if top_n and alternatives and top_n != alternatives:
        raise InvalidRequest("parameters.top_n_tokens and return_k_alternatives disagree")
    return top_n or alternatives or 0


def _adapter(p: dict[str, Any], path_adapter: str | None) -> str | None:
    adapter_id = field(p, "adapter_id", str) or None
    if path_adapter and adapter_id and adapter_id != path_adapter:
        raise InvalidRequest(f"parameters.adapter_id {adapter_id!r} differs from the path's {path_adapter!r}")
    return path_adapter or adapter_id


class TgiShapes:
    """Completions and token events in TGI's JSON shapes (token texts from the service's tokenizer)."""

    def __init__(self, service: Service) -> None:
        self.service = service

    def token(self, token_id: int, logprob: float | None, text: str | None = None) -> dict[str, Any]:
        return {
            "id": token_id,
            "text": self.service.token_text(token_id) if text is None else text,
            "logprob": logprob,
            "special": self.service.is_special(token_id),
        }

    def generated(self, score: TokenLogprob, parsed: TgiRequest, text: str | None = None) -> dict[str, Any]:
        out = self.token(score.token_id, score.logprob, text)
        if parsed.top_n:
            out["alternative_tokens"] = self.top(score)  # LoRAX's name for them
        return out

    def top(self, score: TokenLogprob) -> list[dict[str, Any]]:
        return [self.token(token_id, logprob) for token_id, logprob in score.top]

    def sequence(self, done: Completion, parsed: TgiRequest) -> dict[str, Any]:
        """What `details` and each of `best_of_sequences` share."""
        out: dict[str, Any] = {
            "generated_text": self.text(done, parsed),
            "finish_reason": FINISH_REASONS[done.finish_reason],
            "generated_tokens": len(done.token_ids),
            "prompt_tokens": done.prompt_tokens,
            "seed": done.seed,
            "prefill": [self.token(p.token_id, p.logprob) for p in done.prompt_logprobs or ()],
            "tokens": [self.generated(score, parsed) for score in done.logprobs],
        }
        if parsed.top_n:
            out["top_tokens"] = [self.top(score) for score in done.logprobs]
        return out

    def text(self, done: Completion, parsed: TgiRequest) -> str:
        return (parsed.request.prompt or "") + done.text if parsed.full_text else done.text

    def response(self, choices: list[Completion], parsed: TgiRequest) -> dict[str, Any]:
        best, *others = best_first(choices)
        out: dict[str, Any] = {"generated_text": self.text(best, parsed)}
        if parsed.want_details:
            details = self.sequence(best, parsed)
            del details["generated_text"]
            if parsed.best_of > 1:
                details["best_of_sequences"] = [self.sequence(c, parsed) for c in others]
            out["details"] = details
        return out

    def stream_event(
        self, index: int, event: TokenEvent, parsed: TgiRequest, done: Completion | None
    ) -> dict[str, Any]:
        score = TokenLogprob(event.token_id, event.logprob, event.top)
        out: dict[str, Any] = {
            "index": index,
            "token": self.generated(score, parsed, event.text),
            "top_tokens": self.top(score) if parsed.top_n else None,
            "generated_text": None,
            "details": None,
        }
        if done is not None:
            out["generated_text"] = self.text(done, parsed)
            out["details"] = {
                "finish_reason": FINISH_REASONS[done.finish_reason],
                "generated_tokens": len(done.token_ids),
                "input_length": done.prompt_tokens,
                "prompt_tokens": done.prompt_tokens,
                "seed": done.seed,
            }
        return out


class GenerateRoutes:
    def __init__(self, service: Service, principal: Any) -> None:
        self.service = service
        self.principal = principal
        self.shapes = TgiShapes(service)

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
        parsed = parse(body, http.path_params.get("adapter_id"))
        requests = parsed.request.samples(parsed.best_of)
        choices = await unless_disconnected(http, self.service.generate_all(requests, self.principal(http)))
        return self.shapes.response(choices, parsed)

    async def _stream(self, http: Request, body: dict[str, Any]) -> Response:
        parsed = parse(body, http.path_params.get("adapter_id"))
        if parsed.best_of > 1:
            raise InvalidRequest("parameters.best_of > 1 is not supported when streaming")
        if parsed.want_prefill:
            raise InvalidRequest("parameters.decoder_input_details is not supported when streaming")
        events = await first_then_rest(self.service.stream(parsed.request, self.principal(http)))
        return sse_response(self._chunks(parsed, events), tgi_error)

    async def _chunks(self, parsed: TgiRequest, events: AsyncIterator[Any]) -> AsyncIterator[Any]:
        """One event per token; the last one also carries generated_text and details."""
        last: TokenEvent | None = None
        index = 0
        async for event in events:
            if isinstance(event, TokenEvent) and not event.is_last:
                yield self.shapes.stream_event(index, event, parsed, None)
                index += 1
            elif isinstance(event, TokenEvent):
                last = event  # its Completion comes next
            elif last is not None:
                yield self.shapes.stream_event(index, last, parsed, event)
