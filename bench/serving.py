"""adapterd's side: the engine thread and adapter registry that `LLM` composes, around a prebuilt model.

`LLM` loads its model from a directory; GPU mode builds one from a config, so the bench composes the same
parts itself (`LLMEngine`, `EngineLoop`, `AdapterRegistry`). A batch is handed to the engine thread in one
call, so every row is admitted in the same prefill step, as a burst of concurrent requests would be.
"""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass, replace
from pathlib import Path

from adapterd.adapters.format import BaseModelInfo
from adapterd.adapters.store import AdapterStore
from adapterd.server.common.config import EngineConfig
from adapterd.server.common.protocol import Completion, SamplingParams, TokenEvent
from adapterd.server.engine.adapter_slots import LoadedAdapter
from adapterd.server.engine.engine import LLMEngine
from adapterd.server.engine.loop import EngineLoop
from adapterd.server.engine.messages import EventSink
from adapterd.server.host.registry import AdapterRegistry
from adapterd.server.model.tokenizer import eos_token_ids, load_tokenizer

from .models import Models
from .timing import Run, synchronize


@dataclass(frozen=True)
class Row:
    prompt_ids: list[int]
    adapter: LoadedAdapter | None
    max_new_tokens: int


class _Recorder:
    """Per-row token times, from the engine thread; `done` once every row completed."""

    def __init__(self, num_rows: int) -> None:
        self.first = [0.0] * num_rows
        self.last = [0.0] * num_rows
        self.first_cpu = [0.0] * num_rows  # process CPU time at the same events
        self.last_cpu = [0.0] * num_rows
        self.num_tokens = [0] * num_rows
        self.token_ids: list[list[int]] = [[] for _ in range(num_rows)]
        self.remaining = num_rows
        self.errors: list[str] = []
        self.done = threading.Event()

    def sink(self, row: int) -> EventSink:
        def record(event: TokenEvent | Completion) -> None:
            now, cpu = time.perf_counter(), time.process_time()
            if isinstance(event, TokenEvent):
                if not self.first[row]:
                    self.first[row], self.first_cpu[row] = now, cpu
                self.last[row], self.last_cpu[row] = now, cpu
                self.num_tokens[row] += 1
                self.token_ids[row].append(event.token_id)
                return
            if event.error:
                self.errors.append(event.error)
            self.remaining -= 1
            if self.remaining == 0:
                self.done.set()

        return record


class Server:
    def __init__(self, models: Models, config: EngineConfig, store_dir: Path, max_cpu_adapters: int) -> None:
        tokenizer = load_tokenizer(models.path) if models.path else None
        eos = eos_token_ids(models.path, tokenizer, models.config) if models.path else set()
        base = BaseModelInfo.from_hf_config(models.config, models.name)
        self.device = models.device
        self.registry = AdapterRegistry(
            AdapterStore(store_dir),
            base,
            config,
            models.placement.dtype,
            max_cpu_adapters,
            pin_memory=models.placement.device.type == "cuda",
        )
        self.engine = LLMEngine(models.engine_model, tokenizer, eos, config)
        self.loop = EngineLoop(self.engine).start()

    def close(self) -> None:
        self.loop.stop()

    def register(self, adapter_id: str, path: Path) -> LoadedAdapter:
        self.registry.add(adapter_id, path)
        loaded = self.registry.resolve(adapter_id)
        assert loaded is not None
        return loaded

    def run(self, rows: list[Row]) -> Run:
        """Generate every row in one continuous batch (ignoring eos); time it."""
        return self._run(rows)[0]

    def generate(self, rows: list[Row]) -> list[list[int]]:
        """Every row's generated token ids, generated in one continuous batch."""
        return self._run(rows)[1]

    def _run(self, rows: list[Row]) -> tuple[Run, list[list[int]]]:
        recorder = _Recorder(len(rows))

        def add_all(engine: LLMEngine) -> None:
            for index, row in enumerate(rows):
                params = SamplingParams(max_new_tokens=row.max_new_tokens, ignore_eos=True)
                engine.add_request(
                    f"bench-{index}", row.prompt_ids, params, row.adapter, recorder.sink(index)
                )

        start = time.perf_counter()
        self.loop.call(add_all).result()
        recorder.done.wait()
        end = time.perf_counter()
        if recorder.errors:
            raise RuntimeError(f"adapterd failed a request: {recorder.errors[0]}")
        first, last = max(recorder.first), max(recorder.last)
        decode_cpu = max(recorder.last_cpu) - max(recorder.first_cpu)
        run = Run(len(rows), sum(recorder.num_tokens), first - start, last - first, end - start, decode_cpu)
        return run, recorder.token_ids

    def time_slot_fills(self, adapters: list[LoadedAdapter]) -> list[float]:
        """Seconds to place each adapter (never placed before) from host memory into a device slot."""

        def fill_all(engine: LLMEngine) -> list[float]:
            seconds = []
            for adapter in adapters:
                start = time.perf_counter()
                engine.adapters.acquire(adapter)
                synchronize(self.device)
                seconds.append(time.perf_counter() - start)
                engine.adapters.release(adapter)
            return seconds

        return self.loop.call(fill_all).result()

    @property
    def num_slot_loads(self) -> int:
        return self.engine.adapters.num_loads

    @property
    def num_slot_evictions(self) -> int:
        return self.engine.adapters.num_evictions


def copies(adapters: list[LoadedAdapter], count: int, prefix: str) -> list[LoadedAdapter]:
    """`count` distinct adapters for the engine, reusing the host tensors of `adapters` in turn.

    Slots are keyed by the `LoadedAdapter` object, so each copy takes its own slot and is copied into it
    like any other adapter; only host memory (and disk) is saved.
    """
    return [replace(adapters[i % len(adapters)], adapter_id=f"{prefix}-{i}") for i in range(count)]
