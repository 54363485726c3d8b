"""Load the tensors of an adapter that `read_adapter` has validated.

LoRA comes back per (layer, module) with the adapter's scale folded into B once, so the engine computes
`x @ A.T @ B.T` with no per-token scaling. Soft prompts come back as one [num_virtual_tokens, hidden] matrix.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from safetensors import safe_open
from safetensors.torch import load_file

from .format import PROMPT_KEY, WEIGHTS_FILE, AdapterSpec, parse_lora_key


@dataclass
class LoraWeights:
    spec: AdapterSpec
    a: dict[tuple[int, str], torch.Tensor]  # (layer, module) -> lora_A [r, in_features]
    b: dict[tuple[int, str], torch.Tensor]  # (layer, module) -> lora_B * scaling [out_features, r]


def load_lora_weights(spec: AdapterSpec, dtype: torch.dtype = torch.float32) -> LoraWeights:
    return lora_weights(spec, load_file(spec.path / WEIGHTS_FILE), dtype)


def lora_weights(spec: AdapterSpec, tensors: dict[str, torch.Tensor], dtype: torch.dtype) -> LoraWeights:
    """The LoRA of `tensors` (the adapter file's, as `read_adapter_tensors` answers them)."""
    if spec.kind != "lora":
        raise ValueError(f"adapter at {spec.path} is {spec.kind}, not lora")
    weights = LoraWeights(spec=spec, a={}, b={})
    for key, tensor in tensors.items():
        parsed = parse_lora_key(key)
        if parsed is None:
            raise ValueError(f"{key}: unrecognised tensor; validate the adapter with read_adapter first")
        layer, module, matrix = parsed
        if matrix == "A":
            weights.a[(layer, module)] = tensor.to(dtype)
        else:
            weights.b[(layer, module)] = _scaled(tensor, spec.scaling).to(dtype)
    return weights


def _scaled(tensor: torch.Tensor, scaling: float) -> torch.Tensor:
    # Scale in at least float32 so a half-precision B is rounded once, after scaling.
    return tensor.to(torch.promote_types(tensor.dtype, torch.float32)) * scaling


def load_prompt_embeddings(spec: AdapterSpec, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    if spec.kind != "prompt_tuning":
        raise ValueError(f"adapter at {spec.path} is {spec.kind}, not prompt_tuning")
    with safe_open(spec.path / WEIGHTS_FILE, framework="pt") as weights:
        return prompt_embeddings(spec, {PROMPT_KEY: weights.get_tensor(PROMPT_KEY)}, dtype)


def prompt_embeddings(
    spec: AdapterSpec, tensors: dict[str, torch.Tensor], dtype: torch.dtype
) -> torch.Tensor:
    """The soft prompt of `tensors`: [num_virtual_tokens, hidden]."""
    if spec.kind != "prompt_tuning":
        raise ValueError(f"adapter at {spec.path} is {spec.kind}, not prompt_tuning")
    embeddings = tensors[PROMPT_KEY]
    if embeddings.shape[0] != spec.num_virtual_tokens:
        raise ValueError(f"{PROMPT_KEY}: expected {spec.num_virtual_tokens} rows, got {embeddings.shape[0]}")
    return embeddings.to(dtype)
