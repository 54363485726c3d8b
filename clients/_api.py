"""The adapterd server's client methods, written once for Client, AsyncClient, GrpcClient and
AsyncGrpcClient. Each method builds a call with the client's codec (HTTP or gRPC); the client's runner
(sync or async) sends it (see `_core`)."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

from adapterd.clients._core import Call, StreamCall, endpoint, stream_endpoint
from adapterd.clients.types import Adapter, Generation, Messages, Sampling, Token

if TYPE_CHECKING:
    from typing_extensions import Unpack

    from adapterd.clients.types import SamplingOptions


class ServerCodec(Protocol):
    """How one transport expresses the server's methods as calls."""

    def generate(self, prompt: str, adapter_id: str | None, sampling: Sampling) -> Call[Generation]: ...
    def generate_stream(
        self, prompt: str, adapter_id: str | None, sampling: Sampling
    ) -> StreamCall[Token]: ...
    def chat(self, messages: Messages, adapter_id: str | None, sampling: Sampling) -> Call[Generation]: ...
    def list_adapters(self) -> Call[list[Adapter]]: ...
    def get_adapter(self, adapter_id: str) -> Call[Adapter]: ...
    def upload_adapter(
        self, adapter_id: str, path: str | Path, metadata: Mapping[str, Any] | None
    ) -> Call[Adapter]: ...
    def delete_adapter(self, adapter_id: str) -> Call[None]: ...


class ServerApi:
    _codec: ServerCodec

    @endpoint
    def generate(
        self, prompt: str, adapter_id: str | None = None, **options: Unpack[SamplingOptions]
    ) -> Call[Generation]:
        """Continue `prompt` (plain text, no chat template) with the base model or the adapter `adapter_id`.
        Options: max_new_tokens (default 64), temperature (0 or unset: greedy), top_p, top_k (when
        sampling), repetition_penalty, seed, stop (a string or a list); ignore_eos, logit_bias ({token id:
        bias}), min_tokens, stop_token_ids, presence_penalty, frequency_penalty (as in vLLM and OpenAI); and
        at most one structured output: json_schema (a dict), json_object=True, regex, grammar (Lark) or
        choice (a list of strings)."""
        return self._codec.generate(prompt, adapter_id, Sampling.of(options))

    @stream_endpoint
    def generate_stream(
        self, prompt: str, adapter_id: str | None = None, **options: Unpack[SamplingOptions]
    ) -> StreamCall[Token]:
        """generate(), one Token at a time as the server makes them; the last Token carries the whole
        Generation. Leaving the loop early cancels the generation on the server."""
        return self._codec.generate_stream(prompt, adapter_id, Sampling.of(options))

    @endpoint
    def chat(
        self, messages: Messages, adapter_id: str | None = None, **options: Unpack[SamplingOptions]
    ) -> Call[Generation]:
        """Answer chat `messages` (rendered with the model's chat template), options as for generate().
        Over HTTP this uses the OpenAI route: the Generation has no token_ids (None), and an
        end-of-sequence finish reads "stop"."""
        return self._codec.chat(messages, adapter_id, Sampling.of(options))

    @endpoint
    def list_adapters(self) -> Call[list[Adapter]]:
        """Every adapter this API key may use, ordered by id."""
        return self._codec.list_adapters()

    @endpoint
    def get_adapter(self, adapter_id: str) -> Call[Adapter]:
        """One adapter's description; AdapterNotFound if unknown."""
        return self._codec.get_adapter(adapter_id)

    @endpoint
    def upload_adapter(
        self, adapter_id: str, path: str | Path, metadata: Mapping[str, Any] | None = None
    ) -> Call[Adapter]:
        """Upload the PEFT adapter directory `path` (adapter_config.json + adapter_model.safetensors), or a
        tar archive of it, as `adapter_id`, or as its next version, with optional `metadata` (a JSON object,
        kept with the version and shown in its description). Servable as soon as this returns."""
        return self._codec.upload_adapter(adapter_id, path, metadata)

    @endpoint
    def delete_adapter(self, adapter_id: str) -> Call[None]:
        """Delete an adapter (every version); requests already using it finish first."""
        return self._codec.delete_adapter(adapter_id)
