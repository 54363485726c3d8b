"""Fixed device slots for adapters: LoRA stacks and the soft-prompt pool, LRU over unpinned slots.

An adapter is copied into a slot when a sequence that needs it is admitted, stays while any sequence uses
it (pinned), and is evicted least-recently-used when a new one needs the room. Slots are keyed by the
`LoadedAdapter` object itself, so a replaced adapter id never aliases the version running sequences use.
"""

from __future__ import annotations

import itertools
import uuid
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import torch

from adapterd.adapters.format import AdapterSpec
from adapterd.server.model.llama import SHARED_INPUT_GROUPS
from adapterd.server.model.lora import LoraKernels, choose_kernels

if TYPE_CHECKING:
    from adapterd.adapters.io import LoraWeights
    from adapterd.server.config import EngineConfig
    from adapterd.server.model.llama import LlamaModel

_versions = itertools.count(1)


@dataclass(eq=False)
class LoadedAdapter:
    """An adapter read from disk into host memory, ready to be placed into a device slot."""

    adapter_id: str
    spec: AdapterSpec
    lora: LoraWeights | None = None
    prompt: torch.Tensor | None = None  # [V, hidden]
    version: int = field(default_factory=lambda: next(_versions))  # the store's version when it has one
    # What its weights are: the store's sha256 of the files, else unique to this load. Prefix-cache keys
    # start from it (a store version number starts again at 1 after a delete).
    digest: str = field(default_factory=lambda: uuid.uuid4().hex)

    @property
    def is_lora(self) -> bool:
        return self.lora is not None

    @property
    def num_virtual_tokens(self) -> int:
        return 0 if self.prompt is None else self.prompt.shape[0]

    @property
    def rank(self) -> int:
        return self.spec.rank if self.is_lora else 0


class SlotPool:
    """`num_slots` slots; resident adapters in LRU order; pinned ones (in use) are never evicted."""

    def __init__(self, num_slots: int) -> None:
        self.free = list(range(num_slots - 1, -1, -1))
        self.resident: OrderedDict[LoadedAdapter, int] = OrderedDict()
        self.pins: dict[LoadedAdapter, int] = {}
        self.num_loads = 0
        self.num_evictions = 0

    def can_acquire(self, adapter: LoadedAdapter) -> bool:
        return adapter in self.resident or bool(self.free) or self._victim() is not None

    def acquire(self, adapter: LoadedAdapter) -> tuple[int, bool]:
        """Pin `adapter` and return (its slot, whether the slot must be filled)."""
        self.pins[adapter] = self.pins.get(adapter, 0) + 1
        if adapter in self.resident:
            self.resident.move_to_end(adapter)
            return self.resident[adapter], False
        if not self.free:
            victim = self._victim()
            assert victim is not None, "acquire() without can_acquire()"
            self.free.append(self.resident.pop(victim))
            self.num_evictions += 1
        slot = self.free.pop()
        self.resident[adapter] = slot
        self.num_loads += 1
        return slot, True

    def release(self, adapter: LoadedAdapter) -> None:
        self.pins[adapter] -= 1
        if self.pins[adapter] == 0:
            del self.pins[adapter]

    def slot_of(self, adapter: LoadedAdapter) -> int:
        return self.resident[adapter]

    def _victim(self) -> LoadedAdapter | None:
        return next((a for a in self.resident if a not in self.pins), None)


class AdapterSlots:
    """Owns the device copies of adapters; only the engine thread calls it."""

    def __init__(self, model: LlamaModel, config: EngineConfig, dtype: torch.dtype, device: torch.device):
        self.model = model
        self.max_rank = config.max_rank
        self.lora = SlotPool(config.max_gpu_adapters)
        self.prompts = SlotPool(config.max_soft_prompts)
        kernels = choose_kernels(config.lora_kernel, device, dtype)  # once for the model
        self.lora_storage = LoraSlotStorage(
            model, config.max_gpu_adapters, config.max_rank, dtype, device, kernels
        )
        hidden = model.config.hidden_size
        model.soft_prompts = torch.zeros(
            config.max_soft_prompts, config.max_virtual_tokens, hidden, dtype=dtype, device=device
        )

    def pool_of(self, adapter: LoadedAdapter) -> SlotPool:
        return self.lora if adapter.is_lora else self.prompts

    def can_place(self, adapter: LoadedAdapter | None) -> bool:
        return adapter is None or self.pool_of(adapter).can_acquire(adapter)

    def acquire(self, adapter: LoadedAdapter | None) -> None:
        if adapter is None:
            return
        slot, needs_fill = self.pool_of(adapter).acquire(adapter)
        if needs_fill:
            self._fill(adapter, slot)

    def release(self, adapter: LoadedAdapter | None) -> None:
        if adapter is not None:
            self.pool_of(adapter).release(adapter)

    def slot_of(self, adapter: LoadedAdapter | None) -> int:
        return -1 if adapter is None else self.pool_of(adapter).slot_of(adapter)

    def resident(self) -> set[tuple[str, int]]:
        """(id, version) of every adapter in a device slot."""
        return {(a.adapter_id, a.version) for pool in (self.lora, self.prompts) for a in pool.resident}

    def _fill(self, adapter: LoadedAdapter, slot: int) -> None:
        if adapter.prompt is not None:
            assert self.model.soft_prompts is not None
            self.model.soft_prompts[slot].zero_()
            self.model.soft_prompts[slot, : adapter.prompt.shape[0]].copy_(adapter.prompt)
            return
        assert adapter.lora is not None
        self.lora_storage.fill(slot, adapter.lora)


class LoraSlotStorage:
    """Per linear layer, its A and B stacks: `[slots, in, R]` and `[slots, R, out]` (the layout every LoRA op
    reads: `lora.py`, `triton_lora.py`), so an adapter of rank r fills the first r columns of its A slot and
    the first r rows of its B slot. The A stacks of linears that read one input (q/k/v, gate/up) are column
    blocks of one contiguous `[slots, in, n*R]` tensor, so the CPU shrinks them in one pass. Filling a slot
    is one batched zeroing, one copy of the adapter's packed host buffer (laid out the same way) to the
    device, and one batched device-side copy into place."""

    def __init__(
        self,
        model: LlamaModel,
        num_slots: int,
        max_rank: int,
        dtype: torch.dtype,
        device: torch.device,
        kernels: LoraKernels,
    ) -> None:
        self.stacks: dict[tuple[int, str], tuple[torch.Tensor, torch.Tensor]] = {}  # (layer, module) -> A, B
        self.contiguous: list[torch.Tensor] = []  # every A group stack and B stack, for zeroing slots
        largest = 0
        for layer_index, layer in enumerate(model.lora_linears()):
            for group in SHARED_INPUT_GROUPS:
                in_features = layer[group[0]].in_features
                a_stack = torch.zeros(
                    num_slots, in_features, len(group) * max_rank, dtype=dtype, device=device
                )
                for position, name in enumerate(group):
                    linear = layer[name]
                    first = position * max_rank
                    a = a_stack[:, :, first : first + max_rank]
                    b = torch.zeros(num_slots, max_rank, linear.out_features, dtype=dtype, device=device)
                    self.stacks[(layer_index, name)] = (a, b)
                    linear.use_slots(a, b, a_stack, first, kernels)
                    largest += a[0].numel() + b[0].numel()
                    self.contiguous.append(b)
                self.contiguous.append(a_stack)
        self.staging = torch.empty(largest, dtype=dtype, device=device) if device.type == "cuda" else None

    def fill(self, slot: int, weights: LoraWeights) -> None:
        torch._foreach_zero_([stack[slot] for stack in self.contiguous])
        source = weights.flat
        if self.staging is not None:  # one host-to-device copy, from page-locked memory when it is
            source = self.staging[: source.numel()]
            source.copy_(weights.flat, non_blocking=True)
        targets, parts = [], []
        for key, a_offset, b_offset in weights.entries:
            (rank, in_features), out_features = weights.a[key].shape, weights.b[key].shape[0]
            a, b = self.stacks[key]
            targets += [a[slot, :, :rank], b[slot, :rank]]
            parts += [
                source[a_offset : a_offset + in_features * rank].view(in_features, rank),
                source[b_offset : b_offset + rank * out_features].view(rank, out_features),
            ]
        torch._foreach_copy_(targets, parts)
