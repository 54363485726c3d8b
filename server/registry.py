"""Adapters in host memory by id. Replacing an id leaves running sequences on the version they hold."""

from __future__ import annotations

import threading
from pathlib import Path

import torch

from adapterd.adapters.format import AdapterValidationError, BaseModelInfo, read_adapter, validate_adapter_id
from adapterd.adapters.io import load_lora_weights, load_prompt_embeddings
from adapterd.server.engine.adapter_slots import LoadedAdapter
from adapterd.server.errors import AdapterNotFound, InvalidAdapter


def load_adapter(
    adapter_id: str, path: Path, base: BaseModelInfo, max_rank: int, dtype: torch.dtype
) -> LoadedAdapter:
    """Validate a PEFT directory and read its tensors into host memory (off the engine thread)."""
    try:
        spec = read_adapter(path, base, max_rank)
    except AdapterValidationError as exc:
        raise InvalidAdapter(str(exc)) from exc
    if spec.kind == "lora":
        return LoadedAdapter(adapter_id, spec, lora=load_lora_weights(spec, dtype))
    return LoadedAdapter(adapter_id, spec, prompt=load_prompt_embeddings(spec, dtype))


class AdapterRegistry:
    def __init__(self, base: BaseModelInfo, max_rank: int, dtype: torch.dtype) -> None:
        self.base = base
        self.max_rank = max_rank
        self.dtype = dtype
        self._adapters: dict[str, LoadedAdapter] = {}
        self._lock = threading.Lock()

    def add(self, adapter_id: str, path: str | Path) -> LoadedAdapter:
        try:
            validate_adapter_id(adapter_id)
        except ValueError as exc:
            raise InvalidAdapter(str(exc)) from exc
        loaded = load_adapter(adapter_id, Path(path), self.base, self.max_rank, self.dtype)
        with self._lock:
            self._adapters[adapter_id] = loaded
        return loaded

    def remove(self, adapter_id: str) -> None:
        with self._lock:
            if self._adapters.pop(adapter_id, None) is None:
                raise AdapterNotFound(f"adapter {adapter_id!r} is not registered")

    def resolve(self, adapter_id: str | None) -> LoadedAdapter | None:
        """None, "" or the base model's name mean the base model."""
        if not adapter_id or adapter_id == self.base.name:
            return None
        with self._lock:
            loaded = self._adapters.get(adapter_id)
        if loaded is None:
            raise AdapterNotFound(f"adapter {adapter_id!r} is not registered")
        return loaded

    def ids(self) -> list[str]:
        with self._lock:
            return sorted(self._adapters)
