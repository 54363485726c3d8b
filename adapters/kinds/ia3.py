"""IA³ (Liu et al. 2022): learned vectors that rescale activations. PEFT's IA3 scales the output of each
targeted linear (keys and values by default) and the input of those also named in `feedforward_modules`
(the MLP's down projection, i.e. its intermediate activations). Hook point "linear", scales only: per row
`y = base(x * s_in) * s_out`, the vectors of rows without IA³ being ones."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

from .base import AdapterKind, LinearWeights, Tensors
from .common import (
    WEIGHTS_FILE,
    AdapterProblem,
    AdapterSpec,
    BaseModelInfo,
    check_values,
    fits,
    problem,
)
from .targets import check_module_key, check_target_modules, module_tensors, targets_module

PARAM = "ia3_l"


def check(
    config: Mapping[str, Any], tensors: Tensors | None, base: BaseModelInfo, max_rank: int
) -> list[AdapterProblem]:
    problems = check_target_modules(config.get("target_modules"), base)
    problems += check_target_modules(config.get("feedforward_modules"), base, "feedforward_modules")
    if tensors is None:
        return problems
    grouped, unknown = module_tensors(tensors, (PARAM,), "ia3_l vectors of decoder linear layers")
    problems += check_values(tensors) + unknown
    if not grouped[PARAM]:
        problems.append(problem(WEIGHTS_FILE, "holds no IA3 vectors"))
    feedforward = config.get("feedforward_modules")
    for (layer, module), (key, tensor) in grouped[PARAM].items():
        found = check_module_key(key, layer, module, base)
        problems += found
        if found:
            continue
        in_features, out_features = base.linear_shapes[module]
        is_input = targets_module(feedforward, layer, module)
        expected, layout = (
            ((1, in_features), "[1, in_features]") if is_input else ((out_features, 1), "[out_features, 1]")
        )
        if not fits(tuple(tensor.shape), expected):
            role = "a feedforward module scales its input" if is_input else "it scales the output"
            message = (
                f"has shape {list(tensor.shape)}, expected {list(expected)} ({layout} of {module}: {role})"
            )
            problems.append(problem(key, message))
    return problems


def _spec(root: Path, config: Mapping[str, Any], tensors: Tensors) -> AdapterSpec:
    grouped, _ = module_tensors(tensors, (PARAM,), "")
    return AdapterSpec(
        kind="ia3",
        path=root,
        rank=0,
        alpha=1.0,
        use_rslora=False,
        target_modules=tuple(sorted({module for _, module in grouped[PARAM]})),
        num_virtual_tokens=0,
        base_model_name_or_path=config.get("base_model_name_or_path"),
        config=config,
    )


def _host_weights(
    spec: AdapterSpec, tensors: Tensors, base: BaseModelInfo, dtype: torch.dtype, pin_memory: bool
) -> LinearWeights:
    grouped, _ = module_tensors(tensors, (PARAM,), "")
    weights = LinearWeights()
    feedforward = spec.config.get("feedforward_modules")
    for (layer, module), (_, tensor) in grouped[PARAM].items():
        scales = weights.in_scales if targets_module(feedforward, layer, module) else weights.out_scales
        scales[(layer, module)] = tensor.flatten().to(dtype)
    return weights


KIND = AdapterKind(
    name="ia3", peft_type="IA3", hook="linear", check=check, spec=_spec, host_weights=_host_weights
)
