"""The Python API: load a base model once, register adapters, generate (batched or streamed).

llm = LLM(model="default")
llm.add_adapter("sql", "/path/to/peft-adapter")
[out] = llm.generate([GenerateRequest(prompt="...", adapter_id="sql")])
"""

from __future__ import annotations

import queue
import tempfile
import uuid
from collections.abc import Iterable, Iterator
from concurrent.futures import Future
from dataclasses import dataclass
from pathlib import Path

from adapterd.adapters.format import BaseModelInfo
from adapterd.adapters.store import AdapterRecord, AdapterStore
from adapterd.server.common.config import EngineConfig, ModelConfig
from adapterd.server.common.errors import InvalidRequest
from adapterd.server.common.protocol import Completion, GenerateRequest, TokenEvent
from adapterd.server.engine.adapter_slots import LoadedAdapter
from adapterd.server.engine.engine import LLMEngine
from adapterd.server.engine.grammar import GrammarMatcher, Grammars
from adapterd.server.engine.loop import EngineLoop
from adapterd.server.engine.messages import AddRequest, CancelRequest, EventSink, Outbox, SinkOutbox
from adapterd.server.host.registry import AdapterRegistry
from adapterd.server.model.loader import Placement, load_model
from adapterd.server.model.resolve import resolve_model
from adapterd.server.model.tokenizer import encode_chat, eos_token_ids, load_tokenizer


@dataclass(frozen=True)
class PreparedRequest:
    """A request ready for the engine: tokenized, its adapter version resolved, known to fit."""

    request_id: str
    prompt_ids: list[int]
    request: GenerateRequest
    adapter: LoadedAdapter | None
    grammar: GrammarMatcher | None = None


class RequestHandle:
    """A submitted request: cancel it at any time (a no-op once it finished)."""

    def __init__(self, loop: EngineLoop, request_id: str) -> None:
        self._loop = loop
        self.request_id = request_id

    def cancel(self) -> None:
        self._loop.send([CancelRequest(self.request_id)])


class LLM:
    def __init__(
        self,
        model: str = "default",
        quantize: str = "auto",
        device: str = "auto",
        engine: EngineConfig | None = None,
        cache_dir: Path | None = None,
        store: Path | None = None,
        max_cpu_adapters: int = 64,
    ) -> None:
        """`store`: the adapter store directory; None keeps adapters in a temporary one for this object."""
        model_config = ModelConfig(model=model, quantize=quantize, device=device, cache_dir=cache_dir)  # type: ignore[arg-type]
        self.engine_config = engine or EngineConfig()
        resolved = resolve_model(model_config.model, model_config.resolved_cache_dir)
        self.model_name = resolved.name
        self.placement = Placement.resolve(
            model_config.device, model_config.quantize, model_config.nf4_kernel
        )
        self.model = load_model(resolved.path, self.placement)
        self.tokenizer = load_tokenizer(resolved.path)
        self.base = BaseModelInfo.from_hf_config(self.model.config, resolved.name)
        self._temp_store = None if store else tempfile.TemporaryDirectory(prefix="adapterd-store-")
        store_dir = store or Path(self._temp_store.name)  # type: ignore[union-attr]
        self.adapters = AdapterRegistry(
            AdapterStore(store_dir),
            self.base,
            self.engine_config,
            self.placement.dtype,
            max_cpu_adapters,
            pin_memory=self.placement.device.type == "cuda",
        )
        eos = eos_token_ids(resolved.path, self.tokenizer, self.model.config)
        self.engine = LLMEngine(self.model, self.tokenizer, eos, self.engine_config)
        self.grammars = Grammars(self.tokenizer, self.engine.vocab_size, eos)
        self.loop = EngineLoop(self.engine).start()

    def add_adapter(self, adapter_id: str, path: str | Path) -> AdapterRecord:
        """Validate a PEFT directory and publish a copy of it under `adapter_id`."""
        return self.adapters.add(adapter_id, path)

    def remove_adapter(self, adapter_id: str) -> None:
        self.adapters.remove(adapter_id)

    def encode(self, request: GenerateRequest) -> list[int]:
        """The prompt's token ids: token-id prompts exactly as given, text through the tokenizer."""
        ids = self._encode(request)
        return ids[-request.truncate :] if request.truncate else ids

    def _encode(self, request: GenerateRequest) -> list[int]:
        if request.prompt_ids is not None:
            return list(request.prompt_ids)
        if self.tokenizer is None:
            raise InvalidRequest("this model has no tokenizer: send prompt_ids")
        if request.messages is not None:
            return encode_chat(self.tokenizer, list(request.messages), list(request.tools))
        return list(self.tokenizer(request.prompt).input_ids)

    def prepare(self, request: GenerateRequest) -> PreparedRequest:
        """Tokenize, resolve the adapter, check the request fits and compile its constraint (cached by its
        text); raises on any problem, before anything reaches the engine."""
        params = request.params
        self.engine.check_params(params)
        grammar = self.grammars.matcher(params.constraint) if params.constraint else None
        prompt_ids = self.encode(request)
        adapter = self.adapters.resolve(request.adapter_id)
        self.engine.check_prompt(prompt_ids)
        self.engine.check_fits(len(prompt_ids), params, adapter)
        return PreparedRequest(_unique_id(request.request_id), prompt_ids, request, adapter, grammar)

    def enqueue(self, prepared: list[PreparedRequest], outboxes: list[Outbox]) -> list[RequestHandle]:
        """Hand prepared requests to the engine thread in one message batch: they join the same step.
        Their outputs arrive in their outboxes (a refusal too, as `RequestOutput.refused`)."""
        self.loop.send(
            AddRequest(p.request_id, tuple(p.prompt_ids), p.request.params, p.adapter, outbox, p.grammar)
            for p, outbox in zip(prepared, outboxes, strict=True)
        )
        return [RequestHandle(self.loop, p.request_id) for p in prepared]

    def submit(self, request: GenerateRequest, sink: EventSink) -> RequestHandle:
        """Queue a request; events arrive on `sink` from the engine thread. Errors raise here."""
        [handle] = self.submit_all([request], [sink])
        return handle

    def stream(self, request: GenerateRequest) -> Iterator[TokenEvent | Completion]:
        """Token events as they are produced, then the Completion. Leaving early cancels the request."""
        events: queue.SimpleQueue[TokenEvent | Completion] = queue.SimpleQueue()
        handle = self.submit(request, events.put)
        try:
            while True:
                event = events.get()
                yield event
                if isinstance(event, Completion):
                    return
        finally:
            handle.cancel()

    def submit_all(self, requests: list[GenerateRequest], sinks: list[EventSink]) -> list[RequestHandle]:
        """Queue requests together: all are prepared first (a bad one raises before any is queued), then
        handed to the engine thread in one go, so they enter its batch at the same step. Each sink gets its
        request's events on the engine thread; a request the engine refuses ends with an error Completion."""
        prepared = [self.prepare(request) for request in requests]
        return self.enqueue(prepared, [SinkOutbox(sink) for sink in sinks])

    def generate(self, requests: Iterable[GenerateRequest]) -> list[Completion]:
        """Run requests together in one continuous batch; results in input order."""
        requests = list(requests)
        futures: list[Future[Completion]] = [Future() for _ in requests]
        self.submit_all(requests, [_completion_sink(f) for f in futures])
        return [f.result() for f in futures]

    def close(self) -> None:
        self.loop.stop()
        if self._temp_store is not None:
            self._temp_store.cleanup()

    def __enter__(self) -> LLM:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _unique_id(request_id: str) -> str:
    """The engine's id for a request: the caller's id (if any) made unique, as samples share it."""
    suffix = uuid.uuid4().hex
    return f"{request_id}-{suffix[:12]}" if request_id else suffix


def _completion_sink(future: Future[Completion]) -> EventSink:
    def sink(event: TokenEvent | Completion) -> None:
        if isinstance(event, Completion):
            future.set_result(event)

    return sink
