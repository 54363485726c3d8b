"""The per-step input of the model: token ids, positions, KV-cache addresses and adapter slots.

The engine builds one `ForwardBatch` per step. Rows are sequences, padded to the longest row of the step.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch


@dataclass(frozen=True)
class LoraBatch:
    """Which LoRA slot each row uses, decided once per step."""

    slots: torch.Tensor  # [B] long; device slot of each row's LoRA adapter, -1 for none
    rank: int  # largest rank among the rows' adapters, 0 when no row has a LoRA
    shared_slot: int | None = None  # the slot of every row, when all rows use the same adapter
    # What the LoRA op derives from `slots` once per forward and reuses in every layer (cleared by the model).
    cache: dict[Any, Any] = field(default_factory=dict, compare=False, repr=False)

    def per_input(
        self, key: Any, x: torch.Tensor, make: Callable[[], torch.Tensor]
    ) -> tuple[torch.Tensor, bool]:
        """What `make()` gives for the input x, kept under `key` until another input comes (the linears that
        read one x, such as q/k/v, share it): the tensor, and whether this call made it."""
        cached = self.cache.get(key)
        if cached is not None and cached[0] is x:
            return cached[1], False
        made = make()
        self.cache[key] = (x, made)
        return made, True


@dataclass
class ForwardBatch:
    input_ids: torch.Tensor  # [B, T] long; padding rows/columns hold 0
    positions: torch.Tensor  # [B, T] long; position of each new token (soft-prompt rows count from 0)
    write_index: torch.Tensor  # [N] long; flat KV-cache slot of each real new token, row-major
    real_tokens: torch.Tensor | None  # [N] long; their indices in the flattened [B*T]; None when all are real
    read_slots: torch.Tensor  # [B, L] long; flat KV-cache slots of every key the row sees (prefix + new)
    attn_mask: torch.Tensor  # [B, 1, T, L] bool; True where query t may attend to key l
    last_index: torch.Tensor  # [B] long; column of each row's last real token (its logits are sampled)
    lora: LoraBatch
    prompt_slots: torch.Tensor  # [B] long; soft-prompt slot of each row, -1 for none
    prompt_lengths: torch.Tensor  # [B] long; virtual tokens of each row's soft prompt, 0 for none
    has_soft_prompts: bool  # whether any row has a soft prompt (known on the host, so no sync to ask)

    def tensors(self) -> dict[str, torch.Tensor]:
        """Every tensor of the batch by field name, the LoRA slots as "lora.slots"."""
        found = {name: value for name, value in vars(self).items() if isinstance(value, torch.Tensor)}
        return {**found, "lora.slots": self.lora.slots}

    def to(self, device: torch.device) -> ForwardBatch:
        """This batch on `device`: host tensors go through pinned memory, copied without blocking."""
        if device.type == "cpu":
            return self
        moved: dict[str, Any] = {
            name: _pinned(tensor, device).to(device, non_blocking=True)
            for name, tensor in self.tensors().items()
        }
        lora = dataclasses.replace(self.lora, slots=moved.pop("lora.slots"), cache={})
        return dataclasses.replace(self, lora=lora, **moved)

    def copy_(self, host: ForwardBatch) -> None:
        """Copy a host batch of the same shapes into this batch's tensors in place (a CUDA graph's static
        inputs), without blocking."""
        sources = host.tensors()
        for name, target in self.tensors().items():
            target.copy_(_pinned(sources[name], target.device), non_blocking=True)


def _pinned(tensor: torch.Tensor, device: torch.device) -> torch.Tensor:
    """A host tensor to copy to `device`: page-locked for a GPU, so the copy need not block."""
    return tensor.pin_memory() if device.type == "cuda" else tensor
