"""Prompt tuning (Lester et al. 2021): `num_virtual_tokens` learned embeddings in front of the prompt, at
positions 0..V-1 as in PEFT. Hook point "input_embeddings"."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

from .base import AdapterKind, PromptWeights, Tensors
from .common import (
    PROMPT_KEY,
    AdapterProblem,
    AdapterSpec,
    BaseModelInfo,
    KindName,
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
    token_dim = config.get("token_dim")
    if token_dim is not None and token_dim != base.hidden_size:
        message = f"{token_dim} does not match the hidden size {base.hidden_size} of base model {base.name}"
        problems.append(problem("token_dim", message))
    if tensors is not None:
        problems += check_only_prompt_tensor(
            tensors, (num_tokens, base.hidden_size), "num_virtual_tokens, hidden"
        )
    return problems


def spec_of(kind: KindName, root: Path, config: Mapping[str, Any]) -> AdapterSpec:
    """The spec of a validated adapter whose only setting is `num_virtual_tokens` (the prompt kinds)."""
    return AdapterSpec(
        kind=kind,
        path=root,
        rank=0,
        alpha=1.0,
        use_rslora=False,
        target_modules=(),
        num_virtual_tokens=config["num_virtual_tokens"],
        base_model_name_or_path=config.get("base_model_name_or_path"),
        config=config,
    )


def embeddings_of(spec: AdapterSpec, tensors: Mapping[str, torch.Tensor], dtype: torch.dtype) -> torch.Tensor:
    """The soft prompt of `tensors`: [num_virtual_tokens, hidden]."""
    embeddings = tensors[PROMPT_KEY]
    if embeddings.shape[0] != spec.num_virtual_tokens:
        raise ValueError(f"{PROMPT_KEY}: expected {spec.num_virtual_tokens} rows, got {embeddings.shape[0]}")
    return embeddings.to(dtype)


def host_weights(
    spec: AdapterSpec, tensors: Tensors, base: BaseModelInfo, dtype: torch.dtype, pin_memory: bool
) -> PromptWeights:
    return PromptWeights(embeddings_of(spec, tensors, dtype))


KIND = AdapterKind(
    name="prompt_tuning",
    peft_type="PROMPT_TUNING",
    hook="input_embeddings",
    check=check,
    spec=lambda root, config, tensors: spec_of("prompt_tuning", root, config),
    host_weights=host_weights,
)
