"""The interface every adapter kind implements, and the host-memory weights each hook point takes.

A kind is one PEFT method. It says how to validate a PEFT directory of its type, what its `AdapterSpec`
records, and how its tensors load into host memory as the weights of one of three hook points, the places
the model applies an adapter per row:
- "linear": every decoder linear, y = (base(x * s_in) + x * s_in @ A @ B) * s_out per row (LoRA, DoRA, IA³);
- "input_embeddings": virtual-token embeddings in front of the prompt (prompt tuning, P-tuning);
- "kv_prefix": per-layer keys and values in front of the prompt, in the paged KV cache (prefix tuning).
The engine gives each hook point its own device slots (engine/adapter_slots.py) and never asks which kind
an adapter is.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import torch

from .common import AdapterProblem, AdapterSpec, BaseModelInfo, KindName
from .targets import ModuleKey

if TYPE_CHECKING:
    from .lora import LoraWeights

Hook = Literal["linear", "input_embeddings", "kv_prefix"]
Tensors = dict[str, torch.Tensor]


@dataclass
class LinearWeights:
    """What a "linear" kind adds to the decoder linears, per (layer, module)."""

    lora: LoraWeights | None = None  # A and scaled B, packed for the slots
    magnitudes: dict[ModuleKey, torch.Tensor] = field(default_factory=dict)  # DoRA's m [out]
    out_scales: dict[ModuleKey, torch.Tensor] = field(default_factory=dict)  # [out], multiplies the output
    in_scales: dict[ModuleKey, torch.Tensor] = field(default_factory=dict)  # [in], multiplies the input

    @property
    def rank(self) -> int:
        return 0 if self.lora is None else self.lora.spec.rank

    @property
    def has_scales(self) -> bool:
        return bool(self.magnitudes or self.out_scales or self.in_scales)


@dataclass
class PromptWeights:
    """Virtual-token embeddings: [num_virtual_tokens, hidden]."""

    embeddings: torch.Tensor


@dataclass
class PrefixWeights:
    """Per-layer key and value prefixes, as the attention's cache holds them: [layers, V, kv_heads, head_dim]
    each (keys unrotated, as PEFT passes them in `past_key_values`)."""

    keys: torch.Tensor
    values: torch.Tensor

    @property
    def num_virtual_tokens(self) -> int:
        return self.keys.shape[1]


HostWeights = LinearWeights | PromptWeights | PrefixWeights
Check = Callable[[Mapping[str, Any], Tensors | None, BaseModelInfo, int], list[AdapterProblem]]


@dataclass(frozen=True)
class AdapterKind:
    name: KindName  # the adapter's `type` in the API
    peft_type: str  # adapter_config.json's peft_type
    hook: Hook
    check: Check  # problems of (config, tensors or None when unreadable, base, max_rank)
    spec: Callable[[Path, Mapping[str, Any], Tensors], AdapterSpec]  # of a valid adapter
    host_weights: Callable[[AdapterSpec, Tensors, BaseModelInfo, torch.dtype, bool], HostWeights]
    selects: Callable[[Mapping[str, Any]], bool] = lambda config: True  # among kinds of one peft_type
