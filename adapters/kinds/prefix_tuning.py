"""Prefix tuning (Li & Liang 2021): learned keys and values for `num_virtual_tokens` positions in front of
the prompt, in every layer. PEFT saves them as `prompt_embeddings` [V, layers * 2 * token_dim] (the output
of the reparameterizing MLP when `prefix_projection` was on), token_dim = KV heads x head size; layer i's
keys are entry 2i, its values 2i+1. The prompt's tokens then take positions V.. (the cache holds V tokens),
and the prefix keys are used as given, without rotary embedding. Hook point "kv_prefix": the engine writes
them into the sequence's first KV-cache slots, which the prefix cache then shares between requests."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch

from . import prompt_tuning
from .base import AdapterKind, PrefixWeights, Tensors
from .common import (
    PROMPT_KEY,
    AdapterProblem,
    AdapterSpec,
    BaseModelInfo,
    check_num_virtual_tokens,
    check_one_submodule,
    check_only_prompt_tensor,
    problem,
)


def check(
    config: Mapping[str, Any], tensors: Tensors | None, base: BaseModelInfo, max_rank: int
) -> list[AdapterProblem]:
    num_tokens, problems = check_num_virtual_tokens(config)
    problems += check_one_submodule(config)
    for name, want in (
        ("num_layers", base.num_layers),
        ("token_dim", base.kv_dim),
        ("num_attention_heads", base.num_kv_heads or None),
    ):
        got = config.get(name)
        if got is not None and want is not None and got != want:
            message = f"{got} does not match base model {base.name} ({want}: the prefix is one key and value per KV head)"
            problems.append(problem(name, message))
    if tensors is not None:
        width = base.num_layers * 2 * base.kv_dim
        problems += check_only_prompt_tensor(
            tensors, (num_tokens, width), "num_virtual_tokens, layers x 2 x KV heads x head size"
        )
    return problems


def _host_weights(
    spec: AdapterSpec, tensors: Tensors, base: BaseModelInfo, dtype: torch.dtype, pin_memory: bool
) -> PrefixWeights:
    heads = base.num_kv_heads
    prefix = tensors[PROMPT_KEY].to(dtype)
    # [V, layers * 2 * kv_dim] -> [layers, 2, V, kv_heads, head_dim], as PEFT's get_prompt splits it.
    kv = prefix.view(spec.num_virtual_tokens, base.num_layers, 2, heads, base.kv_dim // heads).permute(
        1, 2, 0, 3, 4
    )
    return PrefixWeights(keys=kv[:, 0].contiguous(), values=kv[:, 1].contiguous())


KIND = AdapterKind(
    name="prefix_tuning",
    peft_type="PREFIX_TUNING",
    hook="kv_prefix",
    check=check,
    spec=lambda root, config, tensors: prompt_tuning.spec_of("prefix_tuning", root, config),
    host_weights=_host_weights,
)
