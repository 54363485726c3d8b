"""Fixed device slots for adapters, one pool per hook point (adapters/kinds/base.py), LRU over unpinned slots.

- "linear" (LoRA, DoRA, IA³; `max_gpu_adapters` slots): per decoder linear, the LoRA A and B stacks and
  the per-row input and output scale vectors (`LinearSlotStorage`);
- "input_embeddings" (prompt tuning, P-tuning; `max_soft_prompts` slots): the soft-prompt pool;
- "kv_prefix" (prefix tuning; `max_soft_prompts` slots): per-layer key and value prefixes, which the
  attention writes into a sequence's first KV-cache slots (the prefix cache then shares those blocks).
An adapter is copied into a slot when a sequence that needs it is admitted, stays while any sequence uses
it (pinned), and is evicted least-recently-used when a new one needs the room. Slots are keyed by the
`LoadedAdapter` object itself, so a replaced adapter id never aliases the version running sequences use.
"""

from __future__ import annotations

import itertools
import uuid
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Protocol

import torch

from adapterd.adapters.kinds import (
    KINDS,
    AdapterKind,
    Hook,
    HostWeights,
    LinearWeights,
    PrefixWeights,
    PromptWeights,
)
from adapterd.adapters.kinds.common import AdapterSpec
from adapterd.server.model.dense import dense_weight
from adapterd.server.model.llama import SHARED_INPUT_GROUPS, head_dim_of
from adapterd.server.model.lora import LoraKernels, choose_kernels

if TYPE_CHECKING:
    from adapterd.adapters.kinds.lora import LoraWeights
    from adapterd.server.common.config import EngineConfig
    from adapterd.server.model.llama import LlamaModel

_versions = itertools.count(1)


@dataclass(eq=False)
class LoadedAdapter:
    """An adapter read from disk into host memory, ready to be placed into a device slot."""

    adapter_id: str
    spec: AdapterSpec
    weights: HostWeights = field(default_factory=LinearWeights)
    version: int = field(default_factory=lambda: next(_versions))  # the store's version when it has one
    # What its weights are: the store's sha256 of the files, else unique to this load. Prefix-cache keys
    # start from it (a store version number starts again at 1 after a delete).
    digest: str = field(default_factory=lambda: uuid.uuid4().hex)

    @property
    def kind(self) -> AdapterKind:
        return KINDS[self.spec.kind]

    @property
    def hook(self) -> Hook:
        return self.kind.hook

    @property
    def lora(self) -> LoraWeights | None:
        return self.weights.lora if isinstance(self.weights, LinearWeights) else None

    @property
    def prompt(self) -> torch.Tensor | None:
        return self.weights.embeddings if isinstance(self.weights, PromptWeights) else None

    @property
    def num_virtual_tokens(self) -> int:
        """Positions in front of the prompt: a soft prompt's rows or a prefix's keys, else 0."""
        if isinstance(self.weights, PromptWeights):
            return self.weights.embeddings.shape[0]
        if isinstance(self.weights, PrefixWeights):
            return self.weights.num_virtual_tokens
        return 0

    @property
    def rank(self) -> int:
        return self.weights.rank if isinstance(self.weights, LinearWeights) else 0

    @property
    def has_scales(self) -> bool:
        return isinstance(self.weights, LinearWeights) and self.weights.has_scales


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


class SlotStorage(Protocol):
    def fill(self, slot: int, adapter: LoadedAdapter) -> None: ...


class AdapterSlots:
    """Owns the device copies of adapters; only the engine thread calls it."""

    def __init__(self, model: LlamaModel, config: EngineConfig, dtype: torch.dtype, device: torch.device):
        self.model = model
        self.max_rank = config.max_rank
        kernels = choose_kernels(config.lora_kernel, device, dtype)  # once for the model
        self.linear = LinearSlotStorage(
            model, config.max_gpu_adapters, config.max_rank, dtype, device, kernels
        )
        self.pools: dict[Hook, SlotPool] = {
            "linear": SlotPool(config.max_gpu_adapters),
            "input_embeddings": SlotPool(config.max_soft_prompts),
            "kv_prefix": SlotPool(config.max_soft_prompts),
        }
        self.storage: dict[Hook, SlotStorage] = {
            "linear": self.linear,
            "input_embeddings": PromptSlotStorage(
                model, config.max_soft_prompts, config.max_virtual_tokens, dtype, device
            ),
            "kv_prefix": PrefixSlotStorage(
                model, config.max_soft_prompts, config.max_virtual_tokens, dtype, device
            ),
        }

    @property
    def num_loads(self) -> int:
        return sum(pool.num_loads for pool in self.pools.values())

    @property
    def num_evictions(self) -> int:
        return sum(pool.num_evictions for pool in self.pools.values())

    @property
    def ones_slot(self) -> int:
        """The scale-stack row of rows without scales (all ones)."""
        return self.linear.ones_slot

    def can_place(self, adapter: LoadedAdapter | None) -> bool:
        return adapter is None or self.pools[adapter.hook].can_acquire(adapter)

    def acquire(self, adapter: LoadedAdapter | None) -> None:
        if adapter is None:
            return
        slot, needs_fill = self.pools[adapter.hook].acquire(adapter)
        if needs_fill:
            self.storage[adapter.hook].fill(slot, adapter)

    def release(self, adapter: LoadedAdapter | None) -> None:
        if adapter is not None:
            self.pools[adapter.hook].release(adapter)

    def slot_of(self, adapter: LoadedAdapter | None, hook: Hook) -> int:
        """`adapter`'s slot in `hook`'s pool, -1 when it has none there (no adapter, or another hook)."""
        if adapter is None or adapter.hook != hook:
            return -1
        return self.pools[hook].slot_of(adapter)

    def resident(self) -> set[tuple[str, int]]:
        """(id, version) of every adapter in a device slot."""
        return {(a.adapter_id, a.version) for pool in self.pools.values() for a in pool.resident}


class PromptSlotStorage:
    """The soft-prompt pool `model.soft_prompts`: [slots, max_virtual_tokens, hidden]."""

    def __init__(
        self, model: LlamaModel, num_slots: int, max_tokens: int, dtype: torch.dtype, device: torch.device
    ):
        hidden = model.config.hidden_size
        self.pool = model.soft_prompts = torch.zeros(
            num_slots, max_tokens, hidden, dtype=dtype, device=device
        )

    def fill(self, slot: int, adapter: LoadedAdapter) -> None:
        assert isinstance(adapter.weights, PromptWeights)
        embeddings = adapter.weights.embeddings
        self.pool[slot].zero_()
        self.pool[slot, : embeddings.shape[0]].copy_(embeddings)


class PrefixSlotStorage:
    """The prefix pool `model.prefix_kv`: keys and values [layers, slots * max_virtual_tokens, kv_heads,
    head_dim], slot s's token t at row s * max_virtual_tokens + t (the attention gathers rows by that index)."""

    def __init__(
        self, model: LlamaModel, num_slots: int, max_tokens: int, dtype: torch.dtype, device: torch.device
    ):
        self.model, self.num_slots, self.max_tokens = model, num_slots, max_tokens
        self.dtype, self.device = dtype, device
        model.prefix_width = max_tokens

    def _pool(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The pool, allocated when the first prefix adapter takes a slot (most servers never host one)."""
        if self.model.prefix_kv is None:
            config = self.model.config
            shape = (
                config.num_hidden_layers,
                self.num_slots * self.max_tokens,
                config.num_key_value_heads,
                head_dim_of(config),
            )
            keys, values = (torch.zeros(shape, dtype=self.dtype, device=self.device) for _ in range(2))
            self.model.prefix_kv = (keys, values)
        return self.model.prefix_kv

    def fill(self, slot: int, adapter: LoadedAdapter) -> None:
        assert isinstance(adapter.weights, PrefixWeights)
        first = slot * self.max_tokens
        for pool, prefix in zip(self._pool(), (adapter.weights.keys, adapter.weights.values), strict=True):
            pool[:, first : first + self.max_tokens].zero_()
            pool[:, first : first + prefix.shape[1]].copy_(prefix)


class LinearSlotStorage:
    """The "linear" hook point's slots: LoRA stacks (`LoraSlotStorage`) and, per linear, input and output
    scale stacks [slots + 1, in] and [slots + 1, out], whose last row (`ones_slot`) stays all ones for the
    rows that scale nothing. A LoRA fills only the LoRA stacks, IA³ only the scales, DoRA both (its output
    scale computed from the base weight at its first fill, then kept with its host weights)."""

    def __init__(
        self,
        model: LlamaModel,
        num_slots: int,
        max_rank: int,
        dtype: torch.dtype,
        device: torch.device,
        kernels: LoraKernels,
    ) -> None:
        self.model = model
        self.lora = LoraSlotStorage(model, num_slots, max_rank, dtype, device, kernels)
        self.ones_slot = num_slots
        self.in_scales: dict[tuple[int, str], torch.Tensor] = {}
        self.out_scales: dict[tuple[int, str], torch.Tensor] = {}
        for layer_index, layer in enumerate(model.lora_linears()):
            for name, linear in layer.items():
                key = (layer_index, name)
                self.in_scales[key] = torch.ones(
                    num_slots + 1, linear.in_features, dtype=dtype, device=device
                )
                self.out_scales[key] = torch.ones(
                    num_slots + 1, linear.out_features, dtype=dtype, device=device
                )
                linear.use_scales(key, self.in_scales[key], self.out_scales[key])

    def fill(self, slot: int, adapter: LoadedAdapter) -> None:
        weights = adapter.weights
        assert isinstance(weights, LinearWeights)
        if weights.lora is not None:
            self.lora.fill(slot, weights.lora)
        if weights.magnitudes and not weights.out_scales:
            weights.out_scales = self.dora_scales(weights)  # once per loaded adapter
        for stacks, vectors in ((self.in_scales, weights.in_scales), (self.out_scales, weights.out_scales)):
            for key, stack in stacks.items():
                row = stack[slot]
                row.copy_(vectors[key]) if key in vectors else row.fill_(1.0)

    def dora_scales(self, weights: LinearWeights) -> dict[tuple[int, str], torch.Tensor]:
        """DoRA's per-output scale m / ||W + s B A|| of each linear (row norms over the input features), from
        the base weight as served, in float32."""
        assert weights.lora is not None
        linears = self.model.lora_linears()
        scales = {}
        for key, magnitude in weights.magnitudes.items():
            layer, module = key
            base = dense_weight(linears[layer][module].base)  # [out, in] float32
            delta = weights.lora.b[key].float() @ weights.lora.a[key].float()  # scaled B @ A
            norm = torch.linalg.norm(base + delta.to(base.device), dim=1)
            scales[key] = (magnitude.to(norm.device) / norm).cpu()
        return scales


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
