"""Read and validate a PEFT adapter directory (LoRA or prompt tuning) against a base model.

The server applies LoRA per token (never merged) and prepends soft prompts, so it accepts only what it can
honour exactly. Every problem found is collected and raised once as `AdapterValidationError`, each one naming
the config field, file or tensor key at fault.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch
from safetensors.torch import load_file

CONFIG_FILE = "adapter_config.json"
WEIGHTS_FILE = "adapter_model.safetensors"
PROMPT_KEY = "prompt_embeddings"
PICKLE_SUFFIXES = frozenset({".bin", ".pt", ".pth", ".pkl", ".pickle", ".ckpt"})
SUPPORTED_PEFT_TYPES = ("LORA", "PROMPT_TUNING")
SUPPORTED_DTYPES = frozenset({torch.float16, torch.bfloat16, torch.float32, torch.float64})
MODULE_GROUPS = {
    "q_proj": "self_attn",
    "k_proj": "self_attn",
    "v_proj": "self_attn",
    "o_proj": "self_attn",
    "gate_proj": "mlp",
    "up_proj": "mlp",
    "down_proj": "mlp",
}
LORA_DEFAULTS = {"r": 8, "lora_alpha": 8, "use_rslora": False, "bias": "none"}

_ID_PART = r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}"
ADAPTER_ID_PATTERN = re.compile(rf"^{_ID_PART}(?:/{_ID_PART})?$")
_LORA_KEY = re.compile(r"(?:^|\.)layers\.(\d+)\.(?:[\w.]*\.)?(\w+)\.lora_([AB])\.weight$")
_NON_LINEAR_TARGETS = ("model.embed_tokens", "lm_head")
_BASE_MODIFYING_INITS = ("pissa", "olora", "corda", "loftq", "lora_ga")

_REFUSED_OPTIONS = {
    "modules_to_save": "extra trained modules are not supported; only LoRA on linear layers or soft prompts",
    "use_dora": "DoRA adapters are not supported",
    "lora_bias": "LoRA bias terms are not supported",
    "fan_in_fan_out": "fan_in_fan_out (Conv1D-layout) weights are not supported",
    "rank_pattern": "per-module ranks are not supported; use a single r",
    "alpha_pattern": "per-module alphas are not supported; use a single lora_alpha",
    "layer_replication": "layer replication is not supported",
    "trainable_token_indices": "trainable token embeddings are not supported",
    "target_parameters": "LoRA on raw parameters is not supported; use target_modules",
    "use_qalora": "QALoRA adapters are not supported",
    "use_bdlora": "block-diagonal LoRA (BD-LoRA) is not supported",
    "alora_invocation_tokens": "activated LoRA (aLoRA) is not supported",
    "arrow_config": "Arrow routing is not supported",
    "kasa_config": "KaSA adapters are not supported",
    "monteclora_config": "MonteCLoRA adapters are not supported",
}


class InvalidAdapterId(ValueError):
    pass


def validate_adapter_id(adapter_id: str) -> str:
    if isinstance(adapter_id, str) and ADAPTER_ID_PATTERN.fullmatch(adapter_id):
        return adapter_id
    raise InvalidAdapterId(
        f"invalid adapter id {adapter_id!r}: use 1-128 characters from A-Z a-z 0-9 . _ -, starting with a "
        "letter or digit, optionally as tenant/name"
    )


@dataclass(frozen=True)
class AdapterProblem:
    field: str
    message: str


class AdapterValidationError(ValueError):
    def __init__(self, problems: Iterable[AdapterProblem]):
        self.problems = list(problems)
        count = len(self.problems)
        details = "; ".join(p.message for p in self.problems)
        super().__init__(f"adapter refused ({count} problem{'s' if count != 1 else ''}): {details}")


@dataclass(frozen=True)
class BaseModelInfo:
    name: str
    hidden_size: int
    num_layers: int
    linear_shapes: Mapping[str, tuple[int, int]] = field(hash=False)  # module -> (in_features, out_features)

    @classmethod
    def from_hf_config(cls, config: Any, name: str) -> BaseModelInfo:
        shapes = decoder_linear_shapes(config)
        return cls(
            name=name,
            hidden_size=config.hidden_size,
            num_layers=config.num_hidden_layers,
            linear_shapes=shapes,
        )


def decoder_linear_shapes(config: Any) -> dict[str, tuple[int, int]]:
    """(in_features, out_features) of each linear module of a Llama-family decoder layer."""
    hidden = config.hidden_size
    num_heads = config.num_attention_heads
    num_kv_heads = getattr(config, "num_key_value_heads", None) or num_heads
    head_dim = getattr(config, "head_dim", None) or hidden // num_heads
    q_out, kv_out, inter = num_heads * head_dim, num_kv_heads * head_dim, config.intermediate_size
    return {
        "q_proj": (hidden, q_out),
        "k_proj": (hidden, kv_out),
        "v_proj": (hidden, kv_out),
        "o_proj": (q_out, hidden),
        "gate_proj": (hidden, inter),
        "up_proj": (hidden, inter),
        "down_proj": (inter, hidden),
    }


@dataclass(frozen=True)
class AdapterSpec:
    kind: Literal["lora", "prompt_tuning"]
    path: Path
    rank: int  # 0 for prompt tuning
    alpha: float
    use_rslora: bool
    target_modules: tuple[str, ...]  # short module names present in the weights, sorted
    num_virtual_tokens: int  # 0 for LoRA
    base_model_name_or_path: str | None
    config: Mapping[str, Any] = field(hash=False, repr=False)  # raw adapter_config.json

    @property
    def scaling(self) -> float:
        if self.kind == "prompt_tuning":
            return 1.0
        return self.alpha / (math.sqrt(self.rank) if self.use_rslora else self.rank)


def parse_lora_key(key: str) -> tuple[int, str, Literal["A", "B"]] | None:
    """`...layers.{i}.<...>.{module}.lora_{A|B}.weight` -> (layer, module, matrix); None for any other key."""
    match = _LORA_KEY.search(key)
    if match is None:
        return None
    matrix: Literal["A", "B"] = "A" if match.group(3) == "A" else "B"
    return int(match.group(1)), match.group(2), matrix


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
    if config is not None:
        problems += _check_adapter(config, tensors, base, max_rank)
    if problems:
        raise AdapterValidationError(problems)
    assert config is not None and tensors is not None
    return _build_spec(root, config, tensors), tensors


def _problem(field_name: str, message: str) -> AdapterProblem:
    return AdapterProblem(field_name, f"{field_name}: {message}")


def _read_config(root: Path) -> tuple[dict[str, Any] | None, list[AdapterProblem]]:
    config_path = root / CONFIG_FILE
    if not config_path.is_file():
        return None, [_problem(CONFIG_FILE, "file is missing")]
    try:
        config = json.loads(config_path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as err:
        return None, [_problem(CONFIG_FILE, f"invalid JSON ({err})")]
    if not isinstance(config, dict):
        return None, [_problem(CONFIG_FILE, "must hold a JSON object")]
    return config, []


def _read_tensors(root: Path) -> tuple[dict[str, torch.Tensor] | None, list[AdapterProblem]]:
    weights_path = root / WEIGHTS_FILE
    if not weights_path.is_file():
        return None, [_problem(WEIGHTS_FILE, "file is missing")]
    try:
        return load_file(weights_path), []
    except Exception as err:  # safetensors raises several error types for corrupt files
        return None, [_problem(WEIGHTS_FILE, f"unreadable or corrupt safetensors file ({err})")]


def _check_pickle_files(root: Path) -> list[AdapterProblem]:
    pickles = sorted(p.name for p in root.iterdir() if p.is_file() and p.suffix.lower() in PICKLE_SUFFIXES)
    message = f"pickle weight files are refused (loading them can run code); provide {WEIGHTS_FILE} only"
    return [_problem(name, message) for name in pickles]


def _check_adapter(
    config: Mapping[str, Any], tensors: dict[str, torch.Tensor] | None, base: BaseModelInfo, max_rank: int
) -> list[AdapterProblem]:
    problems = _check_task_type(config)
    peft_type = config.get("peft_type")
    if peft_type == "LORA":
        return problems + _check_refused_options(config) + _check_lora(config, tensors, base, max_rank)
    if peft_type == "PROMPT_TUNING":
        return problems + _check_refused_options(config) + _check_prompt_tuning(config, tensors, base)
    supported = ", ".join(SUPPORTED_PEFT_TYPES)
    found = "is missing" if peft_type is None else f"{peft_type} adapters are not supported"
    return [*problems, _problem("peft_type", f"{found} (supported: {supported})")]


def _check_task_type(config: Mapping[str, Any]) -> list[AdapterProblem]:
    task_type = config.get("task_type")
    if task_type in (None, "CAUSAL_LM"):
        return []
    return [_problem("task_type", f"{task_type} is not supported; only CAUSAL_LM")]


def _check_refused_options(config: Mapping[str, Any]) -> list[AdapterProblem]:
    return [_problem(name, reason) for name, reason in _REFUSED_OPTIONS.items() if config.get(name)]


def _check_lora(
    config: Mapping[str, Any], tensors: dict[str, torch.Tensor] | None, base: BaseModelInfo, max_rank: int
) -> list[AdapterProblem]:
    settings = {**LORA_DEFAULTS, **config}
    problems = _check_rank(settings["r"], max_rank) + _check_lora_settings(settings)
    problems += _check_target_modules(config.get("target_modules"), base)
    if tensors is not None:
        rank = settings["r"] if _is_positive_int(settings["r"]) else None
        problems += _check_values(tensors) + _check_lora_tensors(tensors, base, rank)
    return problems


def _is_positive_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value > 0


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _check_rank(rank: Any, max_rank: int) -> list[AdapterProblem]:
    if not _is_positive_int(rank):
        return [_problem("r", f"must be a positive integer, got {rank!r}")]
    if rank > max_rank:
        return [_problem("r", f"rank {rank} exceeds the server limit max_rank={max_rank}")]
    return []


def _check_lora_settings(settings: Mapping[str, Any]) -> list[AdapterProblem]:
    problems = []
    if not _is_number(settings["lora_alpha"]):
        problems.append(_problem("lora_alpha", f"must be a finite number, got {settings['lora_alpha']!r}"))
    if not isinstance(settings["use_rslora"], bool):
        problems.append(_problem("use_rslora", f"must be true or false, got {settings['use_rslora']!r}"))
    if settings["bias"] != "none":
        problems.append(_problem("bias", f"bias={settings['bias']!r} is not supported; only 'none'"))
    init = settings.get("init_lora_weights")
    if isinstance(init, str) and init.startswith(_BASE_MODIFYING_INITS):
        message = f"{init!r} adapters rely on modified base weights, which the server cannot apply"
        problems.append(_problem("init_lora_weights", message))
    return problems


def _check_target_modules(target: Any, base: BaseModelInfo) -> list[AdapterProblem]:
    if target is None or target == "all-linear":
        return []
    if isinstance(target, str):
        return _check_target_regex(target, base)
    if not isinstance(target, list) or not all(isinstance(name, str) for name in target):
        return [_problem("target_modules", "must be a list of module names or a regular expression")]
    lacking = sorted({name.rsplit(".", 1)[-1] for name in target} - set(base.linear_shapes))
    if not lacking:
        return []
    message = f"base model {base.name} has no linear module named {', '.join(lacking)} {_can_target(base)}"
    return [_problem("target_modules", message)]


def _can_target(base: BaseModelInfo) -> str:
    return f"(LoRA can target {', '.join(base.linear_shapes)})"


def _check_target_regex(pattern: str, base: BaseModelInfo) -> list[AdapterProblem]:
    try:
        regex = re.compile(pattern)
    except re.error as err:
        return [_problem("target_modules", f"invalid regular expression {pattern!r} ({err})")]
    problems = []
    others = [name for name in _NON_LINEAR_TARGETS if regex.fullmatch(name)]
    if others:
        message = f"regex {pattern!r} matches {', '.join(others)} {_can_target(base)}"
        problems.append(_problem("target_modules", message))
    if not any(regex.fullmatch(name) for name in _linear_module_paths(base)):
        message = f"regex {pattern!r} matches no linear module of base model {base.name} {_can_target(base)}"
        problems.append(_problem("target_modules", message))
    return problems


def _linear_module_paths(base: BaseModelInfo) -> list[str]:
    return [
        f"model.layers.{layer}.{MODULE_GROUPS.get(module, 'self_attn')}.{module}"
        for layer in range(base.num_layers)
        for module in base.linear_shapes
    ]


def _check_values(tensors: Mapping[str, torch.Tensor]) -> list[AdapterProblem]:
    problems = []
    for key, tensor in tensors.items():
        if tensor.dtype not in SUPPORTED_DTYPES:
            message = f"dtype {tensor.dtype} is not supported (use a floating-point type)"
            problems.append(_problem(key, message))
        elif not bool(torch.isfinite(tensor).all()):
            problems.append(_problem(key, "contains NaN or Inf values"))
    return problems


def _unrecognised(key: str, expected: str) -> AdapterProblem:
    return _problem(key, f"unrecognised tensor in {WEIGHTS_FILE}; only {expected} are accepted")


def _check_lora_tensors(
    tensors: Mapping[str, torch.Tensor], base: BaseModelInfo, rank: int | None
) -> list[AdapterProblem]:
    problems = []
    pairs: dict[tuple[int, str], dict[str, str]] = {}
    for key, tensor in tensors.items():
        parsed = parse_lora_key(key)
        if parsed is None:
            problems.append(_unrecognised(key, "lora_A/lora_B weights of decoder linear layers"))
            continue
        problems += _check_lora_tensor(key, tuple(tensor.shape), parsed, base, rank)
        layer, module, matrix = parsed
        pairs.setdefault((layer, module), {})[matrix] = key
    if not pairs:
        problems.append(_problem(WEIGHTS_FILE, "holds no LoRA weights"))
    return problems + _check_pairs(pairs)


def _check_lora_tensor(
    key: str, shape: tuple[int, ...], parsed: tuple[int, str, str], base: BaseModelInfo, rank: int | None
) -> list[AdapterProblem]:
    layer, module, matrix = parsed
    if module not in base.linear_shapes:
        return [_problem(key, f"base model {base.name} has no linear module {module} {_can_target(base)}")]
    problems = []
    if layer >= base.num_layers:
        message = f"layer index {layer} is out of range; base model {base.name} has {base.num_layers} layers"
        problems.append(_problem(key, message))
    in_features, out_features = base.linear_shapes[module]
    expected = (rank, in_features) if matrix == "A" else (out_features, rank)
    if not _fits(shape, expected):
        dims = ", ".join("r" if dim is None else str(dim) for dim in expected)
        layout = "[r, in_features]" if matrix == "A" else "[out_features, r]"
        message = f"{key} has shape {list(shape)}, expected [{dims}] ({layout} of {module})"
        problems.append(_problem(f"lora_{matrix} shape", message))
    return problems


def _fits(shape: tuple[int, ...], expected: tuple[int | None, int | None]) -> bool:
    return len(shape) == 2 and all(want in (None, got) for want, got in zip(expected, shape, strict=True))


def _check_pairs(pairs: Mapping[tuple[int, str], Mapping[str, str]]) -> list[AdapterProblem]:
    problems = []
    for keys in pairs.values():
        for have, lack in (("A", "B"), ("B", "A")):
            if have in keys and lack not in keys:
                problems.append(_problem(f"lora_{lack}", f"{keys[have]} has no matching lora_{lack} tensor"))
    return problems


def _check_prompt_tuning(
    config: Mapping[str, Any], tensors: dict[str, torch.Tensor] | None, base: BaseModelInfo
) -> list[AdapterProblem]:
    problems = []
    num_tokens = config.get("num_virtual_tokens")
    if not _is_positive_int(num_tokens):
        problems.append(_problem("num_virtual_tokens", f"must be a positive integer, got {num_tokens!r}"))
        num_tokens = None
    if config.get("num_transformer_submodules") not in (None, 1):
        problems.append(_problem("num_transformer_submodules", "must be 1 (decoder-only models)"))
    token_dim = config.get("token_dim")
    if token_dim is not None and token_dim != base.hidden_size:
        message = f"{token_dim} does not match the hidden size {base.hidden_size} of base model {base.name}"
        problems.append(_problem("token_dim", message))
    if tensors is not None:
        problems += _check_values(tensors) + _check_prompt_tensors(tensors, num_tokens, base.hidden_size)
    return problems


def _check_prompt_tensors(
    tensors: Mapping[str, torch.Tensor], num_tokens: int | None, hidden_size: int
) -> list[AdapterProblem]:
    problems = [_unrecognised(key, PROMPT_KEY) for key in tensors if key != PROMPT_KEY]
    if PROMPT_KEY not in tensors:
        return [*problems, _problem(PROMPT_KEY, f"tensor is missing from {WEIGHTS_FILE}")]
    shape = tuple(tensors[PROMPT_KEY].shape)
    if not _fits(shape, (num_tokens, hidden_size)):
        rows = "num_virtual_tokens" if num_tokens is None else num_tokens
        message = f"has shape {list(shape)}, expected [{rows}, {hidden_size}] (num_virtual_tokens, hidden)"
        problems.append(_problem(PROMPT_KEY, message))
    return problems


def _build_spec(root: Path, config: dict[str, Any], tensors: Mapping[str, torch.Tensor]) -> AdapterSpec:
    if config["peft_type"] == "PROMPT_TUNING":
        return AdapterSpec(
            kind="prompt_tuning",
            path=root,
            rank=0,
            alpha=1.0,
            use_rslora=False,
            target_modules=(),
            num_virtual_tokens=config["num_virtual_tokens"],
            base_model_name_or_path=config.get("base_model_name_or_path"),
            config=config,
        )
    settings = {**LORA_DEFAULTS, **config}
    modules = {parsed[1] for parsed in map(parse_lora_key, tensors) if parsed is not None}
    return AdapterSpec(
        kind="lora",
        path=root,
        rank=settings["r"],
        alpha=float(settings["lora_alpha"]),
        use_rslora=settings["use_rslora"],
        target_modules=tuple(sorted(modules)),
        num_virtual_tokens=0,
        base_model_name_or_path=config.get("base_model_name_or_path"),
        config=config,
    )
