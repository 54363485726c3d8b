"""Varied JSON schemas and regular expressions for the structured-output tests: nested objects, arrays,
enums, bounded numbers, required and optional properties, $ref, formats. Free strings carry a maxLength and
arrays a maxItems, so that a tiny random model (whose every allowed token is about equally likely) finishes
each output well inside the tests' token budget."""

from __future__ import annotations

from typing import Any

S = {"type": "string", "maxLength": 12}
INT = {"type": "integer", "minimum": -50, "maximum": 50}


def _object(properties: dict[str, Any], required: list[str] | None = None, **more: Any) -> dict[str, Any]:
    return {
        "type": "object",
        "properties": properties,
        "required": list(properties) if required is None else required,
        "additionalProperties": False,
        **more,
    }


SCHEMAS: list[dict[str, Any]] = [
    S,
    INT,
    {"type": "boolean"},
    {"type": "null"},
    {"type": "number", "minimum": 0, "maximum": 1},
    {"type": "integer", "minimum": 100, "maximum": 999},
    {"type": "integer", "exclusiveMinimum": 0, "exclusiveMaximum": 10},
    {"enum": ["red", "green", "blue"]},
    {"enum": [1, 2, "three", None, True]},
    {"const": "fixed"},
    {"type": "string", "pattern": "^[A-Z]{2}[0-9]{3}$"},
    {"type": "string", "minLength": 3, "maxLength": 5},
    {"type": "string", "format": "date"},
    {"type": "string", "format": "uuid"},
    {"type": "string", "format": "email", "maxLength": 30},
    {"type": "array", "items": INT, "maxItems": 4},
    {"type": "array", "items": {"enum": ["a", "b"]}, "minItems": 2, "maxItems": 3},
    {"type": "array", "items": S, "minItems": 1, "maxItems": 2},
    {"type": "array", "prefixItems": [INT, S, {"type": "boolean"}], "items": False},
    _object({"name": S, "age": {"type": "integer", "minimum": 0, "maximum": 120}}),
    _object({"name": S, "nickname": S}, required=["name"]),
    _object({"id": INT, "tags": {"type": "array", "items": S, "maxItems": 3}}),
    _object({"point": _object({"x": INT, "y": INT})}),
    _object({"a": _object({"b": _object({"c": {"type": "boolean"}})})}),
    _object({"status": {"enum": ["open", "closed"]}, "count": INT}),
    _object({"value": {"anyOf": [INT, S, {"type": "null"}]}}),
    _object({"kind": {"const": "circle"}, "radius": {"type": "number", "minimum": 0, "maximum": 10}}),
    _object({"items": {"type": "array", "items": _object({"sku": S, "qty": INT}), "maxItems": 2}}),
    _object({"ok": {"type": "boolean"}, "error": {"anyOf": [S, {"type": "null"}]}}, required=["ok"]),
    _object({}, required=[]),
    _object({"x": INT}, required=[], minProperties=0),
    {"oneOf": [_object({"cat": S}), _object({"dog": INT})]},
    {"allOf": [_object({"a": INT}, required=["a"])]},
    {
        "$defs": {"person": _object({"name": S, "age": INT})},
        "type": "object",
        "properties": {"author": {"$ref": "#/$defs/person"}, "editor": {"$ref": "#/$defs/person"}},
        "required": ["author"],
        "additionalProperties": False,
    },
    {
        "$defs": {"colour": {"enum": ["cyan", "magenta"]}},
        "type": "array",
        "items": {"$ref": "#/$defs/colour"},
        "maxItems": 3,
    },
    {
        "$defs": {
            "node": _object({"value": INT, "next": {"anyOf": [{"$ref": "#/$defs/node"}, {"type": "null"}]}})
        },
        "$ref": "#/$defs/node",
    },
    _object({"date": {"type": "string", "format": "date"}, "priority": {"enum": [1, 2, 3]}}),
    _object(
        {"matrix": {"type": "array", "items": {"type": "array", "items": INT, "maxItems": 2}, "maxItems": 2}}
    ),
    _object({"title": {"type": "string", "minLength": 1, "maxLength": 8}, "draft": {"type": "boolean"}}),
    _object({"percent": {"type": "number", "minimum": 0, "maximum": 100}}),
    _object({"code": {"type": "string", "pattern": "^[a-f0-9]{4}$"}}),
    _object({"meta": _object({"k1": INT, "k2": S}, required=[], maxProperties=1)}),
]

REGEXES: list[str] = [
    r"[0-9]{3}-[0-9]{4}",
    r"(yes|no|maybe)",
    r"[a-z]{2,6}",
    r"\d+\.\d{2}",
    r"(true|false)",
    r"[A-Z][a-z]{1,5} [A-Z][a-z]{1,5}",
    r"#[0-9a-fA-F]{6}",
    r"(19|20)[0-9]{2}-(0[1-9]|1[0-2])-(0[1-9]|[12][0-9]|3[01])",
    r"[a-z]{1,8}@[a-z]{1,8}\.(com|org)",
    r"(GET|POST) /[a-z]{1,6}",
    r"-?[1-9][0-9]{0,3}",
    r"\(\d{1,3}(, \d{1,3}){0,3}\)",
]
