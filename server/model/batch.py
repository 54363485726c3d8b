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
    # Scale vectors (DoRA, IA³): each row's row of the linears' scale stacks (their all-ones row for rows
    # without); None when no row scales anything. `scaled_inputs` / `scaled_outputs`: the (layer, module)
    # linears some row scales the input / output of (None: every linear, as a CUDA graph runs them).
    scale_slots: torch.Tensor | None = None
    scaled_inputs: frozenset[tuple[int, str]] | None = None
    scaled_outputs: frozenset[tuple[int, str]] | None = None
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

    def scales(self, key: tuple[int, str], outputs: bool) -> bool:
        """Whether some row scales the output (else the input) of linear `key`."""
        if self.scale_slots is None:
            return False
        linears = self.scaled_outputs if outputs else self.scaled_inputs
        return linears is None or key in linears

    def per_token(self, lengths: torch.Tensor) -> LoraBatch:
        """These rows' slots repeated for each of their `lengths` packed tokens."""
        scale_slots = None if self.scale_slots is None else self.scale_slots.repeat_interleave(lengths)
        return dataclasses.replace(
            self, slots=self.slots.repeat_interleave(lengths), scale_slots=scale_slots, cache={}
        )

    def to(self, device: torch.device) -> LoraBatch:
        scale_slots = None if self.scale_slots is None else self.scale_slots.to(device, non_blocking=True)
        return dataclasses.replace(
            self, slots=self.slots.to(device, non_blocking=True), scale_slots=scale_slots, cache={}
        )


@dataclass(frozen=True)
class PrefixRows:
    """Where prefix-tuning rows write their adapter's keys and values instead of the computed ones: the new
    tokens at virtual positions (indices among the step's real tokens, in KV-write order) and each one's row
    in the prefix pool (`slot * max_virtual_tokens + position`)."""

    tokens: torch.Tensor  # [M] long
    sources: torch.Tensor  # [M] long


@dataclass(frozen=True)
class RaggedRows:
    """A step whose rows differ much in length (a prefill chunk among decode rows): every layer runs on
    the real tokens only, packed row after row as [N, 1, hidden], and attention runs row by row."""

    lengths: list[int]  # new tokens of each row (host)
    contexts: list[int]  # keys each row sees, its prefix and its new tokens (host)
    positions: torch.Tensor  # [N, 1] long; position of each real token, row-major
    lora: LoraBatch  # the LoRA slot of each real token

    @staticmethod
    def worth_it(lengths: list[int]) -> bool:
        """Pack when padding every row to the longest would compute more than twice the real tokens."""
        return len(lengths) > 1 and 2 * sum(lengths) < len(lengths) * max(lengths)


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
    ragged: RaggedRows | None = None  # set when the layers run on packed real tokens
    prefix: PrefixRows | None = None  # set when a prefix-tuning row prefills its virtual positions

    @property
    def token_lora(self) -> LoraBatch:
        """The LoRA slots of the rows the layers see: the batch's rows, or each packed token."""
        return self.ragged.lora if self.ragged is not None else self.lora

    def tensors(self) -> dict[str, torch.Tensor]:
        """Every tensor of the batch by field name, the LoRA slots as "lora.slots"."""
        found = {name: value for name, value in vars(self).items() if isinstance(value, torch.Tensor)}
        found["lora.slots"] = self.lora.slots
        if self.lora.scale_slots is not None:
            found["lora.scale_slots"] = self.lora.scale_slots
        return found

    def to(self, device: torch.device) -> ForwardBatch:
        """This batch on `device`: host tensors go through pinned memory, copied without blocking."""
        if device.type == "cpu":
            return self
        moved: dict[str, Any] = {
            name: _pinned(tensor, device).to(device, non_blocking=True)
            for name, tensor in self.tensors().items()
        }
        scale_slots = moved.pop("lora.scale_slots", None)
        lora = dataclasses.replace(
            self.lora, slots=moved.pop("lora.slots"), scale_slots=scale_slots, cache={}
        )
        ragged = self.ragged
        if ragged is not None:
            ragged = dataclasses.replace(
                ragged, positions=ragged.positions.to(device), lora=ragged.lora.to(device)
            )
        prefix = self.prefix
        if prefix is not None:
            prefix = PrefixRows(prefix.tokens.to(device), prefix.sources.to(device))
        return dataclasses.replace(self, lora=lora, ragged=ragged, prefix=prefix, **moved)

    def copy_(self, host: ForwardBatch) -> None:
        """Copy a host batch of the same shapes into this batch's tensors in place (a CUDA graph's static
        inputs), without blocking."""
        sources = host.tensors()
        for name, target in self.tensors().items():
            target.copy_(_pinned(sources[name], target.device), non_blocking=True)


def _pinned(tensor: torch.Tensor, device: torch.device) -> torch.Tensor:
    """A host tensor to copy to `device`: page-locked for a GPU, so the copy need not block."""
    return tensor.pin_memory() if device.type == "cuda" else tensor
