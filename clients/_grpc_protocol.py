"""The adapterd server's gRPC API (adapterd.v1 Generation and Adapters) without I/O: request messages
and answer parsing for GrpcClient and AsyncGrpcClient."""

from __future__ import annotations

import io
import json
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from google.protobuf import json_format

from adapterd.clients._core import Call, StreamCall
from adapterd.clients.types import Adapter, Generation, Messages, Sampling, Token, adapter_files
from adapterd.v1 import adapters_pb2, generation_pb2

UPLOAD_CHUNK_BYTES = 1 << 20


@dataclass(frozen=True)
class GrpcRequest:
    service: str  # "Generation" | "Adapters"
    method: str  # the RPC's name, e.g. "Generate"
    message: Any  # a request message, or an iterator of them for a client-streaming RPC
    has_deadline: bool = True  # False: an upload, whose length depends on the adapter's size


def parameters(sampling: Sampling) -> generation_pb2.GenerationParameters:
    """Unset fields take the server's defaults; top_p and top_k are sent only when sampling, as over HTTP."""
    message = generation_pb2.GenerationParameters(max_new_tokens=sampling.max_new_tokens, stop=sampling.stop)
    optional: dict[str, Any] = {
        "temperature": sampling.temperature,
        "repetition_penalty": sampling.repetition_penalty,
        "seed": sampling.seed,
    }
    if sampling.is_sampling:
        optional.update(top_p=sampling.top_p, top_k=sampling.top_k)
    extras = sampling.extras()
    optional.update(
        {
            name: extras.get(name)
            for name in ("ignore_eos", "min_tokens", "presence_penalty", "frequency_penalty")
        }
    )
    for name, value in optional.items():
        if value is not None:
            setattr(message, name, value)
    message.stop_token_ids.extend(sampling.stop_token_ids)
    for token_id, bias in (sampling.logit_bias or {}).items():
        message.logit_bias.add(token_id=int(token_id), bias=bias)
    if sampling.structured is not None:
        message.structured_output.CopyFrom(structured_output(*sampling.structured))
    return message


def structured_output(name: str, value: Any) -> generation_pb2.StructuredOutput:
    if name == "json_schema":
        return generation_pb2.StructuredOutput(json_schema=json.dumps(value))
    if name == "choice":
        return generation_pb2.StructuredOutput(choice=generation_pb2.ChoiceList(choices=list(value)))
    return generation_pb2.StructuredOutput(**{name: value})


def generation(message: generation_pb2.GenerateResponse) -> Generation:
    return Generation(
        text=message.text,
        token_ids=list(message.token_ids),
        finish_reason=message.finish_reason,
        prompt_tokens=message.prompt_tokens,
        generated_tokens=message.generated_tokens,
    )


def adapter(message: adapters_pb2.Adapter) -> Adapter:
    description = json_format.MessageToDict(
        message, preserving_proto_field_name=True, always_print_fields_with_no_presence=True
    )
    description["size_bytes"] = message.size_bytes  # int64 is a string in proto JSON
    return Adapter.from_dict(description)


class StreamReader:
    """GenerateStream's messages as Tokens: each token is held until the next message, so that the last
    one can carry the final `done` Generation."""

    def __init__(self) -> None:
        self.held: Token | None = None

    def __call__(self, message: generation_pb2.GenerateStreamResponse) -> list[Token]:
        held = self.held
        if message.WhichOneof("event") == "token":
            self.held = Token(message.token.token_id, message.token.text)
            return [held] if held is not None else []
        self.held = None
        if held is None:
            return []
        return [Token(held.id, held.text, generation(message.done))]


def upload_messages(
    adapter_id: str, path: str | Path, metadata: Mapping[str, Any] | None = None
) -> Iterator[adapters_pb2.UploadAdapterRequest]:
    """A header with adapter_config.json (and the metadata), then the weights in chunks, read as the upload
    proceeds."""
    config, weights = adapter_files(path)  # before anything is sent: a missing file fails at once
    config_bytes = config if isinstance(config, bytes) else config.read_bytes()
    header = adapters_pb2.UploadHeader(id=adapter_id, adapter_config=config_bytes)
    if metadata is not None:
        header.metadata.update(dict(metadata))

    def messages() -> Iterator[adapters_pb2.UploadAdapterRequest]:
        yield adapters_pb2.UploadAdapterRequest(header=header)
        with io.BytesIO(weights) if isinstance(weights, bytes) else weights.open("rb") as chunks:
            while chunk := chunks.read(UPLOAD_CHUNK_BYTES):
                yield adapters_pb2.UploadAdapterRequest(weights_chunk=chunk)

    return messages()


class GrpcServerCodec:
    """The server's methods as gRPC calls (see `_api.ServerCodec`)."""

    def generate(self, prompt: str, adapter_id: str | None, sampling: Sampling) -> Call[Generation]:
        message = generate_request(adapter_id, sampling, prompt=prompt)
        return Call(GrpcRequest("Generation", "Generate", message), generation)

    def generate_stream(self, prompt: str, adapter_id: str | None, sampling: Sampling) -> StreamCall[Token]:
        message = generate_request(adapter_id, sampling, prompt=prompt)
        return StreamCall(GrpcRequest("Generation", "GenerateStream", message), StreamReader)

    def chat(self, messages: Messages, adapter_id: str | None, sampling: Sampling) -> Call[Generation]:
        turns = [generation_pb2.ChatMessage(role=m["role"], content=m["content"]) for m in messages]
        message = generate_request(adapter_id, sampling, messages=generation_pb2.ChatMessages(messages=turns))
        return Call(GrpcRequest("Generation", "Generate", message), generation)

    def list_adapters(self) -> Call[list[Adapter]]:
        request = GrpcRequest("Adapters", "ListAdapters", adapters_pb2.ListAdaptersRequest())
        return Call(request, lambda answer: [adapter(a) for a in answer.adapters], idempotent=True)

    def get_adapter(self, adapter_id: str) -> Call[Adapter]:
        request = GrpcRequest("Adapters", "GetAdapter", adapters_pb2.GetAdapterRequest(id=adapter_id))
        return Call(request, adapter, idempotent=True)

    def upload_adapter(
        self, adapter_id: str, path: str | Path, metadata: Mapping[str, Any] | None
    ) -> Call[Adapter]:
        messages = upload_messages(adapter_id, path, metadata)
        request = GrpcRequest("Adapters", "UploadAdapter", messages, has_deadline=False)
        return Call(request, lambda answer: adapter(answer.adapter))

    def delete_adapter(self, adapter_id: str) -> Call[None]:
        request = GrpcRequest("Adapters", "DeleteAdapter", adapters_pb2.DeleteAdapterRequest(id=adapter_id))
        return Call(request, lambda _: None)


def generate_request(
    adapter_id: str | None, sampling: Sampling, **source: Any
) -> generation_pb2.GenerateRequest:
    return generation_pb2.GenerateRequest(
        adapter_id=adapter_id or "", parameters=parameters(sampling), **source
    )
