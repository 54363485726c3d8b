"""The `adapterd.v1.Generation` servicer: Generate and GenerateStream over `Service.stream`."""

from __future__ import annotations

from collections.abc import AsyncIterator

from adapterd.server.common.auth import ApiKeys, Principal
from adapterd.server.common.errors import InvalidRequest
from adapterd.server.common.protocol import (
    Completion,
    Constraint,
    GenerateRequest,
    SamplingParams,
    TokenEvent,
    TokenLogprob,
    constraint,
    sampling_params,
)
from adapterd.server.host.service import Service
from adapterd.server.wire.rpc import rpc
from adapterd.v1 import generation_pb2 as pb
from adapterd.v1 import generation_pb2_grpc

# GenerationParameters' optional scalars, named as in SamplingParams; unset ones take its defaults.
OPTIONAL_PARAMS = (
    "max_new_tokens",
    "temperature",
    "top_p",
    "top_k",
    "repetition_penalty",
    "seed",
    "top_logprobs",
    "prompt_logprobs",
    "min_tokens",
    "presence_penalty",
    "frequency_penalty",
)


def parse_params(message: pb.GenerationParameters) -> SamplingParams:
    given = {name: getattr(message, name) for name in OPTIONAL_PARAMS if message.HasField(name)}
    return sampling_params(
        **given,
        stop=tuple(message.stop),
        ignore_eos=message.ignore_eos,
        logit_bias=tuple((b.token_id, b.bias) for b in message.logit_bias),
        stop_token_ids=tuple(message.stop_token_ids),
        constraint=parse_structured(message.structured_output)
        if message.HasField("structured_output")
        else None,
    )


def parse_structured(message: pb.StructuredOutput) -> Constraint | None:
    kind = message.WhichOneof("kind")
    name = f"structured_output.{kind}"
    if kind is None:
        return None
    if kind == "json_object":
        return constraint("json_object", None, name) if message.json_object else None
    if kind == "choice":
        return constraint("choice", list(message.choice.choices), name)
    return constraint(kind, getattr(message, kind), name)


def parse_request(message: pb.GenerateRequest) -> GenerateRequest:
    params = parse_params(message.parameters)
    adapter_id = message.adapter_id or None
    if message.WhichOneof("input") == "messages":
        turns = tuple({"role": m.role, "content": m.content} for m in message.messages.messages)
        if not turns:
            raise InvalidRequest("messages must hold at least one message")
        return GenerateRequest(messages=turns, adapter_id=adapter_id, params=params)
    if message.WhichOneof("input") == "prompt_ids":
        if not message.prompt_ids.ids:
            raise InvalidRequest("prompt_ids must hold at least one token id")
        return GenerateRequest(prompt_ids=tuple(message.prompt_ids.ids), adapter_id=adapter_id, params=params)
    if not message.prompt:
        raise InvalidRequest("prompt must be a non-empty string (or send messages)")
    return GenerateRequest(prompt=message.prompt, adapter_id=adapter_id, params=params)


def response(done: Completion) -> pb.GenerateResponse:
    return pb.GenerateResponse(
        text=done.text,
        token_ids=done.token_ids,
        finish_reason=done.finish_reason,
        prompt_tokens=done.prompt_tokens,
        generated_tokens=len(done.token_ids),
        logprobs=[token_logprob(s) for s in done.logprobs],
        prompt_logprobs=[token_logprob(s) for s in done.prompt_logprobs or ()],
        seed=done.seed,
    )


def token_logprob(score: TokenLogprob) -> pb.TokenLogprob:
    return pb.TokenLogprob(token_id=score.token_id, logprob=score.logprob, top=top_tokens(score.top))


def top_tokens(top: tuple[tuple[int, float], ...]) -> list[pb.TopToken]:
    return [pb.TopToken(token_id=i, logprob=lp) for i, lp in top]


def token(event: TokenEvent) -> pb.Token:
    return pb.Token(
        token_id=event.token_id, text=event.text, logprob=event.logprob, top=top_tokens(event.top)
    )


class GenerationServicer(generation_pb2_grpc.GenerationServicer):
    def __init__(self, service: Service, keys: ApiKeys) -> None:
        self.service = service
        self.keys = keys
        self.replica = service.config.replica  # sent as x-adapterd-replica metadata

    @rpc
    async def Generate(self, request: pb.GenerateRequest, principal: Principal) -> pb.GenerateResponse:
        return response(await self.service.generate(parse_request(request), principal))

    @rpc
    async def GenerateStream(
        self, request: pb.GenerateRequest, principal: Principal
    ) -> AsyncIterator[pb.GenerateStreamResponse]:
        events = self.service.stream(parse_request(request), principal)
        try:
            async for event in events:
                if isinstance(event, TokenEvent):
                    yield pb.GenerateStreamResponse(token=token(event))
                else:
                    yield pb.GenerateStreamResponse(done=response(event))
        finally:
            await events.aclose()  # a cancelled call cancels the sequence now
