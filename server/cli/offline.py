"""`adapterd run`: offline batch inference over JSONL, without a server.

Each input line: {"id", "prompt" | "messages", "adapter_id"?, "max_new_tokens"?, "temperature"?, "top_p"?,
"top_k"?, "seed"?, "stop"?, "repetition_penalty"?, "ignore_eos"?, "logit_bias"? ({"token id": bias}),
"min_tokens"?, "stop_token_ids"?, "presence_penalty"?, "frequency_penalty"?} and at most one structured
output: "json_schema" (an object), "json_object": true, "regex", "grammar" (Lark) or "choice" (a list of
strings); each output line: {"id", "text", "token_ids", "finish_reason", "prompt_tokens"}.
The whole file is validated before the model loads; problems are reported with their line numbers.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from adapterd.server.common.errors import InvalidRequest
from adapterd.server.common.protocol import (
    Completion,
    ConstraintKind,
    GenerateRequest,
    SamplingParams,
    constraint,
)
from adapterd.server.wire.structured import logit_bias, one_constraint, token_id_list

PARAM_TYPES: dict[str, tuple[type, ...]] = {
    "max_new_tokens": (int,),
    "temperature": (int, float),
    "top_p": (int, float),
    "top_k": (int,),
    "seed": (int,),
    "repetition_penalty": (int, float),
    "min_tokens": (int,),
    "presence_penalty": (int, float),
    "frequency_penalty": (int, float),
}
STRUCTURED: tuple[ConstraintKind, ...] = ("json_schema", "json_object", "regex", "grammar", "choice")
EXTRA_FIELDS = ("ignore_eos", "logit_bias", "stop_token_ids")
KNOWN_FIELDS = {"id", "prompt", "messages", "adapter_id", "stop", *PARAM_TYPES, *STRUCTURED, *EXTRA_FIELDS}


class InputError(ValueError):
    """Problems in the input file, one line each, with line numbers."""


@dataclass(frozen=True)
class Job:
    id: Any
    request: GenerateRequest


def read_jobs(path: Path) -> list[Job]:
    jobs, problems = [], []
    with path.open(encoding="utf-8") as lines:
        for number, line in enumerate(lines, start=1):
            if not line.strip():
                continue
            try:
                jobs.append(parse_line(line))
            except (ValueError, TypeError) as exc:
                problems.append(f"line {number}: {exc}")
    if problems:
        raise InputError("\n".join(problems))
    return jobs


def parse_line(line: str) -> Job:
    record = json.loads(line)
    if not isinstance(record, dict):
        raise ValueError("each line must be a JSON object")
    unknown = sorted(set(record) - KNOWN_FIELDS)
    if unknown:
        raise ValueError(f"unknown field(s) {unknown}")
    if "id" not in record:
        raise ValueError("missing field 'id'")
    return Job(
        record["id"],
        GenerateRequest(
            prompt=_typed(record, "prompt", str),
            messages=_messages(record.get("messages")),
            adapter_id=_typed(record, "adapter_id", str),
            params=sampling_params(record),
        ),
    )


def sampling_params(record: dict[str, Any]) -> SamplingParams:
    params: dict[str, Any] = {}
    for name, types in PARAM_TYPES.items():
        value = record.get(name)
        if value is None:
            continue
        if isinstance(value, bool) or not isinstance(value, types):
            raise ValueError(f"{name} must be a number" if float in types else f"{name} must be an integer")
        params[name] = value
    stop = record.get("stop")
    if stop is not None:
        stop = [stop] if isinstance(stop, str) else stop
        if not isinstance(stop, list) or not all(isinstance(s, str) for s in stop):
            raise ValueError("stop must be a string or a list of strings")
        params["stop"] = tuple(stop)
    if record.get("ignore_eos") is not None:
        params["ignore_eos"] = _typed(record, "ignore_eos", bool)
    try:
        params["logit_bias"] = logit_bias(record.get("logit_bias")) or ()
        params["stop_token_ids"] = token_id_list(record.get("stop_token_ids"), "stop_token_ids") or ()
        given = [name for name in STRUCTURED if record.get(name) not in (None, False)]
        params["constraint"] = one_constraint([constraint(name, record[name], name) for name in given])
    except InvalidRequest as exc:
        raise ValueError(str(exc)) from exc
    return SamplingParams(**params)


def _typed(record: dict[str, Any], name: str, kind: type) -> Any:
    value = record.get(name)
    if value is not None and not isinstance(value, kind):
        raise ValueError(f"{name} must be a {kind.__name__}")
    return value


def _messages(value: Any) -> tuple[dict[str, str], ...] | None:
    if value is None:
        return None
    ok = (
        isinstance(value, list)
        and value
        and all(
            isinstance(m, dict) and isinstance(m.get("role"), str) and isinstance(m.get("content"), str)
            for m in value
        )
    )
    if not ok:
        raise ValueError("messages must be a non-empty list of {role, content} objects")
    return tuple({"role": m["role"], "content": m["content"]} for m in value)


def result_line(job_id: Any, completion: Completion) -> str:
    record = {
        "id": job_id,
        "text": completion.text,
        "token_ids": list(completion.token_ids),
        "finish_reason": completion.finish_reason,
        "prompt_tokens": completion.prompt_tokens,
    }
    return json.dumps(record, ensure_ascii=False)


def adapter_dirs(root: Path) -> Iterable[tuple[str, Path]]:
    """One PEFT directory per adapter id: DIR/<id>/ or, for tenant ids, DIR/<tenant>/<name>/."""
    for config in sorted(root.glob("*/adapter_config.json")) + sorted(root.glob("*/*/adapter_config.json")):
        yield config.parent.relative_to(root).as_posix(), config.parent
