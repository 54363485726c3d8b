"""OpenAI-compatible routes: /v1/completions, /v1/chat/completions (stream and not), /v1/models.
`model` is the adapter id, or the base model's name for the base model.

/v1/completions takes `prompt` as a string, a list of strings, a list of token ids or a list of token-id
lists (token ids are used exactly as given: no BOS added, no re-tokenization); each prompt gets `n` choices,
choice `index` = prompt position * n + choice. `echo` returns the prompt with its log-probabilities (the
first one null) and `max_tokens: 0` with `echo` only scores the prompt, which is what lm-eval's
`local-completions` needs for multiple-choice tasks.
"""

from __future__ import annotations

import time
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

from starlette.requests import Request
from starlette.responses import JSONResponse, Response

from adapterd.server.common.errors import InvalidRequest
from adapterd.server.common.protocol import (
    MAX_LOGPROBS,
    Completion,
    GenerateRequest,
    TokenEvent,
    TokenLogprob,
    best_first,
    sampling_params,
)
from adapterd.server.host.service import Service
from adapterd.server.host.tools import ToolChoice, ToolStyle, parse_functions, parse_tool_choice
from adapterd.server.http.disconnect import unless_disconnected
from adapterd.server.http.openai_logprobs import LegacyLogprobs, chat_logprobs
from adapterd.server.wire.error_bodies import openai_error
from adapterd.server.wire.params import NUMBER, field, is_token_id, json_body, messages_field, stop_list
from adapterd.server.wire.sse import first_then_rest, sse_response
from adapterd.server.wire.structured import one_constraint, response_format, sampling_extras, vllm_structured

FINISH_REASONS = {"length": "length", "eos": "stop", "stop": "stop", "cancelled": "stop", "error": "stop"}
CHAT_MAX_TOKENS = 256  # when the request names no max_tokens (OpenAI: until the context ends)
MAX_CHOICES = 128  # prompts x best_of (or n) in one request
Prompt = str | tuple[int, ...]


@dataclass(frozen=True)
class Choices:
    """How many choices each prompt gets and what they carry."""

    n: int = 1
    best_of: int = 1  # sampled per prompt; the n with the highest log-probability are returned
    echo: bool = False
    logprobs: int | None = None  # alternatives per token when log-probabilities are asked for, else None


def _int_in(body: dict[str, Any], name: str, low: int, high: int, default: int | None = None) -> int | None:
    value = field(body, name, int, default)
    if value is not None and not low <= value <= high:
        raise InvalidRequest(f"{name} must be in {low}..{high}, not {value}", param=name)
    return value


def _completion_choices(body: dict[str, Any]) -> Choices:
    if body.get("suffix") is not None:
        raise InvalidRequest("suffix is not supported", param="suffix")
    n = _int_in(body, "n", 1, MAX_CHOICES, 1)
    assert n is not None
    best_of = _int_in(body, "best_of", n, MAX_CHOICES, n)
    assert best_of is not None
    echo = bool(field(body, "echo", bool, False))
    if field(body, "stream", bool, False) and (echo or best_of > n):
        raise InvalidRequest(
            "echo and best_of are not supported when streaming", param="echo" if echo else "best_of"
        )
    return Choices(n, best_of, echo, _int_in(body, "logprobs", 0, MAX_LOGPROBS))


def _chat_choices(body: dict[str, Any]) -> Choices:
    n = _int_in(body, "n", 1, MAX_CHOICES, 1)
    assert n is not None
    wants = bool(field(body, "logprobs", bool, False))
    top = _int_in(body, "top_logprobs", 0, MAX_LOGPROBS)
    if top is not None and not wants:
        raise InvalidRequest("top_logprobs needs logprobs: true", param="top_logprobs")
    return Choices(n=n, logprobs=(top or 0) if wants else None)


def _params(
    body: dict[str, Any], max_tokens_default: int, choices: Choices, tools: ToolChoice | None = None
) -> Any:
    max_tokens = field(body, "max_completion_tokens", int)
    if max_tokens is None:
        max_tokens = field(body, "max_tokens", int, max_tokens_default)
    if max_tokens < 0 or (max_tokens == 0 and not choices.echo):
        raise InvalidRequest("max_tokens (max_new_tokens) must be >= 1; 0 only with echo", param="max_tokens")
    prompt_logprobs = choices.logprobs if choices.echo and choices.logprobs is not None else None
    if max_tokens == 0 and prompt_logprobs is None:
        prompt_logprobs = 0
    return sampling_params(
        max_new_tokens=max_tokens,
        temperature=field(body, "temperature", NUMBER, 1.0),
        top_p=field(body, "top_p", NUMBER),
        top_k=field(body, "top_k", int),
        repetition_penalty=field(body, "repetition_penalty", NUMBER),
        seed=field(body, "seed", int),
        stop=stop_list(body.get("stop")),
        top_logprobs=choices.logprobs or 0,
        prompt_logprobs=prompt_logprobs,
        ignore_eos=field(body, "ignore_eos", bool, False),  # vLLM's extension: generate max_tokens always
        constraint=one_constraint(
            response_format(body.get("response_format")),
            vllm_structured(body),
            tools.constraint() if tools else None,
        ),
        **sampling_extras(body),
    )


def _prompts(value: Any) -> list[Prompt]:
    """A string, a list of strings, a list of token ids or a list of token-id lists."""
    if isinstance(value, str):
        value = [value]
    if isinstance(value, list) and value and all(is_token_id(t) for t in value):
        value = [value]
    if not isinstance(value, list) or not value:
        raise InvalidRequest("prompt must be a string, a list of strings or token ids", param="prompt")
    prompts: list[Prompt] = []
    for i, item in enumerate(value):
        if isinstance(item, list) and all(is_token_id(t) for t in item):
            item = tuple(item)
        if not isinstance(item, str | tuple):
            raise InvalidRequest(f"prompt[{i}] must be a string or a list of token ids", param="prompt")
        if not item:
            raise InvalidRequest(f"prompt[{i}] is empty", param="prompt")
        prompts.append(item)
    return prompts


def _tools(body: dict[str, Any], style: ToolStyle) -> ToolChoice | None:
    """The tool choice a chat request makes; None without tools or with tool_choice "none"."""
    if body.get("tools") is None:
        if body.get("tool_choice") not in (None, "none"):
            raise InvalidRequest("tool_choice needs tools", param="tool_choice")
        return None
    parallel = bool(field(body, "parallel_tool_calls", bool, True))
    return parse_tool_choice(parse_functions(body["tools"]), body.get("tool_choice"), style, parallel)


def tool_calls(calls: list[tuple[str, str]]) -> list[dict[str, Any]]:
    """OpenAI's tool_calls for (name, arguments JSON) calls."""
    return [
        {"id": f"call_{uuid.uuid4().hex[:24]}", "type": "function", "function": {"name": n, "arguments": a}}
        for n, a in calls
    ]


def _model(body: dict[str, Any]) -> str:
    model = field(body, "model", str)
    if not model:
        raise InvalidRequest("model is required: an adapter id or the base model's name", param="model")
    return model


def _requests(prompt_requests: list[GenerateRequest], count: int) -> list[GenerateRequest]:
    return [sample for request in prompt_requests for sample in request.samples(count)]


def _best(choices: list[Completion], n: int) -> list[Completion]:
    if len(choices) == n:
        return choices
    return best_first(choices)[:n]


def _usage(prompt_tokens: int, completion_tokens: int) -> dict[str, int]:
    return {
        "prompt_tokens": prompt_tokens,
        "completion_tokens": completion_tokens,
        "total_tokens": prompt_tokens + completion_tokens,
    }


class OpenAIRoutes:
    def __init__(self, service: Service, principal: Any) -> None:
        self.service = service
        self.principal = principal

    async def completions(self, http: Request) -> Response:
        body = await json_body(http)
        model = _model(body)
        prompts = _prompts(body.get("prompt"))
        choices = _completion_choices(body)
        if len(prompts) * choices.best_of > MAX_CHOICES:
            raise InvalidRequest(f"prompts x best_of (or n) must be at most {MAX_CHOICES}", param="prompt")
        params = _params(body, 16, choices)
        per_prompt = [
            GenerateRequest(prompt=p, adapter_id=model, params=params)
            if isinstance(p, str)
            else GenerateRequest(prompt_ids=p, adapter_id=model, params=params)
            for p in prompts
        ]
        if field(body, "stream", bool, False):
            return await self._stream(http, body, _requests(per_prompt, choices.n), model, False, choices)
        done = await unless_disconnected(
            http, self.service.generate_all(_requests(per_prompt, choices.best_of), self.principal(http))
        )
        groups = [done[i : i + choices.best_of] for i in range(0, len(done), choices.best_of)]
        rendered = [
            self._completion_choice(i * choices.n + j, c, prompt, choices)
            for i, (group, prompt) in enumerate(zip(groups, prompts, strict=True))
            for j, c in enumerate(_best(group, choices.n))
        ]
        usage = _usage(sum(g[0].prompt_tokens for g in groups), sum(len(c.token_ids) for c in done))
        return JSONResponse(_envelope("cmpl", "text_completion", model, rendered, usage))

    async def chat_completions(self, http: Request) -> Response:
        body = await json_body(http)
        model = _model(body)
        choices = _chat_choices(body)
        tools = _tools(body, self.service.tool_style)
        messages = messages_field(body.get("messages"), self.service.tool_style)
        request = GenerateRequest(
            messages=tools.messages(messages) if tools else messages,
            tools=tools.template_tools() if tools else (),
            adapter_id=model,
            params=_params(body, CHAT_MAX_TOKENS, choices, tools),
        )
        if field(body, "stream", bool, False):
            return await self._stream(
                http, body, _requests([request], choices.n), model, True, choices, tools
            )
        done = await unless_disconnected(
            http, self.service.generate_all(_requests([request], choices.n), self.principal(http))
        )
        rendered = [self._chat_choice(i, c, choices, tools) for i, c in enumerate(done)]
        usage = _usage(done[0].prompt_tokens, sum(len(c.token_ids) for c in done))
        return JSONResponse(_envelope("chatcmpl", "chat.completion", model, rendered, usage))

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

    def _completion_choice(self, index: int, done: Completion, prompt: Prompt, choices: Choices) -> dict:
        echoed = (
            (prompt if isinstance(prompt, str) else self.service.detokenize(prompt)) if choices.echo else ""
        )
        logprobs = None
        if choices.logprobs is not None:
            scores = (done.prompt_logprobs or ()) if choices.echo else ()
            logprobs = LegacyLogprobs(self.service.token_text).render([*scores, *done.logprobs])
        reason = FINISH_REASONS[done.finish_reason]
        return {"index": index, "text": echoed + done.text, "finish_reason": reason, "logprobs": logprobs}

    def _chat_choice(self, index: int, done: Completion, choices: Choices, tools: ToolChoice | None) -> dict:
        calls = tools.calls(done.text) if tools else None
        message: dict[str, Any] = {"role": "assistant", "content": done.text}
        if calls:
            message = {"role": "assistant", "content": None, "tool_calls": tool_calls(calls)}
        return {
            "index": index,
            "message": message,
            "finish_reason": "tool_calls" if calls else FINISH_REASONS[done.finish_reason],
            "logprobs": None
            if choices.logprobs is None
            else chat_logprobs(self.service.token_text, done.logprobs),
        }

    async def _stream(
        self,
        http: Request,
        body: dict[str, Any],
        requests: list[GenerateRequest],
        model: str,
        chat: bool,
        choices: Choices,
        tools: ToolChoice | None = None,
    ) -> Response:
        events = await first_then_rest(self.service.stream_all(requests, self.principal(http)))
        options = field(body, "stream_options", dict, {})
        chunks = _StreamChunks(self.service, model, chat, choices, bool(options.get("include_usage")), tools)
        return sse_response(chunks.render(events, len(requests)), openai_error)


def _envelope(prefix: str, kind: str, model: str, choices: list[dict], usage: dict | None) -> dict[str, Any]:
    out: dict[str, Any] = {
        "id": f"{prefix}-{uuid.uuid4().hex}",
        "object": kind,
        "created": int(time.time()),
        "model": model,
        "choices": choices,
    }
    if usage is not None:
        out["usage"] = usage
    return out


class _StreamChunks:
    def __init__(
        self,
        service: Service,
        model: str,
        chat: bool,
        choices: Choices,
        include_usage: bool,
        tools: ToolChoice | None = None,
    ) -> None:
        self.service = service
        self.tools = tools  # with tools, a choice's text is held back until it is known to be calls or not
        self.id = f"{'chatcmpl' if chat else 'cmpl'}-{uuid.uuid4().hex}"
        self.model = model
        self.chat = chat
        self.choices = choices
        self.include_usage = include_usage
        self.created = int(time.time())
        self.legacy: dict[int, LegacyLogprobs] = {}

    def chunk(self, choices: list[dict], usage: dict[str, int] | None = None) -> dict:
        return {
            "id": self.id,
            "object": "chat.completion.chunk" if self.chat else "text_completion",
            "created": self.created,
            "model": self.model,
            "choices": choices,
            **({"usage": usage} if usage is not None else {}),
        }

    def choice(self, index: int, text: str | None, reason: str | None, score: TokenLogprob | None) -> dict:
        logprobs = None
        if score is not None and self.choices.logprobs is not None:
            if self.chat:
                logprobs = chat_logprobs(self.service.token_text, [score])
            else:
                legacy = self.legacy.setdefault(index, LegacyLogprobs(self.service.token_text))
                logprobs = legacy.render([score])
        if self.chat:
            delta = {"content": text} if text is not None else {}
            return {"index": index, "delta": delta, "finish_reason": reason, "logprobs": logprobs}
        return {"index": index, "text": text or "", "finish_reason": reason, "logprobs": logprobs}

    def tool_delta(self, index: int, done: Completion, calls: list[tuple[str, str]] | None) -> dict:
        """A choice's whole output in one delta: its tool `calls`, or its text when it made none."""
        if not calls:
            return {"index": index, "delta": {"content": done.text}, "finish_reason": None, "logprobs": None}
        deltas = [{"index": k, **call} for k, call in enumerate(tool_calls(calls))]
        return {"index": index, "delta": {"tool_calls": deltas}, "finish_reason": None, "logprobs": None}

    async def render(self, events: AsyncIterator[tuple[int, Any]], num_choices: int) -> AsyncIterator[Any]:
        if self.chat:
            yield self.chunk(
                [
                    {
                        "index": i,
                        "delta": {"role": "assistant", "content": ""},
                        "finish_reason": None,
                        "logprobs": None,
                    }
                    for i in range(num_choices)
                ]
            )
        prompt_tokens: dict[int, int] = {}
        generated = 0
        async for index, event in events:
            if isinstance(event, TokenEvent):
                if self.tools is None and (event.text or self.choices.logprobs is not None):
                    score = TokenLogprob(event.token_id, event.logprob, event.top)
                    yield self.chunk([self.choice(index, event.text, None, score)])
                continue
            calls = self.tools.calls(event.text) if self.tools is not None else None
            if self.tools is not None:
                yield self.chunk([self.tool_delta(index, event, calls)])
            prompt_tokens[index] = event.prompt_tokens
            generated += len(event.token_ids)
            reason = "tool_calls" if calls else FINISH_REASONS[event.finish_reason]
            yield self.chunk([self.choice(index, None, reason, None)])
        if self.include_usage:
            # choices of one prompt share its tokens: count each distinct prompt once
            per_prompt = {i // self.choices.n: tokens for i, tokens in prompt_tokens.items()}
            yield self.chunk([], _usage(sum(per_prompt.values()), generated))
        yield "[DONE]"
