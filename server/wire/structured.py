"""Structured output and the sampling options beside it, in the shapes the HTTP clients send them.

- OpenAI `response_format`: {"type": "text" | "json_object"} or {"type": "json_schema", "json_schema":
  {"name", "schema", "strict"}}; also TGI's {"type": "json" | "regex", "value"} (huggingface_hub sends it to
  /v1/chat/completions) and LoRAX's {"type": "json_object", "schema"}.
- vLLM's `structured_outputs` {"json" | "regex" | "choice" | "grammar" | "json_object"} and its older
  `guided_json`, `guided_regex`, `guided_choice`, `guided_grammar`.
- TGI's `parameters.grammar` {"type": "json" | "json_schema" | "regex", "value"}, plus adapterd's "choice"
  and "grammar" (Lark) types.
"""

from __future__ import annotations

from typing import Any

from adapterd.server.common.errors import InvalidRequest
from adapterd.server.common.protocol import Constraint, ConstraintKind, constraint
from adapterd.server.wire.params import NUMBER, field, is_token_id

VLLM_KINDS: dict[str, ConstraintKind] = {
    "json": "json_schema",
    "regex": "regex",
    "choice": "choice",
    "grammar": "grammar",
}
TGI_KINDS: dict[str, ConstraintKind] = {"json": "json_schema", "json_schema": "json_schema", **VLLM_KINDS}


def response_format(value: Any, name: str = "response_format") -> Constraint | None:
    if value is None:
        return None
    if not isinstance(value, dict):
        raise InvalidRequest(f"{name} must be an object", param=name)
    kind = value.get("type")
    if kind == "text":
        return None
    if kind == "json_object":
        schema = value.get("schema")  # LoRAX's response_format carries its schema here
        if schema is None:
            return constraint("json_object", None, name)
        return constraint("json_schema", schema, f"{name}.schema")
    if kind == "json_schema" and "json_schema" in value:
        spec = value["json_schema"]
        if not isinstance(spec, dict) or "schema" not in spec:
            raise InvalidRequest(f'{name}.json_schema must be {{"name": ..., "schema": {{...}}}}', param=name)
        return constraint("json_schema", spec["schema"], f"{name}.json_schema.schema")
    if kind in TGI_KINDS and "value" in value:
        return tgi_grammar(value, name)
    raise InvalidRequest(
        f'{name}.type must be "text", "json_object" or "json_schema" (or TGI\'s "json" / "regex" with a value)',
        param=name,
    )


def tgi_grammar(value: Any, name: str = "parameters.grammar") -> Constraint | None:
    if value is None:
        return None
    if not isinstance(value, dict) or value.get("type") not in TGI_KINDS or "value" not in value:
        kinds = " | ".join(f'"{k}"' for k in TGI_KINDS)
        raise InvalidRequest(f'{name} must be {{"type": {kinds}, "value": ...}}', param=name)
    kind, inner = TGI_KINDS[value["type"]], value["value"]
    if value["type"] == "json_schema" and isinstance(inner, dict) and "schema" in inner:
        inner = inner["schema"]  # TGI's {"type": "json_schema", "value": {"name", "schema"}}
    return constraint(kind, inner, f"{name}.value")


def vllm_structured(body: dict[str, Any]) -> list[Constraint]:
    """The constraints given the vLLM ways (normally none, or one)."""
    found = []
    outputs = field(body, "structured_outputs", dict, {})
    for key, kind in VLLM_KINDS.items():
        if outputs.get(key) is not None:
            found.append(constraint(kind, outputs[key], f"structured_outputs.{key}"))
        if body.get(f"guided_{key}") is not None:
            found.append(constraint(kind, body[f"guided_{key}"], f"guided_{key}"))
    if outputs.get("json_object"):
        found.append(constraint("json_object", None, "structured_outputs.json_object"))
    return found


def one_constraint(*candidates: Constraint | list[Constraint] | None) -> Constraint | None:
    found: list[Constraint] = []
    for candidate in candidates:
        found.extend(candidate if isinstance(candidate, list) else [candidate] if candidate else [])
    if len(found) > 1:
        names = ", ".join(c.field for c in found)
        raise InvalidRequest(
            f"give one structured-output constraint, not several ({names})", param=found[1].field
        )
    return found[0] if found else None


def logit_bias(value: Any, name: str = "logit_bias") -> tuple[tuple[int, float], ...] | None:
    """OpenAI's {"token id": bias} (keys are strings in JSON; integers are taken too)."""
    if value is None:
        return None
    if not isinstance(value, dict):
        raise InvalidRequest(f"{name} must be an object of token id -> bias", param=name)
    biases = []
    for key, bias in value.items():
        try:
            token_id = int(key)
        except (TypeError, ValueError):
            raise InvalidRequest(f"{name}: {key!r} is not a token id", param=name) from None
        if isinstance(bias, bool) or not isinstance(bias, NUMBER):
            raise InvalidRequest(f"{name}[{key}] must be a number", param=name)
        biases.append((token_id, float(bias)))
    return tuple(biases)


def token_id_list(value: Any, name: str) -> tuple[int, ...] | None:
    if value is None:
        return None
    if not isinstance(value, list) or not all(is_token_id(t) for t in value):
        raise InvalidRequest(f"{name} must be a list of token ids", param=name)
    return tuple(value)


def sampling_extras(body: dict[str, Any], prefix: str = "", min_tokens: str = "min_tokens") -> dict[str, Any]:
    """logit_bias, min_tokens, stop_token_ids, presence_penalty and frequency_penalty, as SamplingParams
    values (None where not given). `prefix` names where they sit in the body (TGI: "parameters.")."""
    return {
        "logit_bias": logit_bias(body.get("logit_bias"), f"{prefix}logit_bias"),
        "min_tokens": field(body, min_tokens, int),
        "stop_token_ids": token_id_list(body.get("stop_token_ids"), f"{prefix}stop_token_ids"),
        "presence_penalty": field(body, "presence_penalty", NUMBER),
        "frequency_penalty": field(body, "frequency_penalty", NUMBER),
    }
