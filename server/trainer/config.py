"""What a job trains: `JobConfig`, its defaults, and validation that names the field at fault."""

from __future__ import annotations

import math
import re
from dataclasses import asdict, dataclass, fields
from typing import Any

from adapterd.adapters.format import MODULE_GROUPS, InvalidAdapterId, validate_adapter_id
from adapterd.server.trainer.errors import InvalidConfig

# method -> the kind of adapter it makes (adapters/kinds); qlora is LoRA trained on an NF4 base.
METHOD_KINDS = {
    "lora": "lora",
    "qlora": "lora",
    "dora": "dora",
    "ia3": "ia3",
    "prompt_tuning": "prompt_tuning",
    "p_tuning": "p_tuning",
    "prefix_tuning": "prefix_tuning",
}
METHODS = tuple(METHOD_KINDS)
RANKED_METHODS = ("lora", "qlora", "dora")  # the methods `rank` and `alpha` apply to
MODULE_METHODS = (*RANKED_METHODS, "ia3")  # the methods `target_modules` applies to
PROMPT_METHODS = ("prompt_tuning", "p_tuning", "prefix_tuning")  # `num_virtual_tokens` applies to
ALL_LINEAR = tuple(MODULE_GROUPS)  # q, k, v, o, gate, up, down
# Peak learning rates that work for small data sets; the scale-vector and prompt methods need larger ones.
DEFAULT_LEARNING_RATE = {
    "lora": 1e-3,
    "qlora": 1e-3,
    "dora": 1e-3,
    "ia3": 1e-2,
    "prompt_tuning": 3e-2,
    "p_tuning": 1e-2,
    "prefix_tuning": 1e-2,
}
# Beyond what num_virtual_tokens (at most 1024) can use; keeps the adapter's metadata, which records the config,
# under the server's 64 KiB limit however the text is escaped.
MAX_INIT_TEXT_CHARS = 8192
LIMITS = {  # field -> (smallest, largest) allowed
    "rank": (1, 1024),
    "alpha": (1e-6, 1e6),
    "num_virtual_tokens": (1, 1024),
    "epochs": (1, 1000),
    "max_steps": (1, 10_000_000),
    "learning_rate": (1e-9, 10.0),
    "batch_size": (1, 4096),
    "max_seq_len": (8, 1_048_576),
    "seed": (0, 2**63 - 1),
}
MAX_EVAL_TASKS = 64
TASK_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.\-]{0,199}")  # lm-eval's task, group and tag names
HELD_OUT = "held_out"  # register_if's name for the held-out file's scores (exact_match, rouge1/2/L)
HELD_OUT_METRICS = ("exact_match", "rouge1", "rouge2", "rougeL")
GATE_FIELDS = ("task", "metric", "min_delta")


@dataclass(frozen=True)
class JobConfig:
    """A training job's settings; `from_dict` fills the defaults. Field names are the API's."""

    adapter_id: str
    method: str
    rank: int = 8
    alpha: float = 16.0
    target_modules: tuple[str, ...] = ALL_LINEAR
    num_virtual_tokens: int = 20
    prompt_tuning_init_text: str | None = None
    epochs: int = 3
    max_steps: int | None = None  # wins over epochs
    learning_rate: float | None = None  # None: the method's default (from_dict fills it in)
    batch_size: int = 8
    max_seq_len: int = 1024
    seed: int = 0
    eval_tasks: tuple[str, ...] = ()  # lm-eval tasks scored for the base and the adapter after training
    register_if: dict[str, Any] | None = None  # {"task", "metric", "min_delta"}: the registration gate

    @classmethod
    def from_dict(cls, values: Any) -> JobConfig:
        """Validate an API config (HTTP JSON or the gRPC message as a dict); raises InvalidConfig."""
        if not isinstance(values, dict):
            raise InvalidConfig("", "the config must be a JSON object")
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise InvalidConfig(unknown[0], f"unknown field; the fields are {', '.join(sorted(known))}")
        given = {k: v for k, v in values.items() if v is not None}
        adapter_id = _adapter_id(given.get("adapter_id"))
        method = _method(given.get("method"))
        config = cls(adapter_id=adapter_id, method=method)
        updates: dict[str, Any] = {
            name: _checked(name, value) for name, value in given.items() if name in LIMITS
        }
        if "target_modules" in given:
            updates["target_modules"] = _target_modules(given["target_modules"])
        if "prompt_tuning_init_text" in given:
            updates["prompt_tuning_init_text"] = _init_text(given["prompt_tuning_init_text"])
        if "eval_tasks" in given:
            updates["eval_tasks"] = _eval_tasks(given["eval_tasks"])
        if "register_if" in given:
            updates["register_if"] = _gate(given["register_if"], updates.get("eval_tasks", ()))
        updates.setdefault("learning_rate", DEFAULT_LEARNING_RATE[method])
        return config.replace(**updates)

    def replace(self, **updates: Any) -> JobConfig:
        return type(self)(**{**asdict(self), **updates})

    def to_dict(self) -> dict[str, Any]:
        """The API's config: the fields that apply to the method (a prompt-tuning job has no rank)."""
        values = asdict(self)
        values["target_modules"] = list(self.target_modules)
        values["eval_tasks"] = list(self.eval_tasks)
        unused = {
            "rank": self.method not in RANKED_METHODS,
            "alpha": self.method not in RANKED_METHODS,
            "target_modules": self.method not in MODULE_METHODS,
            "num_virtual_tokens": self.method not in PROMPT_METHODS,
            "prompt_tuning_init_text": self.method != "prompt_tuning",
        }
        return {name: value for name, value in values.items() if not unused.get(name)}

    @property
    def peak_learning_rate(self) -> float:
        return self.learning_rate or DEFAULT_LEARNING_RATE[self.method]

    @property
    def is_ranked(self) -> bool:
        """LoRA, QLoRA or DoRA: `rank` and `alpha` apply."""
        return self.method in RANKED_METHODS


def _adapter_id(value: Any) -> str:
    if value is None or value == "":
        raise InvalidConfig("adapter_id", "is required")
    try:
        return validate_adapter_id(value)
    except InvalidAdapterId as exc:
        raise InvalidConfig("adapter_id", str(exc)) from exc


def _method(value: Any) -> str:
    if value is None or value == "":
        raise InvalidConfig("method", f"is required: one of {', '.join(METHODS)}")
    if value not in METHODS:
        raise InvalidConfig("method", f"unknown method {value!r}; use one of {', '.join(METHODS)}")
    return str(value)


def _checked(name: str, value: Any) -> int | float:
    wants_int = name not in ("alpha", "learning_rate")
    is_number = isinstance(value, int | float) and not isinstance(value, bool)
    if not is_number or (wants_int and not float(value).is_integer()) or not math.isfinite(value):
        raise InvalidConfig(name, f"must be {'an integer' if wants_int else 'a number'}, not {value!r}")
    low, high = LIMITS[name]
    if not low <= value <= high:
        raise InvalidConfig(name, f"must be between {low:g} and {high:g}, not {value!r}")
    return int(value) if wants_int else float(value)


def _target_modules(value: Any) -> tuple[str, ...]:
    if not isinstance(value, list) or not all(isinstance(m, str) for m in value):
        raise InvalidConfig("target_modules", "must be a list of module names")
    unknown = [m for m in value if m not in ALL_LINEAR]
    if unknown:
        raise InvalidConfig("target_modules", f"unknown module {unknown[0]!r}; use {', '.join(ALL_LINEAR)}")
    return tuple(dict.fromkeys(value)) or ALL_LINEAR  # empty means the default set, as in the proto


def _init_text(value: Any) -> str | None:
    if not isinstance(value, str):
        raise InvalidConfig("prompt_tuning_init_text", "must be a string")
    if len(value) > MAX_INIT_TEXT_CHARS:
        raise InvalidConfig(
            "prompt_tuning_init_text",
            f"is {len(value)} characters; at most {MAX_INIT_TEXT_CHARS} are allowed",
        )
    return value or None


def _eval_tasks(value: Any) -> tuple[str, ...]:
    if not isinstance(value, list) or not all(isinstance(t, str) for t in value):
        raise InvalidConfig("eval_tasks", "must be a list of lm-eval task names")
    if len(value) > MAX_EVAL_TASKS:
        raise InvalidConfig("eval_tasks", f"names {len(value)} tasks; at most {MAX_EVAL_TASKS} are allowed")
    bad = [t for t in value if not TASK_NAME.fullmatch(t)]
    if bad:
        raise InvalidConfig("eval_tasks", f"{bad[0]!r} is not a task name (letters, digits, _ . -)")
    return tuple(dict.fromkeys(value))


def _gate(value: Any, eval_tasks: tuple[str, ...]) -> dict[str, Any]:
    """`{"task", "metric", "min_delta"}`: register only an adapter whose metric beats the base's by
    min_delta (default 0). The task is one of eval_tasks, or "held_out" for the held-out file's scores."""
    if not isinstance(value, dict):
        raise InvalidConfig("register_if", 'must be an object {"task", "metric", "min_delta"}')
    unknown = sorted(set(value) - set(GATE_FIELDS))
    if unknown:
        raise InvalidConfig(
            f"register_if.{unknown[0]}", f"unknown field; the fields are {', '.join(GATE_FIELDS)}"
        )
    task, metric, min_delta = value.get("task"), value.get("metric"), value.get("min_delta", 0.0)
    if task != HELD_OUT and task not in eval_tasks:
        allowed = ", ".join(repr(t) for t in (*eval_tasks, HELD_OUT))
        raise InvalidConfig(
            "register_if.task", f"must be one of eval_tasks or held_out ({allowed}), not {task!r}"
        )
    if not isinstance(metric, str) or not metric:
        raise InvalidConfig("register_if.metric", "must name a metric, e.g. acc or exact_match")
    if task == HELD_OUT and metric not in HELD_OUT_METRICS:
        raise InvalidConfig("register_if.metric", f"the held-out scores are {', '.join(HELD_OUT_METRICS)}")
    is_number = isinstance(min_delta, int | float) and not isinstance(min_delta, bool)
    if not is_number or not math.isfinite(min_delta):
        raise InvalidConfig("register_if.min_delta", f"must be a number, not {min_delta!r}")
    return {"task": task, "metric": metric, "min_delta": float(min_delta)}
