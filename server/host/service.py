"""The async facade both front ends share: generation, adapters, auth checks, limits and metrics.

Front ends parse their wire format into `protocol` types, call one method here, and format the result.
Blocking work (tokenizing, reading adapters from disk) runs in worker threads; the engine thread only
receives prepared requests.
"""

from __future__ import annotations

import asyncio
import json
import time
import weakref
from collections.abc import AsyncGenerator, Awaitable, Callable, Iterable
from contextlib import aclosing, suppress
from pathlib import Path
from typing import Any

from adapterd.adapters.store import AdapterRecord
from adapterd.server.common.auth import Principal
from adapterd.server.common.config import HEALTH_WATCH_SECONDS, ServerConfig
from adapterd.server.common.errors import AdapterNotFound, EngineFailed, Forbidden, InvalidRequest, Overloaded
from adapterd.server.common.metrics import EngineLoad, Metrics, adapter_label
from adapterd.server.common.protocol import Completion, GenerateRequest, Health, TokenEvent
from adapterd.server.engine.messages import Event, RequestOutput
from adapterd.server.host.llm import LLM, PreparedRequest
from adapterd.server.host.tools import tool_style

MAX_METADATA_BYTES = 64 * 1024  # an adapter's metadata, as JSON (UTF-8)


class Service:
    def __init__(self, llm: LLM, config: ServerConfig) -> None:
        self.llm = llm
        self.config = config
        self.metrics = Metrics(config.replica)
        self.num_pending = 0
        self.draining = False  # set when the server begins to shut down: not ready any more
        self._token_texts: dict[int, str] = {}
        self._outboxes: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, AsyncOutbox] = (
            weakref.WeakKeyDictionary()
        )
        tokenizer = llm.tokenizer
        self._special_ids = set(tokenizer.all_special_ids) if tokenizer is not None else set()
        self.tool_style = tool_style(getattr(tokenizer, "chat_template", None))  # how the model calls tools
        scheduler, blocks = llm.engine.scheduler, llm.engine.blocks
        self.metrics.watch(
            lambda: len(scheduler.waiting),
            lambda: len(scheduler.running),
            self._tier_counts,
            lambda: (blocks.queried_tokens, blocks.hit_tokens, blocks.num_cached_blocks),
            self._engine_load,
        )

    @property
    def model_name(self) -> str:
        return self.llm.model_name

    # -- generation ---------------------------------------------------------------------------------------

    async def stream(self, request: GenerateRequest, principal: Principal) -> AsyncGenerator[Event, None]:
        """Token events, then the Completion. Closing the iterator early cancels the request."""
        self._check_use(request.adapter_id, principal)
        if self.num_pending >= self.config.max_pending_requests:
            raise Overloaded(f"{self.num_pending} requests are pending; try again later")
        self.num_pending += 1
        run = None
        try:
            prepared = await asyncio.to_thread(self.llm.prepare, request)
            run = self._run(prepared)
            async for event in run:
                yield event
        finally:
            self.num_pending -= 1
            if run is not None:
                await run.aclose()  # runs _run's cleanup now, not at garbage collection

    async def generate(self, request: GenerateRequest, principal: Principal) -> Completion:
        events = self.stream(request, principal)
        try:
            async for event in events:
                if isinstance(event, Completion):
                    return event
        finally:
            await events.aclose()
        raise AssertionError("a stream always ends with a Completion")

    async def generate_all(self, requests: list[GenerateRequest], principal: Principal) -> list[Completion]:
        """Several requests at once (the choices of `n`, the prompts of a list): they share the batch."""
        tasks = [asyncio.ensure_future(self.generate(r, principal)) for r in requests]
        try:
            return list(await asyncio.gather(*tasks))
        finally:
            for task in tasks:
                task.cancel()  # one failed: the others stop too

    async def stream_all(
        self, requests: list[GenerateRequest], principal: Principal
    ) -> AsyncGenerator[tuple[int, Event], None]:
        """The events of several requests as they come, each tagged with its request's index."""
        merged: asyncio.Queue[tuple[int, Event] | BaseException] = asyncio.Queue()

        async def pump(index: int, request: GenerateRequest) -> None:
            try:
                async with aclosing(self.stream(request, principal)) as events:
                    async for event in events:
                        await merged.put((index, event))
            except Exception as exc:
                await merged.put(exc)

        tasks = [asyncio.ensure_future(pump(i, r)) for i, r in enumerate(requests)]
        try:
            remaining = len(requests)
            while remaining:
                item = await merged.get()
                if isinstance(item, BaseException):
                    raise item
                yield item
                remaining -= isinstance(item[1], Completion)
        finally:
            for task in tasks:
                task.cancel()

    # -- tokens -------------------------------------------------------------------------------------------

    def token_text(self, token_id: int) -> str:
        """One token decoded on its own (special tokens kept), as TGI and vLLM show tokens."""
        text = self._token_texts.get(token_id)
        if text is None:
            tokenizer = self.llm.tokenizer
            text = tokenizer.decode([token_id]) if tokenizer is not None else ""
            self._token_texts[token_id] = text
        return text

    def is_special(self, token_id: int) -> bool:
        return token_id in self._special_ids

    def detokenize(self, token_ids: Any) -> str:
        self.llm.engine.check_prompt(list(token_ids))
        tokenizer = self._tokenizer()
        return str(tokenizer.decode(list(token_ids)))

    async def tokenize(
        self, request: GenerateRequest, principal: Principal, add_special_tokens: bool = True
    ) -> tuple[list[int], int]:
        """A request's prompt as the engine would see it (plain text without special tokens, if asked), and
        the context limit left for it (a soft prompt's virtual tokens take their share)."""
        self._check_use(request.adapter_id, principal)
        tokenizer = self._tokenizer()
        if request.prompt is not None and not add_special_tokens:
            prompt_ids = list(tokenizer(request.prompt, add_special_tokens=False).input_ids)
        else:
            prompt_ids = await asyncio.to_thread(self.llm.encode, request)
        adapter = await asyncio.to_thread(self.llm.adapters.resolve, request.adapter_id)
        virtual = adapter.num_virtual_tokens if adapter else 0
        return prompt_ids, self.llm.engine.context_limit - virtual

    def tokenizer_info(self) -> dict[str, Any]:
        """What vLLM's /tokenizer_info tells (lm-eval's remote tokenizer reads it)."""
        tokenizer = self._tokenizer()
        return {
            "tokenizer_class": type(tokenizer).__name__,
            "eos_token": tokenizer.eos_token,
            "bos_token": tokenizer.bos_token,
            "pad_token": tokenizer.pad_token,
            "unk_token": tokenizer.unk_token,
            "chat_template": getattr(tokenizer, "chat_template", None),
            "model_max_length": self.llm.engine.context_limit,
        }

    def _tokenizer(self) -> Any:
        if self.llm.tokenizer is None:
            raise InvalidRequest("this model has no tokenizer")
        return self.llm.tokenizer

    async def _run(self, prepared: PreparedRequest) -> AsyncGenerator[Event, None]:
        outbox = self._outbox()
        outputs = outbox.open(prepared.request_id)
        [handle] = self.llm.enqueue([prepared], [outbox])
        started = time.perf_counter()
        label = adapter_label(prepared.request.adapter_id or self.model_name)
        self.metrics.requests.labels(adapter=label).inc()
        tokens_served = self.metrics.adapter_tokens.labels(adapter=label)
        num_tokens, finished = 0, False
        try:
            while not finished:
                output = await outputs.get()
                if output.refused is not None:
                    finished = True
                    raise output.refused
                for event in output.events:
                    if isinstance(event, TokenEvent):
                        if num_tokens == 0:
                            self.metrics.ttft.observe(time.perf_counter() - started)
                        num_tokens += 1
                        self.metrics.generated_tokens.inc()
                        tokens_served.inc()
                    else:
                        finished = True
                        if event.finish_reason == "error":
                            raise EngineFailed(event.error or "the engine failed this request")
                    yield event
        finally:
            outbox.close(prepared.request_id)
            if not finished:
                handle.cancel()  # a client that left: the engine drops the sequence within one step

    def _outbox(self) -> AsyncOutbox:
        loop = asyncio.get_running_loop()
        outbox = self._outboxes.get(loop)
        if outbox is None:
            outbox = self._outboxes[loop] = AsyncOutbox(loop)
        return outbox

    # -- adapters -----------------------------------------------------------------------------------------

    def _check_use(self, adapter_id: str | None, principal: Principal) -> None:
        if adapter_id and not self.llm.adapters.is_base(adapter_id) and not principal.can_see(adapter_id):
            raise AdapterNotFound(f"adapter {adapter_id!r} is not registered")

    async def upload(
        self, adapter_id: str, staged_dir: Path, principal: Principal, metadata: dict[str, Any] | None = None
    ) -> tuple[dict[str, Any], bool]:
        principal.require_owner(adapter_id)
        if metadata is not None:
            check_metadata(metadata)
        record, replaced = await asyncio.to_thread(
            self.llm.adapters.publish, adapter_id, staged_dir, metadata
        )
        return await self.describe(record), replaced

    async def load_from_path(self, adapter_id: str, path: str, principal: Principal) -> dict[str, Any]:
        """vLLM's /v1/load_lora_adapter: only from under a directory the operator allowed."""
        principal.require_owner(adapter_id)
        if "\x00" in path:  # no file system path holds one; Path.resolve would raise
            raise InvalidRequest("lora_path must not contain a NUL character", param="lora_path")
        if not self.config.allowed_lora_dirs:
            raise Forbidden(
                "loading adapters from the server's file system is off: start the server with "
                "--allowed-lora-dir DIR (or upload the adapter: PUT /v1/adapters/{id})"
            )
        source = Path(path).resolve()
        if not any(source.is_relative_to(d.resolve()) for d in self.config.allowed_lora_dirs):
            raise Forbidden(f"lora_path {path!r} is not under a directory allowed by --allowed-lora-dir")
        if not source.is_dir():
            raise InvalidRequest(f"lora_path {path!r} is not a directory")
        record, _ = await asyncio.to_thread(self.llm.adapters.publish, adapter_id, source)
        return await self.describe(record)

    async def list_adapters(self, principal: Principal) -> list[dict[str, Any]]:
        records = [r for r in self.llm.adapters.records() if principal.can_see(r.id)]
        gpu = await self._gpu_resident()
        return [self._description(r, gpu) for r in records]

    async def get_adapter(self, adapter_id: str, principal: Principal) -> dict[str, Any]:
        self._check_use(adapter_id, principal)
        return await self.describe(self.llm.adapters.record(adapter_id))

    async def delete_adapter(self, adapter_id: str, principal: Principal) -> dict[str, Any]:
        self._check_use(adapter_id, principal)
        principal.require_owner(adapter_id)
        record = await asyncio.to_thread(self.llm.adapters.remove, adapter_id)
        return record.describe()

    async def describe(self, record: AdapterRecord) -> dict[str, Any]:
        return self._description(record, await self._gpu_resident())

    def _description(self, record: AdapterRecord, gpu: set[tuple[str, int]]) -> dict[str, Any]:
        key = (record.id, record.version)
        residency = "gpu" if key in gpu else "cpu" if key in self.llm.adapters.host_resident() else "disk"
        return {**record.describe(), "residency": residency}

    async def _gpu_resident(self) -> set[tuple[str, int]]:
        return await asyncio.wrap_future(self.llm.loop.call(lambda engine: engine.adapters.resident()))

    def _engine_load(self) -> EngineLoad:
        """Read at scrape time from the loop thread, while the engine thread steps: copies (atomic under the
        GIL) of the queues, and the slots' contents retried if a step changed them while read."""
        engine = self.llm.engine
        waiting, running = list(engine.scheduler.waiting), list(engine.scheduler.running)
        resident: set[tuple[str, int]] = set()
        for _ in range(3):
            try:
                resident = engine.adapters.resident()
                break
            except RuntimeError:  # changed size during iteration
                continue
        blocks = engine.blocks
        asked = {seq.adapter.adapter_id for seq in waiting if seq.adapter is not None}
        return EngineLoad(
            waiting=len(waiting),
            running=len(running),
            kv_cache_usage=1 - blocks.num_free_blocks / blocks.num_blocks if blocks.num_blocks else 0.0,
            max_lora=self.llm.engine_config.max_gpu_adapters,
            running_adapters=self._gateway_names(adapter_id for adapter_id, _ in resident),
            waiting_adapters=self._gateway_names(asked),
        )

    def _gateway_names(self, adapter_ids: Iterable[str]) -> tuple[str, ...]:
        """Adapter ids for the open /metrics: tenant adapters only with --metrics-tenant-adapters."""
        shown = self.config.metrics_tenant_adapters
        return tuple(sorted({i for i in adapter_ids if shown or "/" not in i}))

    def _tier_counts(self) -> dict[str, tuple[int, int]]:
        adapters, slots = self.llm.adapters, self.llm.engine.adapters
        return {
            "cpu": (adapters.num_loads, adapters.num_evictions),
            "gpu": (
                slots.num_loads,
                slots.num_evictions,
            ),
        }

    # -- operations ---------------------------------------------------------------------------------------

    def health(self) -> Health:
        """The engine's health (liveness): see EngineLoop.health."""
        return self.llm.loop.health

    def readiness(self) -> Health:
        """Whether to send this server traffic (readiness): healthy and not shutting down."""
        if self.draining:
            return Health(False, "the server is shutting down")
        return self.health()

    async def watch_health(self, on_change: Callable[[Health], Awaitable[None]]) -> None:
        """Call `on_change` with the health each time it changes (first with the health now), every
        HEALTH_WATCH_SECONDS, until cancelled."""
        last: Health | None = None
        while True:
            health = self.health()
            if last is None or health.ok != last.ok:
                await on_change(health)
                last = health
            await asyncio.sleep(HEALTH_WATCH_SECONDS)

    def info(self) -> dict[str, Any]:
        engine = self.llm.engine_config
        return {
            "model_id": self.model_name,
            "model_dtype": str(self.llm.placement.dtype).removeprefix("torch."),
            "quantize": self.llm.placement.quantize,
            "device": str(self.llm.placement.device),
            "max_batch": engine.max_batch,
            "max_rank": engine.max_rank,
            "max_gpu_adapters": engine.max_gpu_adapters,
            "max_cpu_adapters": self.llm.adapters.max_cpu_adapters,
            "kv_cache_tokens": engine.kv_cache_tokens,
            "max_total_tokens": min(
                self.llm.engine.blocks.num_blocks * engine.kv_block_size, engine.max_seq_len
            ),
            "version": _version(),
            "auth": "api_keys" if self.config.api_keys else "open",
            "trainer": self.config.trainer_url is not None,  # its routes are served here (--trainer)
        }


class AsyncOutbox:
    """The engine's outputs for the requests of one asyncio loop: one hop onto the loop per engine step,
    however many of its requests the step served."""

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self.loop = loop
        self.queues: dict[str, asyncio.Queue[RequestOutput]] = {}

    def open(self, request_id: str) -> asyncio.Queue[RequestOutput]:
        queue = self.queues[request_id] = asyncio.Queue()
        return queue

    def close(self, request_id: str) -> None:
        self.queues.pop(request_id, None)

    def deliver(self, outputs: list[RequestOutput]) -> None:  # on the engine thread
        with suppress(RuntimeError):  # the loop has closed: nobody is listening any more
            self.loop.call_soon_threadsafe(self._dispatch, outputs)

    def _dispatch(self, outputs: list[RequestOutput]) -> None:
        for output in outputs:
            queue = self.queues.get(output.request_id)
            if queue is not None:
                queue.put_nowait(output)


def check_metadata(metadata: dict[str, Any]) -> None:
    """Metadata must be plain JSON (no NaN or Infinity) of at most MAX_METADATA_BYTES bytes, whichever
    front end it came through."""
    try:
        text = json.dumps(metadata, ensure_ascii=False, allow_nan=False, separators=(",", ":"))
    except (TypeError, ValueError, RecursionError) as exc:
        raise InvalidRequest(f"metadata: not plain JSON ({exc})") from exc
    size = len(text.encode())
    if size > MAX_METADATA_BYTES:
        raise InvalidRequest(f"metadata: {size} bytes as JSON exceeds the {MAX_METADATA_BYTES}-byte limit")


def _version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("adapterd")
    except PackageNotFoundError:  # pragma: no cover - running from a source tree
        return "0+unknown"
