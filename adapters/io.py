"""Load the tensors of an adapter that `read_adapter` has validated, in its kind's host layout.

LoRA comes back per (layer, module) with the adapter's scale folded into B once, so the engine computes
`x @ A.T @ B.T` with no per-token scaling. Soft prompts come back as one [num_virtual_tokens, hidden] matrix.
`host_weights` loads any kind (adapters/kinds).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator

import torch
from safetensors import safe_open
from safetensors.torch import load_file

from .kinds import KINDS, HostWeights
from .kinds.common import (
    PROMPT_KEY,
    WEIGHTS_FILE,
    AdapterSpec,
    AdapterValidationError,
    BaseModelInfo,
    problem,
)
from .kinds.lora import LoraWeights, lora_weights
from .kinds.prompt_tuning import embeddings_of

__all__ = [
    "LoraWeights",
    "host_weights",
    "load_lora_weights",
    "load_prompt_embeddings",
    "lora_weights",
    "prompt_embeddings",
]


def host_weights(
    spec: AdapterSpec,
    tensors: dict[str, torch.Tensor],
    base: BaseModelInfo,
    dtype: torch.dtype,
    pin_memory: bool = False,
) -> HostWeights:
    """The weights of a validated adapter (`tensors` as `read_adapter_tensors` answers them) in host memory,
    in `dtype`; AdapterValidationError when a value is not finite there (a finite B times a huge lora_alpha
    / r, or values beyond a half-precision range), as such weights would turn every output row into NaN."""
    weights = KINDS[spec.kind].host_weights(spec, tensors, base, dtype, pin_memory)
    if not all(bool(torch.isfinite(tensor).all()) for tensor in _tensors_of(weights)):
        message = (
            f"not finite once loaded in {dtype} (scaled by lora_alpha / r where the kind has one); "
            "lower lora_alpha or the weights' magnitude"
        )
        raise AdapterValidationError([problem(WEIGHTS_FILE, message)])
    return weights


def _tensors_of(value: object) -> Iterator[torch.Tensor]:
    """Every tensor in a HostWeights value (dataclasses, dicts and tensors, nested)."""
    if isinstance(value, torch.Tensor):
        yield value
    elif isinstance(value, dict):
        for item in value.values():
            yield from _tensors_of(item)
    elif dataclasses.is_dataclass(value):
        for item in dataclasses.fields(value):
            yield from _tensors_of(getattr(value, item.name))


def load_lora_weights(spec: AdapterSpec, dtype: torch.dtype = torch.float32) -> LoraWeights:
    return lora_weights(spec, load_file(spec.path / WEIGHTS_FILE), dtype)


def load_prompt_embeddings(spec: AdapterSpec, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    _check_soft_prompt(spec)
    with safe_open(spec.path / WEIGHTS_FILE, framework="pt") as weights:
        return prompt_embeddings(spec, {PROMPT_KEY: weights.get_tensor(PROMPT_KEY)}, dtype)


def prompt_embeddings(
    spec: AdapterSpec, tensors: dict[str, torch.Tensor], dtype: torch.dtype
) -> torch.Tensor:
    """The soft prompt of `tensors`: [num_virtual_tokens, hidden]."""
    _check_soft_prompt(spec)
    return embeddings_of(spec, tensors, dtype)


def _check_soft_prompt(spec: AdapterSpec) -> None:
    if KINDS[spec.kind].hook != "input_embeddings":
        raise ValueError(f"adapter at {spec.path} is {spec.kind}, not a soft prompt")
