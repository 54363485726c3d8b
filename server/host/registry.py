"""The adapter registry: the versioned store on disk, then a host-memory LRU of loaded adapters.

Three tiers: disk (`AdapterStore`) -> host memory (here, `max_cpu_adapters`, LRU) -> device slots (the
engine's `AdapterSlots`). Reading and validating an adapter happens here, in the caller's thread, never on
the engine thread. A request holds the `LoadedAdapter` object it resolved, so replacing or deleting an id
changes nothing for requests already running, and dropping an adapter from this LRU frees nothing they use.

The store is the registry's only index: every lookup reads the id's version pointer, so replicas that share
one store directory see each other's uploads, replacements and deletes at once (docs/replicas.md). Host
copies are keyed by version and content digest (a version number starts again at 1 after a delete).
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from pathlib import Path
from typing import Any

import torch

from adapterd.adapters.format import (
    AdapterSpec,
    AdapterValidationError,
    BaseModelInfo,
    InvalidAdapterId,
    read_adapter_tensors,
    validate_adapter_id,
)
from adapterd.adapters.io import host_weights
from adapterd.adapters.kinds import HostWeights
from adapterd.adapters.kinds.common import problem
from adapterd.adapters.store import AdapterRecord, AdapterStore
from adapterd.server.common.config import EngineConfig
from adapterd.server.common.errors import AdapterNotFound, InvalidAdapter
from adapterd.server.engine.adapter_slots import LoadedAdapter

HostKey = tuple[str, int, str]  # (id, version, sha256)


def load_adapter(
    record: AdapterRecord,
    base: BaseModelInfo,
    limits: EngineConfig,
    dtype: torch.dtype,
    pin_memory: bool = False,
) -> LoadedAdapter:
    """Validate a stored PEFT directory again (the store may have been edited) and keep the tensors that
    validation read in host memory (one read of the file), page-locked with `pin_memory` (a GPU engine)."""
    spec, weights = servable(record.path, base, limits, dtype, pin_memory)
    return LoadedAdapter(record.id, spec, weights, version=record.version, digest=record.sha256)


def servable(
    path: Path, base: BaseModelInfo, limits: EngineConfig, dtype: torch.dtype, pin_memory: bool = False
) -> tuple[AdapterSpec, HostWeights]:
    """A PEFT directory as the engine would serve it: valid, within the server's limits (rank, virtual
    tokens) and finite in the serving dtype; else one InvalidAdapter naming every problem. Uploads run it
    too, so an adapter that is accepted can serve."""
    try:
        spec, tensors = read_adapter_tensors(path, base, limits.max_rank)
        if spec.num_virtual_tokens > limits.max_virtual_tokens:
            message = (
                f"{spec.num_virtual_tokens} virtual tokens exceed the server limit "
                f"max_virtual_tokens={limits.max_virtual_tokens}"
            )
            raise AdapterValidationError([problem("num_virtual_tokens", message)])
        return spec, host_weights(spec, tensors, base, dtype, pin_memory)
    except AdapterValidationError as exc:
        raise InvalidAdapter(str(exc)) from exc


def checked_id(adapter_id: str) -> str:
    try:
        return validate_adapter_id(adapter_id)
    except InvalidAdapterId as exc:
        raise InvalidAdapter(str(exc)) from exc


class AdapterRegistry:
    def __init__(
        self,
        store: AdapterStore,
        base: BaseModelInfo,
        limits: EngineConfig,
        dtype: torch.dtype,
        max_cpu_adapters: int,
        pin_memory: bool = False,
    ) -> None:
        self.store = store
        self.base = base
        self.limits = limits
        self.dtype = dtype
        self.max_cpu_adapters = max_cpu_adapters
        self.pin_memory = pin_memory  # host copies in page-locked memory, for fast copies to a GPU
        self._loaded: OrderedDict[HostKey, LoadedAdapter] = OrderedDict()
        self._lock = threading.Lock()
        self._load_locks: dict[HostKey, threading.Lock] = {}
        self.num_loads = 0
        self.num_evictions = 0

    def publish(
        self, adapter_id: str, staged_dir: Path, metadata: dict[str, Any] | None = None
    ) -> tuple[AdapterRecord, bool]:
        """Validate a staged PEFT directory and publish it as the id's new version."""
        checked_id(adapter_id)
        spec, _ = servable(staged_dir, self.base, self.limits, self.dtype)
        return self.store.publish(adapter_id, staged_dir, spec, self.base.name, metadata)

    def add(self, adapter_id: str, path: str | Path) -> AdapterRecord:
        """Publish an adapter directory (copied into the store) and return its record."""
        return self.publish(adapter_id, Path(path))[0]

    def remove(self, adapter_id: str) -> AdapterRecord:
        record = self.record(adapter_id)
        with self._lock:
            for key in [k for k in self._loaded if k[0] == adapter_id]:
                del self._loaded[key]
        if not self.store.delete(adapter_id):  # deleted meanwhile, here or by another replica
            raise AdapterNotFound(f"adapter {adapter_id!r} is not registered")
        return record

    def record(self, adapter_id: str) -> AdapterRecord:
        """The id's current version, as the store has it now (another replica may have just changed it)."""
        try:
            record = self.store.get(adapter_id)
        except InvalidAdapterId:
            record = None
        if record is None:
            raise AdapterNotFound(f"adapter {adapter_id!r} is not registered")
        return record

    def records(self) -> list[AdapterRecord]:
        return self.store.list()

    def is_base(self, adapter_id: str | None) -> bool:
        """None, "" or the base model's name mean the base model."""
        return not adapter_id or adapter_id == self.base.name

    def resolve(self, adapter_id: str | None) -> LoadedAdapter | None:
        """The adapter's current version in host memory, loaded from disk on first use (blocking I/O)."""
        if self.is_base(adapter_id):
            return None
        assert adapter_id is not None
        record = self.record(adapter_id)
        key = (record.id, record.version, record.sha256)
        with self._lock:
            if key in self._loaded:
                self._loaded.move_to_end(key)
                return self._loaded[key]
            load_lock = self._load_locks.setdefault(key, threading.Lock())
        with load_lock:  # one load per version, however many requests ask at once
            with self._lock:
                if key in self._loaded:
                    return self._loaded[key]
            loaded = load_adapter(record, self.base, self.limits, self.dtype, self.pin_memory)
            self._insert(key, loaded)
        return loaded

    def host_resident(self) -> set[tuple[str, int]]:
        """(id, version) of every adapter in host memory."""
        with self._lock:
            return {(adapter_id, version) for adapter_id, version, _ in self._loaded}

    def _insert(self, key: HostKey, loaded: LoadedAdapter) -> None:
        with self._lock:
            self._load_locks.pop(key, None)
            self.num_loads += 1
            self._loaded[key] = loaded
            while len(self._loaded) > self.max_cpu_adapters:
                self._loaded.popitem(last=False)
                self.num_evictions += 1
