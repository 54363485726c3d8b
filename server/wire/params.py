"""Reading JSON request bodies into protocol types, with a clear 400 for anything malformed."""

from __future__ import annotations

import json
import math
from collections.abc import AsyncIterator
from typing import Any

from starlette.requests import Request

from adapterd.server.common.config import MAX_JSON_BODY_BYTES, MAX_JSON_DEPTH, MAX_JSON_INTEGER_DIGITS
from adapterd.server.common.errors import InvalidRequest, PayloadTooLarge
from adapterd.server.host.tools import ToolStyle, calls_text

NUMBER = (int, float)


async def body_chunks(request: Request, max_bytes: int, noun: str) -> AsyncIterator[bytes]:
    """The request's body as it arrives; PayloadTooLarge (413) once it passes `max_bytes`, or before any of
    it is read when its Content-Length says so. `noun` names the body in the message ("upload")."""
    declared = request.headers.get("content-length")
    if declared and declared.isdigit() and int(declared) > max_bytes:
        raise PayloadTooLarge(f"{noun} of {declared} bytes exceeds the {max_bytes}-byte limit")
    size = 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > max_bytes:
            raise PayloadTooLarge(f"{noun} exceeds the {max_bytes}-byte limit")
        yield chunk


async def json_body(request: Request) -> dict[str, Any]:
    """The request's JSON object, read up to MAX_JSON_BODY_BYTES (413 beyond) and parsed by `parse_json`."""
    data = b"".join([chunk async for chunk in body_chunks(request, MAX_JSON_BODY_BYTES, "the body")])
    body = parse_json(data or b"null")
    if not isinstance(body, dict):
        raise InvalidRequest("the body must be a JSON object")
    return body


def parse_json(data: bytes | str, what: str = "the body") -> Any:
    """Standard JSON (no NaN or Infinity) within MAX_JSON_DEPTH levels and MAX_JSON_INTEGER_DIGITS-digit
    integers, every number finite and every string valid Unicode; InvalidRequest naming the problem."""
    try:
        value = json.loads(data, parse_constant=_not_json, parse_int=_integer, parse_float=_finite)
    except RecursionError as exc:
        raise InvalidRequest(f"{what}: nested more than {MAX_JSON_DEPTH} levels deep") from exc
    except UnicodeDecodeError as exc:
        raise InvalidRequest(f"{what}: not UTF-8 text") from exc
    except ValueError as exc:  # json.JSONDecodeError, and what the hooks refuse
        raise InvalidRequest(f"{what}: not valid JSON ({exc})") from exc
    _check_parsed(value, what)
    return value


def _not_json(constant: str) -> Any:
    raise ValueError(f"{constant} is not a JSON value (NaN and Infinity are not standard JSON)")


def _integer(text: str) -> int:
    if len(text.lstrip("-")) > MAX_JSON_INTEGER_DIGITS:
        raise ValueError(f"an integer of more than {MAX_JSON_INTEGER_DIGITS} digits")
    return int(text)


def _finite(text: str) -> float:
    value = float(text)
    if not math.isfinite(value):
        raise ValueError(f"the number {text[:40]} is out of range")
    return value


def _check_parsed(value: Any, what: str) -> None:
    """Depth and strings of a parsed value, without recursion (the value may be deep)."""
    pending = [(value, 1)]
    while pending:
        item, depth = pending.pop()
        if isinstance(item, str):
            _check_text(item, what)
        elif isinstance(item, (list, dict)):
            if depth > MAX_JSON_DEPTH:
                raise InvalidRequest(f"{what}: nested more than {MAX_JSON_DEPTH} levels deep")
            if isinstance(item, dict):
                for key in item:
                    _check_text(key, what)
            pending.extend(
                (child, depth + 1) for child in (item.values() if isinstance(item, dict) else item)
            )


def _check_text(text: str, what: str) -> None:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as exc:
        raise InvalidRequest(
            f"{what}: holds a string that is not valid Unicode (a lone surrogate such as \\ud800)"
        ) from exc


def field(body: dict[str, Any], name: str, kind: type | tuple[type, ...], default: Any = None) -> Any:
    value = body.get(name, default)
    if value is None:
        return default
    if isinstance(value, bool) and bool not in (kind if isinstance(kind, tuple) else (kind,)):
        raise InvalidRequest(f"{name} must be {_kind_name(kind)}, not a boolean")
    if not isinstance(value, kind):
        raise InvalidRequest(f"{name} must be {_kind_name(kind)}")
    return value


def is_token_id(value: Any) -> bool:
    """A JSON integer (not a boolean): a token id's type, whether or not it lies in the vocabulary."""
    return isinstance(value, int) and not isinstance(value, bool)


KIND_NAMES = {int: "an integer", str: "a string", bool: "a boolean", dict: "an object", list: "a list"}


def _kind_name(kind: type | tuple[type, ...]) -> str:
    """The JSON kind in words: "an integer", "a number", "a string", ..."""
    if kind == NUMBER:
        return "a number"
    return KIND_NAMES.get(kind, "a value") if isinstance(kind, type) else "a value"


def stop_list(value: Any, name: str = "stop") -> tuple[str, ...]:
    if value is None:
        return ()
    stops = [value] if isinstance(value, str) else value
    if not isinstance(stops, list) or not all(isinstance(s, str) for s in stops):
        raise InvalidRequest(f"{name} must be a string or a list of strings")
    return tuple(stops)


def messages_field(value: Any, tool_style: ToolStyle = "json") -> tuple[dict[str, str], ...]:
    """OpenAI chat messages; content may be a string or a list of text parts; an assistant turn's earlier
    tool_calls become its text, written as the model writes calls (`tool_style`)."""
    if not isinstance(value, list) or not value:
        raise InvalidRequest("messages must be a non-empty list")
    return tuple(_message(m, i, tool_style) for i, m in enumerate(value))


def _message(message: Any, index: int, tool_style: ToolStyle) -> dict[str, str]:
    if not isinstance(message, dict) or not isinstance(message.get("role"), str):
        raise InvalidRequest(f"messages[{index}] must be an object with a string role")
    content = message.get("content")
    if message.get("tool_calls") and not content:  # an assistant turn that called tools
        return {
            "role": message["role"],
            "content": calls_text(message["tool_calls"], f"messages[{index}]", tool_style),
        }
    if isinstance(content, list):
        parts = [p.get("text") for p in content if isinstance(p, dict) and p.get("type") == "text"]
        if len(parts) != len(content) or not all(isinstance(p, str) for p in parts):
            raise InvalidRequest(f"messages[{index}].content: only text parts are supported")
        content = "".join(parts)  # type: ignore[arg-type]
    if not isinstance(content, str):
        raise InvalidRequest(f"messages[{index}].content must be a string")
    return {"role": message["role"], "content": content}
