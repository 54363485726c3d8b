"""What every adapter kind shares: the files, the problem records, the base model's shapes, the spec a
validated adapter becomes, and the checks several kinds run on their config and tensors."""

from __future__ import annotations

import math
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch

CONFIG_FILE = "adapter_config.json"
WEIGHTS_FILE = "adapter_model.safetensors"
PROMPT_KEY = "prompt_embeddings"
SUPPORTED_DTYPES = frozenset({torch.float16, torch.bfloat16, torch.float32, torch.float64})

KindName = Literal["lora", "dora", "ia3", "prompt_tuning", "p_tuning", "prefix_tuning"]


@dataclass(frozen=True)
class AdapterProblem:
    field: str
    message: str


MAX_SHOWN_GROUPS = 32  # distinct problems in the message; `problems` keeps every one
MAX_SHOWN_WITH_CAUSE = 4  # when the first names the cause, the rest only illustrate it


def group_key(message: str) -> str:
    """The same problem in another layer reads the same: `layers.3.` and `layers.17.` both `layers.*.`."""
    return LAYER_NUMBER.sub("layer index *", LAYER_INDEX.sub("layers.*.", message))


LAYER_INDEX = re.compile(r"layers\.\d+\.")
LAYER_NUMBER = re.compile(r"layer index \d+")


class AdapterValidationError(ValueError):
    """Every problem found, in `problems`; the message names the likely cause first (a `cause` problem, such
    as an adapter made for another base model), then each distinct problem once, with how many layers share
    it."""

    def __init__(self, problems: Iterable[AdapterProblem], cause: AdapterProblem | None = None):
        self.problems = ([cause] if cause else []) + list(problems)
        count = len(self.problems)
        limit = MAX_SHOWN_WITH_CAUSE if cause else MAX_SHOWN_GROUPS
        details = self._details(limit)
        super().__init__(f"adapter refused ({count} problem{'s' if count != 1 else ''}): {details}")

    def _details(self, limit: int) -> str:
        groups: dict[str, list[AdapterProblem]] = {}
        for p in self.problems:
            groups.setdefault(group_key(p.message), []).append(p)
        shown = []
        for members in list(groups.values())[:limit]:
            more = len(members) - 1
            alike = f" (and {more} more layer{'s' if more > 1 else ''} alike)" if more else ""
            shown.append(members[0].message + alike)
        hidden = len(groups) - limit
        return "; ".join(shown) + (f"; and {hidden} more kinds of problem" if hidden > 0 else "")


def problem(field_name: str, message: str) -> AdapterProblem:
    return AdapterProblem(field_name, f"{field_name}: {message}")


@dataclass(frozen=True)
class BaseModelInfo:
    name: str
    hidden_size: int
    num_layers: int
    linear_shapes: Mapping[str, tuple[int, int]] = field(hash=False)  # module -> (in_features, out_features)
    num_kv_heads: int = 0  # 0: as many as attention heads (unknown here)
    head_dim: int = 0

    @classmethod
    def from_hf_config(cls, config: Any, name: str) -> BaseModelInfo:
        num_heads = config.num_attention_heads
        return cls(
            name=name,
            hidden_size=config.hidden_size,
            num_layers=config.num_hidden_layers,
            linear_shapes=decoder_linear_shapes(config),
            num_kv_heads=getattr(config, "num_key_value_heads", None) or num_heads,
            head_dim=getattr(config, "head_dim", None) or config.hidden_size // num_heads,
        )

    @property
    def kv_dim(self) -> int:
        """Width of one layer's keys (or values) per token: KV heads x head size."""
        return self.linear_shapes["k_proj"][1]


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
    """A validated adapter: its kind and the settings serving needs (the rest stays in `config`)."""

    kind: KindName
    path: Path
    rank: int  # LoRA and DoRA; 0 for the other kinds
    alpha: float
    use_rslora: bool
    target_modules: tuple[str, ...]  # short names of the linears its weights touch, sorted; () for prompts
    num_virtual_tokens: int  # prompt tuning, P-tuning, prefix tuning; 0 for the others
    base_model_name_or_path: str | None
    config: Mapping[str, Any] = field(hash=False, repr=False)  # raw adapter_config.json

    @property
    def scaling(self) -> float:
        if self.rank == 0:
            return 1.0
        return lora_scaling(self.alpha, self.rank, self.use_rslora)


def lora_scaling(alpha: float, rank: int, use_rslora: bool) -> float:
    """PEFT's LoRA scaling: lora_alpha / r, or lora_alpha / sqrt(r) with rsLoRA."""
    return alpha / (math.sqrt(rank) if use_rslora else rank)


def is_positive_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value > 0


def is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def check_values(tensors: Mapping[str, torch.Tensor]) -> list[AdapterProblem]:
    """Every tensor floating-point and finite."""
    problems = []
    for key, tensor in tensors.items():
        if tensor.dtype not in SUPPORTED_DTYPES:
            message = f"dtype {tensor.dtype} is not supported (use a floating-point type)"
            problems.append(problem(key, message))
        elif not bool(torch.isfinite(tensor).all()):
            problems.append(problem(key, "contains NaN or Inf values"))
    return problems


def unrecognised(key: str, expected: str) -> AdapterProblem:
    return problem(key, f"unrecognised tensor in {WEIGHTS_FILE}; only {expected} are accepted")


def fits(shape: tuple[int, ...], expected: tuple[int | None, ...]) -> bool:
    """`shape` has `expected`'s dimensions, None matching any size."""
    return len(shape) == len(expected) and all(
        want in (None, got) for want, got in zip(expected, shape, strict=True)
    )


def check_num_virtual_tokens(config: Mapping[str, Any]) -> tuple[int | None, list[AdapterProblem]]:
    num_tokens = config.get("num_virtual_tokens")
    if is_positive_int(num_tokens):
        return num_tokens, []
    return None, [problem("num_virtual_tokens", f"must be a positive integer, got {num_tokens!r}")]


def check_one_submodule(config: Mapping[str, Any]) -> list[AdapterProblem]:
    if config.get("num_transformer_submodules") in (None, 1):
        return []
    return [problem("num_transformer_submodules", "must be 1 (decoder-only models)")]


def check_only_prompt_tensor(
    tensors: Mapping[str, torch.Tensor], expected: tuple[int | None, int], layout: str
) -> list[AdapterProblem]:
    """`tensors` hold exactly `prompt_embeddings`, of shape `expected` (None rows: any)."""
    problems = [unrecognised(key, PROMPT_KEY) for key in tensors if key != PROMPT_KEY]
    if PROMPT_KEY not in tensors:
        return [*problems, problem(PROMPT_KEY, f"tensor is missing from {WEIGHTS_FILE}")]
    shape = tuple(tensors[PROMPT_KEY].shape)
    if not fits(shape, expected):
        rows = "num_virtual_tokens" if expected[0] is None else expected[0]
        message = f"has shape {list(shape)}, expected [{rows}, {expected[1]}] ({layout})"
        problems.append(problem(PROMPT_KEY, message))
    return [*check_values(tensors), *problems]
