"""Reading JSON request bodies into protocol types, with a clear 400 for anything malformed."""

from __future__ import annotations

import json
from typing import Any

from starlette.requests import Request

from adapterd.server.common.errors import InvalidRequest
from adapterd.server.host.tools import ToolStyle, calls_text

NUMBER = (int, float)


async def json_body(request: Request) -> dict[str, Any]:
    try:
        body = json.loads(await request.body() or b"null")
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise InvalidRequest(f"the body is not valid JSON: {exc}") from exc
    if not isinstance(body, dict):
        raise InvalidRequest("the body must be a JSON object")
    return body


def field(body: dict[str, Any], name: str, kind: type | tuple[type, ...], default: Any = None) -> Any:
    value = body.get(name, default)
    if value is None:
        return default
    if isinstance(value, bool) and bool not in (kind if isinstance(kind, tuple) else (kind,)):
        raise InvalidRequest(f"{name} must be a {_kind_name(kind)}, not a boolean")
    if not isinstance(value, kind):
        raise InvalidRequest(f"{name} must be a {_kind_name(kind)}")
    return value


def is_token_id(value: Any) -> bool:
    """A JSON integer (not a boolean): a token id's type, whether or not it lies in the vocabulary."""
    return isinstance(value, int) and not isinstance(value, bool)


def _kind_name(kind: type | tuple[type, ...]) -> str:
    return "number" if kind == NUMBER else getattr(kind, "__name__", "value")


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
