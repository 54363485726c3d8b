"""Read and validate a PEFT adapter directory against a base model.

The server applies every adapter per row (never merged into the base), so it accepts only what it can
honour exactly: the kinds of `adapters/kinds` (LoRA, DoRA, IA³, prompt tuning, P-tuning, prefix tuning).
Every problem found is collected and raised once as `AdapterValidationError`, each one naming the config
field, file or tensor key at fault.
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Literal

import torch
from safetensors.torch import load_file

from .kinds import KINDS, SUPPORTED_PEFT_TYPES, AdapterKind, kind_for
from .kinds.common import (
    CONFIG_FILE,
    PROMPT_KEY,
    SUPPORTED_DTYPES,
    WEIGHTS_FILE,
    AdapterProblem,
    AdapterSpec,
    AdapterValidationError,
    BaseModelInfo,
    decoder_linear_shapes,
    problem,
)
from .kinds.lora import LORA_DEFAULTS
from .kinds.targets import MODULE_GROUPS, parse_module_key

PICKLE_SUFFIXES = frozenset({".bin", ".pt", ".pth", ".pkl", ".pickle", ".ckpt"})

_ID_PART = r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}"
ADAPTER_ID_PATTERN = re.compile(rf"^{_ID_PART}(?:/{_ID_PART})?$")

# Options of any kind the server cannot honour exactly; each refusal names its field.
_REFUSED_OPTIONS = {
    "modules_to_save": "extra trained modules are not supported; only adapter weights on linear layers or prompts",
    "lora_bias": "LoRA bias terms are not supported",
    "fan_in_fan_out": "fan_in_fan_out (Conv1D-layout) weights are not supported",
    "rank_pattern": "per-module ranks are not supported; use a single r",
    "alpha_pattern": "per-module alphas are not supported; use a single lora_alpha",
    "layer_replication": "layer replication is not supported",
    "trainable_token_indices": "trainable token embeddings are not supported",
    "target_parameters": "adapters on raw parameters are not supported; use target_modules",
    "use_qalora": "QALoRA adapters are not supported",
    "use_bdlora": "block-diagonal LoRA (BD-LoRA) is not supported",
    "alora_invocation_tokens": "activated LoRA (aLoRA) is not supported",
    "arrow_config": "Arrow routing is not supported",
    "kasa_config": "KaSA adapters are not supported",
    "monteclora_config": "MonteCLoRA adapters are not supported",
}

__all__ = [
    "CONFIG_FILE",
    "KINDS",
    "LORA_DEFAULTS",
    "MODULE_GROUPS",
    "PICKLE_SUFFIXES",
    "PROMPT_KEY",
    "SUPPORTED_DTYPES",
    "SUPPORTED_PEFT_TYPES",
    "WEIGHTS_FILE",
    "AdapterProblem",
    "AdapterSpec",
    "AdapterValidationError",
    "BaseModelInfo",
    "InvalidAdapterId",
    "decoder_linear_shapes",
    "parse_lora_key",
    "read_adapter",
    "read_adapter_tensors",
    "validate_adapter_id",
]


class InvalidAdapterId(ValueError):
    pass


def validate_adapter_id(adapter_id: str) -> str:
    if isinstance(adapter_id, str) and ADAPTER_ID_PATTERN.fullmatch(adapter_id):
        return adapter_id
    raise InvalidAdapterId(
        f"invalid adapter id {adapter_id!r}: use 1-128 characters from A-Z a-z 0-9 . _ -, starting with a "
        "letter or digit, optionally as tenant/name"
    )


def parse_lora_key(key: str) -> tuple[int, str, Literal["A", "B"]] | None:
    """`...layers.{i}.<...>.{module}.lora_{A|B}.weight` -> (layer, module, matrix); None for any other key."""
    parsed = parse_module_key(key)
    if parsed is None or parsed[2] not in ("lora_A", "lora_B"):
        return None
    matrix: Literal["A", "B"] = "A" if parsed[2] == "lora_A" else "B"
    return parsed[0], parsed[1], matrix


def read_adapter(path: str | Path, base: BaseModelInfo, max_rank: int) -> AdapterSpec:
    return read_adapter_tensors(path, base, max_rank)[0]


def read_adapter_tensors(
    path: str | Path, base: BaseModelInfo, max_rank: int
) -> tuple[AdapterSpec, dict[str, torch.Tensor]]:
    """`read_adapter`, also answering the tensors it read and checked, so loading needs no second read."""
    root = Path(path)
    if not root.is_dir():
        raise AdapterValidationError([AdapterProblem("path", "path: adapter directory not found")])
    config, problems = _read_config(root)
    tensors, tensor_problems = _read_tensors(root)
    problems += _check_pickle_files(root) + tensor_problems
    kind = None
    if config is not None:
        kind, kind_problems = _check_adapter(config, tensors, base, max_rank)
        problems += kind_problems
    if problems:
        raise AdapterValidationError(problems, cause=_made_for_another_base(config, tensors, base))
    assert config is not None and tensors is not None and kind is not None
    return kind.spec(root, config, tensors), tensors


HIDDEN_INPUT_MODULES = ("q_proj", "k_proj", "v_proj", "gate_proj", "up_proj")  # in_features: the hidden size


def _made_for_another_base(
    config: Mapping[str, Any] | None, tensors: dict[str, torch.Tensor] | None, base: BaseModelInfo
) -> AdapterProblem | None:
    """The likely cause of a wall of shape problems: the adapter's tensors say another hidden size (or more
    layers) than this base has. Names the base model its adapter_config.json gives, if any."""
    if not tensors:
        return None
    hidden = None
    for key, tensor in tensors.items():
        parsed = parse_module_key(key)
        reads_hidden = parsed is not None and parsed[2] == "lora_A" and parsed[1] in HIDDEN_INPUT_MODULES
        if tensor.ndim == 2 and (reads_hidden or key == PROMPT_KEY):
            hidden = int(tensor.shape[1])
            break
    layers = 1 + max((p[0] for p in map(parse_module_key, tensors) if p is not None), default=-1)
    if hidden is not None and hidden != base.hidden_size:
        made, this = f"hidden size {hidden}", f"hidden size {base.hidden_size}"
    elif layers > base.num_layers:
        made, this = f"{layers} layers", f"{base.num_layers} layers"
    else:
        return None
    named = (config or {}).get("base_model_name_or_path")
    source = f" ({named}, as its adapter_config.json says)" if isinstance(named, str) and named else ""
    return problem(
        "base_model",
        f"this adapter was made for another base model{source}, with {made}; this server serves {base.name}, "
        f"with {this}: train the adapter on {base.name} (`adapterd model export DIR` copies its weights)",
    )


def _read_config(root: Path) -> tuple[dict[str, Any] | None, list[AdapterProblem]]:
    config_path = root / CONFIG_FILE
    if not config_path.is_file():
        return None, [problem(CONFIG_FILE, "file is missing")]
    try:
        config = json.loads(config_path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as err:
        return None, [problem(CONFIG_FILE, f"invalid JSON ({err})")]
    if not isinstance(config, dict):
        return None, [problem(CONFIG_FILE, "must hold a JSON object")]
    return config, []


def _read_tensors(root: Path) -> tuple[dict[str, torch.Tensor] | None, list[AdapterProblem]]:
    weights_path = root / WEIGHTS_FILE
    if not weights_path.is_file():
        return None, [problem(WEIGHTS_FILE, "file is missing")]
    try:
        return load_file(weights_path), []
    except Exception as err:  # safetensors raises several error types for corrupt files
        return None, [problem(WEIGHTS_FILE, f"unreadable or corrupt safetensors file ({err})")]


def _check_pickle_files(root: Path) -> list[AdapterProblem]:
    pickles = sorted(p.name for p in root.iterdir() if p.is_file() and p.suffix.lower() in PICKLE_SUFFIXES)
    message = f"pickle weight files are refused (loading them can run code); provide {WEIGHTS_FILE} only"
    return [problem(name, message) for name in pickles]


def _check_adapter(
    config: Mapping[str, Any], tensors: dict[str, torch.Tensor] | None, base: BaseModelInfo, max_rank: int
) -> tuple[AdapterKind | None, list[AdapterProblem]]:
    problems = _check_task_type(config)
    kind = kind_for(config)
    if kind is None:
        peft_type = config.get("peft_type")
        supported = ", ".join(SUPPORTED_PEFT_TYPES)
        found = "is missing" if peft_type is None else f"{peft_type} adapters are not supported"
        return None, [*problems, problem("peft_type", f"{found} (supported: {supported})")]
    problems += [problem(name, reason) for name, reason in _REFUSED_OPTIONS.items() if config.get(name)]
    return kind, problems + kind.check(config, tensors, base, max_rank)


def _check_task_type(config: Mapping[str, Any]) -> list[AdapterProblem]:
    task_type = config.get("task_type")
    if task_type in (None, "CAUSAL_LM"):
        return []
    return [problem("task_type", f"{task_type} is not supported; only CAUSAL_LM")]
