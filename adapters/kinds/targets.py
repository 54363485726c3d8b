"""The decoder linears an adapter's weights sit on: parsing their tensor keys and checking
`target_modules` (shared by the kinds that change linear layers: LoRA, DoRA, IA³)."""

from __future__ import annotations

import time
from collections.abc import Mapping
from typing import Any

import regex
import torch

from .common import AdapterProblem, BaseModelInfo, problem, unrecognised

MODULE_GROUPS = {
    "q_proj": "self_attn",
    "k_proj": "self_attn",
    "v_proj": "self_attn",
    "o_proj": "self_attn",
    "gate_proj": "mlp",
    "up_proj": "mlp",
    "down_proj": "mlp",
}
_MODULE_KEY = regex.compile(
    r"(?:^|\.)layers\.(\d{1,9})\.(?:[\w.]*\.)?(\w+)\.(lora_[AB]\.weight|lora_magnitude_vector|ia3_l)$"
)
_NON_LINEAR_TARGETS = ("model.embed_tokens", "lm_head")
REGEX_SECONDS = 0.2  # for a target_modules pattern over every module name of the base model

ModuleKey = tuple[int, str]  # (layer, module)


def parse_module_key(key: str) -> tuple[int, str, str] | None:
    """`...layers.{i}.<...>.{module}.{param}` -> (layer, module, param) for the params the linear kinds save
    ("lora_A", "lora_B", "lora_magnitude_vector", "ia3_l"); None for any other key."""
    match = _MODULE_KEY.search(key)
    if match is None:
        return None
    return int(match.group(1)), match.group(2), match.group(3).removesuffix(".weight")


def module_tensors(
    tensors: Mapping[str, torch.Tensor], params: tuple[str, ...], expected: str
) -> tuple[dict[str, dict[ModuleKey, tuple[str, torch.Tensor]]], list[AdapterProblem]]:
    """`tensors` grouped by param then (layer, module), each with its key; a problem for every key that is
    not one of `params` on a decoder linear (`expected` describes what is accepted)."""
    grouped: dict[str, dict[ModuleKey, tuple[str, torch.Tensor]]] = {param: {} for param in params}
    problems = []
    for key, tensor in tensors.items():
        parsed = parse_module_key(key)
        if parsed is None or parsed[2] not in params:
            problems.append(unrecognised(key, expected))
            continue
        layer, module, param = parsed
        grouped[param][(layer, module)] = (key, tensor)
    return grouped, problems


def check_module_key(key: str, layer: int, module: str, base: BaseModelInfo) -> list[AdapterProblem]:
    """The layer and module of a tensor key exist in the base model."""
    if module not in base.linear_shapes:
        return [problem(key, f"base model {base.name} has no linear module {module} {can_target(base)}")]
    if layer >= base.num_layers:
        message = f"layer index {layer} is out of range; base model {base.name} has {base.num_layers} layers"
        return [problem(key, message)]
    return []


def check_target_modules(
    target: Any, base: BaseModelInfo, field_name: str = "target_modules"
) -> list[AdapterProblem]:
    if target is None or target == "all-linear":
        return []
    if isinstance(target, str):
        return _check_target_regex(target, base, field_name)
    if not isinstance(target, list) or not all(isinstance(name, str) for name in target):
        return [problem(field_name, "must be a list of module names or a regular expression")]
    lacking = sorted({name.rsplit(".", 1)[-1] for name in target} - set(base.linear_shapes))
    if not lacking:
        return []
    message = f"base model {base.name} has no linear module named {', '.join(lacking)} {can_target(base)}"
    return [problem(field_name, message)]


def can_target(base: BaseModelInfo) -> str:
    return f"(adapters can target {', '.join(base.linear_shapes)})"


def targets_module(target: Any, layer: int, module: str) -> bool:
    """Whether `target` (a PEFT target_modules / feedforward_modules value) names this linear."""
    if target is None:
        return False
    if target == "all-linear":
        return True
    if isinstance(target, str):
        return bool(_bounded_matches(target, [_module_path(layer, module)]))
    return any(name.rsplit(".", 1)[-1] == module for name in target)


def _module_path(layer: int, module: str) -> str:
    return f"model.layers.{layer}.{MODULE_GROUPS.get(module, 'self_attn')}.{module}"


def _check_target_regex(pattern: str, base: BaseModelInfo, field_name: str) -> list[AdapterProblem]:
    paths = [_module_path(layer, module) for layer in range(base.num_layers) for module in base.linear_shapes]
    try:
        others = _bounded_matches(pattern, list(_NON_LINEAR_TARGETS))
        matched = _bounded_matches(pattern, paths)
    except regex.error as err:
        return [problem(field_name, f"invalid regular expression {pattern!r} ({err})")]
    except TimeoutError:
        message = f"regex {pattern!r} takes over {REGEX_SECONDS:g} s to match the module names; simplify it"
        return [problem(field_name, message)]
    problems = []
    if others:
        message = f"regex {pattern!r} matches {', '.join(others)} {can_target(base)}"
        problems.append(problem(field_name, message))
    if not matched:
        message = f"regex {pattern!r} matches no linear module of base model {base.name} {can_target(base)}"
        problems.append(problem(field_name, message))
    return problems


def _bounded_matches(pattern: str, names: list[str]) -> list[str]:
    """The names `pattern` matches whole, as PEFT's `re.fullmatch`, within REGEX_SECONDS for all of them
    (TimeoutError beyond): a pattern that backtracks exponentially must not stall the server. The `regex`
    package reads Python's `re` syntax and can stop a match midway; `re` cannot."""
    deadline = time.monotonic() + REGEX_SECONDS
    compiled = regex.compile(pattern)
    return [
        name for name in names if compiled.fullmatch(name, timeout=max(deadline - time.monotonic(), 1e-3))
    ]
