"""DoRA (Liu et al. 2024), PEFT's LoRA with `use_dora`: y = m * (W x + s B A x) / ||W + s B A||, the norm
taken per output over each row of the weight. The norms depend on the adapter only, so the engine computes
them once, when the adapter first takes a slot (from the base weights as served: dequantized NF4/int8, as
PEFT does), into one per-output scale g = m / ||W + s B A||; serving is then LoRA plus `y *= g` per row."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch

from . import lora
from .base import AdapterKind, LinearWeights, Tensors
from .common import AdapterProblem, AdapterSpec, BaseModelInfo, fits, problem
from .targets import module_tensors

MAGNITUDE = "lora_magnitude_vector"


def check(
    config: Mapping[str, Any], tensors: Tensors | None, base: BaseModelInfo, max_rank: int
) -> list[AdapterProblem]:
    problems, pairs = lora.check_with(config, tensors, base, max_rank, (*lora.PAIR_PARAMS, MAGNITUDE))
    if tensors is None:
        return problems
    grouped, _ = module_tensors(tensors, (MAGNITUDE,), "")
    magnitudes = grouped[MAGNITUDE]
    for module_key in sorted(pairs - magnitudes.keys()):
        layer, module = module_key
        message = f"layer {layer} {module} has LoRA weights but no DoRA magnitude vector"
        problems.append(problem(MAGNITUDE, message))
    for (layer, module), (key, tensor) in magnitudes.items():
        if (layer, module) not in pairs:
            problems.append(problem(key, "has no matching lora_A/lora_B tensors"))
        elif module in base.linear_shapes:
            out_features = base.linear_shapes[module][1]
            if not fits(tuple(tensor.shape), (out_features,)):
                message = (
                    f"has shape {list(tensor.shape)}, expected [{out_features}] (out_features of {module})"
                )
                problems.append(problem(key, message))
    return problems


def _host_weights(
    spec: AdapterSpec, tensors: Tensors, base: BaseModelInfo, dtype: torch.dtype, pin_memory: bool
) -> LinearWeights:
    grouped, _ = module_tensors(tensors, (MAGNITUDE,), "")
    magnitudes = {key: tensor.to(torch.float32) for key, (_, tensor) in grouped[MAGNITUDE].items()}
    return LinearWeights(lora=lora.lora_weights(spec, tensors, dtype, pin_memory), magnitudes=magnitudes)


KIND = AdapterKind(
    name="dora",
    peft_type="LORA",
    hook="linear",
    check=check,
    spec=lambda root, config, tensors: lora.spec_of("dora", root, config, tensors),
    host_weights=_host_weights,
    selects=lambda config: bool(config.get("use_dora")),
)
