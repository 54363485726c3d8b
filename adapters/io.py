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
    """One adapter's LoRA, packed: every transposed A [in, r] and scaled, transposed B [r, out] lie one after
    the other in `flat`, in the layout of the device slots (engine/adapter_slots.py), so the whole adapter
    moves to a slot in one copy. `a` and `b` are views into it."""

    spec: AdapterSpec
    flat: torch.Tensor  # 1-D: for each entry, A^T then B^T
    entries: list[tuple[tuple[int, str], int, int]]  # ((layer, module), offset of A^T, offset of B^T) in flat
    a: dict[tuple[int, str], torch.Tensor]  # (layer, module) -> lora_A [r, in_features]
    b: dict[tuple[int, str], torch.Tensor]  # (layer, module) -> lora_B * scaling [out_features, r]


def load_lora_weights(spec: AdapterSpec, dtype: torch.dtype = torch.float32) -> LoraWeights:
    return lora_weights(spec, load_file(spec.path / WEIGHTS_FILE), dtype)


def lora_weights(
    spec: AdapterSpec, tensors: dict[str, torch.Tensor], dtype: torch.dtype, pin_memory: bool = False
) -> LoraWeights:
    """The LoRA of `tensors` (the adapter file's, as `read_adapter_tensors` answers them), packed into one
    buffer (in page-locked memory with `pin_memory`, so copies to a GPU run at full speed)."""
    if spec.kind != "lora":
        raise ValueError(f"adapter at {spec.path} is {spec.kind}, not lora")
    pairs: dict[tuple[int, str], dict[str, torch.Tensor]] = {}
    for name, tensor in tensors.items():
        parsed = parse_lora_key(name)
        if parsed is None:
            raise ValueError(f"{name}: unrecognised tensor; validate the adapter with read_adapter first")
        layer, module, matrix = parsed
        pairs.setdefault((layer, module), {})[matrix] = tensor
    keys = sorted(pairs)
    total = sum(pairs[k]["A"].numel() + pairs[k]["B"].numel() for k in keys)
    flat = torch.empty(total, dtype=dtype, pin_memory=pin_memory)
    weights = LoraWeights(spec=spec, flat=flat, entries=[], a={}, b={})
    offset = 0
    for key in keys:
        lora_a, lora_b = pairs[key]["A"], pairs[key]["B"]  # [r, in], [out, r]
        (rank, in_features), out_features = lora_a.shape, lora_b.shape[0]
        a_t = flat[offset : offset + rank * in_features].view(in_features, rank)
        b_t = flat[offset + a_t.numel() : offset + a_t.numel() + rank * out_features].view(rank, out_features)
        a_t.copy_(lora_a.t())
        b_t.copy_(_scaled(lora_b, spec.scaling).t())
        weights.entries.append((key, offset, offset + a_t.numel()))
        weights.a[key], weights.b[key] = a_t.t(), b_t.t()
        offset += a_t.numel() + b_t.numel()
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
