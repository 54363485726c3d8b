"""LoRA (Hu et al. 2021): y = W x + s * B A x on the targeted linears, s = alpha / r (alpha / sqrt(r) with
rsLoRA). Hook point "linear": A and B go into the LoRA slot stacks with s folded into B."""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from .base import AdapterKind, LinearWeights, Tensors
from .common import (
    WEIGHTS_FILE,
    AdapterProblem,
    AdapterSpec,
    BaseModelInfo,
    KindName,
    check_values,
    fits,
    is_number,
    is_positive_int,
    lora_scaling,
    problem,
)
from .targets import ModuleKey, check_module_key, check_target_modules, module_tensors

LORA_DEFAULTS = {"r": 8, "lora_alpha": 8, "use_rslora": False, "bias": "none"}
_BASE_MODIFYING_INITS = ("pissa", "olora", "corda", "loftq", "lora_ga")
PAIR_PARAMS = ("lora_A", "lora_B")


def check(
    config: Mapping[str, Any], tensors: Tensors | None, base: BaseModelInfo, max_rank: int
) -> list[AdapterProblem]:
    return check_with(config, tensors, base, max_rank, PAIR_PARAMS)[0]


def check_with(
    config: Mapping[str, Any],
    tensors: Tensors | None,
    base: BaseModelInfo,
    max_rank: int,
    params: tuple[str, ...],
) -> tuple[list[AdapterProblem], set[ModuleKey]]:
    """LoRA's checks, accepting `params` tensors on the linears (DoRA adds its magnitudes): the problems and
    the (layer, module) pairs holding both A and B."""
    settings = {**LORA_DEFAULTS, **config}
    problems = _check_rank(settings["r"], max_rank) + _check_settings(settings)
    problems += check_target_modules(config.get("target_modules"), base)
    if tensors is None:
        return problems, set()
    rank = settings["r"] if is_positive_int(settings["r"]) else None
    grouped, unknown = module_tensors(tensors, params, "lora_A/lora_B weights of decoder linear layers")
    problems += check_values(tensors) + unknown
    for matrix in ("A", "B"):
        for (layer, module), (key, tensor) in grouped[f"lora_{matrix}"].items():
            problems += _check_matrix(key, tuple(tensor.shape), layer, module, matrix, base, rank)
    a_keys, b_keys = grouped["lora_A"], grouped["lora_B"]
    if not a_keys and not b_keys:
        problems.append(problem(WEIGHTS_FILE, "holds no LoRA weights"))
    for _have, lack, keys, others in (("A", "B", a_keys, b_keys), ("B", "A", b_keys, a_keys)):
        for module_key in keys.keys() - others.keys():
            problems.append(
                problem(f"lora_{lack}", f"{keys[module_key][0]} has no matching lora_{lack} tensor")
            )
    problems += _check_scaled(settings, rank, b_keys.values())
    return problems, a_keys.keys() & b_keys.keys()


def _check_scaled(
    settings: Mapping[str, Any], rank: int | None, b_tensors: Iterable[tuple[str, torch.Tensor]]
) -> list[AdapterProblem]:
    """B times PEFT's scaling (lora_alpha / r, or / sqrt(r) with rsLoRA) finite in float32, as the server
    folds it in: a finite but huge lora_alpha would make every output of the adapter NaN."""
    alpha = settings["lora_alpha"]
    if rank is None or not is_number(alpha) or not isinstance(settings["use_rslora"], bool):
        return []
    scaling = lora_scaling(alpha, rank, settings["use_rslora"])
    for key, tensor in b_tensors:
        if not math.isfinite(scaling) or not bool(torch.isfinite(tensor.float() * scaling).all()):
            message = f"lora_alpha={alpha} scales {key} beyond float32's range (lora_alpha / r = {scaling:g})"
            return [problem("lora_alpha", message)]
    return []


def _check_rank(rank: Any, max_rank: int) -> list[AdapterProblem]:
    if not is_positive_int(rank):
        return [problem("r", f"must be a positive integer, got {rank!r}")]
    if rank > max_rank:
        return [problem("r", f"rank {rank} exceeds the server limit max_rank={max_rank}")]
    return []


def _check_settings(settings: Mapping[str, Any]) -> list[AdapterProblem]:
    problems = []
    if not is_number(settings["lora_alpha"]):
        problems.append(problem("lora_alpha", f"must be a finite number, got {settings['lora_alpha']!r}"))
    if not isinstance(settings["use_rslora"], bool):
        problems.append(problem("use_rslora", f"must be true or false, got {settings['use_rslora']!r}"))
    if settings["bias"] != "none":
        problems.append(problem("bias", f"bias={settings['bias']!r} is not supported; only 'none'"))
    init = settings.get("init_lora_weights")
    if isinstance(init, str) and init.startswith(_BASE_MODIFYING_INITS):
        message = f"{init!r} adapters rely on modified base weights, which the server cannot apply"
        problems.append(problem("init_lora_weights", message))
    return problems


def _check_matrix(
    key: str,
    shape: tuple[int, ...],
    layer: int,
    module: str,
    matrix: str,
    base: BaseModelInfo,
    rank: int | None,
) -> list[AdapterProblem]:
    problems = check_module_key(key, layer, module, base)
    if module not in base.linear_shapes:
        return problems
    in_features, out_features = base.linear_shapes[module]
    expected = (rank, in_features) if matrix == "A" else (out_features, rank)
    if not fits(shape, expected):
        dims = ", ".join("r" if dim is None else str(dim) for dim in expected)
        layout = "[r, in_features]" if matrix == "A" else "[out_features, r]"
        message = f"{key} has shape {list(shape)}, expected [{dims}] ({layout} of {module})"
        problems.append(problem(f"lora_{matrix} shape", message))
    return problems


def spec_of(
    kind: KindName, root: Path, config: Mapping[str, Any], tensors: Mapping[str, torch.Tensor]
) -> AdapterSpec:
    settings = {**LORA_DEFAULTS, **config}
    grouped, _ = module_tensors(tensors, (*PAIR_PARAMS, "lora_magnitude_vector"), "")
    return AdapterSpec(
        kind=kind,
        path=root,
        rank=settings["r"],
        alpha=float(settings["lora_alpha"]),
        use_rslora=settings["use_rslora"],
        target_modules=tuple(sorted({module for _, module in grouped["lora_A"]})),
        num_virtual_tokens=0,
        base_model_name_or_path=config.get("base_model_name_or_path"),
        config=config,
    )


@dataclass
class LoraWeights:
    """One adapter's LoRA, packed: every transposed A [in, r] and scaled, transposed B [r, out] lie one after
    the other in `flat`, in the layout of the device slots (engine/adapter_slots.py), so the whole adapter
    moves to a slot in one copy. `a` and `b` are views into it."""

    spec: AdapterSpec
    flat: torch.Tensor  # 1-D: for each entry, A^T then B^T
    entries: list[tuple[ModuleKey, int, int]]  # ((layer, module), offset of A^T, offset of B^T) in flat
    a: dict[ModuleKey, torch.Tensor]  # (layer, module) -> lora_A [r, in_features]
    b: dict[ModuleKey, torch.Tensor]  # (layer, module) -> lora_B * scaling [out_features, r]


def lora_weights(
    spec: AdapterSpec, tensors: Mapping[str, torch.Tensor], dtype: torch.dtype, pin_memory: bool = False
) -> LoraWeights:
    """The LoRA of `tensors` (the adapter file's, as `read_adapter_tensors` answers them), packed into one
    buffer (in page-locked memory with `pin_memory`, so copies to a GPU run at full speed). Tensors other
    than lora_A/lora_B (DoRA's magnitudes) are left to their kind."""
    if spec.rank == 0:
        raise ValueError(f"adapter at {spec.path} is {spec.kind}, not LoRA")
    grouped, _ = module_tensors(tensors, PAIR_PARAMS, "")
    keys = sorted(grouped["lora_A"])
    pairs = {key: (grouped["lora_A"][key][1], grouped["lora_B"][key][1]) for key in keys}
    total = sum(a.numel() + b.numel() for a, b in pairs.values())
    flat = torch.empty(total, dtype=dtype, pin_memory=pin_memory)
    weights = LoraWeights(spec=spec, flat=flat, entries=[], a={}, b={})
    offset = 0
    for key, (lora_a, lora_b) in pairs.items():  # [r, in], [out, r]
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


def _host_weights(
    spec: AdapterSpec, tensors: Tensors, base: BaseModelInfo, dtype: torch.dtype, pin_memory: bool
) -> LinearWeights:
    return LinearWeights(lora=lora_weights(spec, tensors, dtype, pin_memory))


KIND = AdapterKind(
    name="lora",
    peft_type="LORA",
    hook="linear",
    check=check,
    spec=lambda root, config, tensors: spec_of("lora", root, config, tensors),
    host_weights=_host_weights,
    selects=lambda config: not config.get("use_dora"),
)
