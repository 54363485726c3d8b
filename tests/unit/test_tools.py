"""Tool calls read back from an output, in both styles, and never a crash on output that is not calls."""

from __future__ import annotations

import json

import pytest

from adapterd.server.common.errors import InvalidRequest
from adapterd.server.host.tools import calls_text, parse_functions, parse_tool_choice, tool_style

TOOLS = [
    {"type": "function", "function": {"name": "f", "parameters": {"type": "object"}}},
    {"type": "function", "function": {"name": "g"}},
]
FUNCTIONS = parse_functions(TOOLS)
EARLIER = [{"id": "1", "type": "function", "function": {"name": "f", "arguments": '{"a": 1}'}}]


@pytest.mark.parametrize("style", ["json", "hermes"])
def test_calls_written_as_the_model_writes_them_read_back(style: str) -> None:
    choice = parse_tool_choice(FUNCTIONS, "required", style)  # type: ignore[arg-type]
    assert choice is not None
    assert choice.calls(calls_text(EARLIER * 2, "m", style)) == [("f", '{"a": 1}')] * 2  # type: ignore[arg-type]


@pytest.mark.parametrize(
    "text",
    [
        "hello",
        "[1, 2]",
        '[{"name": "f"',
        '[{"arguments": {}}]',
        "[]",
        '{"name": "f"}',
        "<tool_call>\n{\n</tool_call>",
    ],
)
@pytest.mark.parametrize("style", ["json", "hermes"])
def test_output_that_is_not_calls_is_text(style: str, text: str) -> None:
    choice = parse_tool_choice(FUNCTIONS, "auto", style)  # type: ignore[arg-type]
    assert choice is not None and choice.calls(text) is None


def test_a_named_function_answers_with_its_arguments() -> None:
    choice = parse_tool_choice(FUNCTIONS, {"type": "function", "function": {"name": "g"}})
    assert choice is not None and choice.calls('{"x": 2}') == [("g", '{"x": 2}')]
    assert choice.calls('{"x": ') is None
    assert json.loads(choice.constraint().value) == {"type": "object", "properties": {}}  # no parameters


def test_tool_choice_none_and_bad_choices() -> None:
    assert parse_tool_choice(FUNCTIONS, "none") is None
    for bad in ("sometimes", {"type": "function"}, {"type": "function", "function": {"name": "h"}}):
        with pytest.raises(InvalidRequest):
            parse_tool_choice(FUNCTIONS, bad)
    with pytest.raises(InvalidRequest, match="unique"):
        parse_functions(TOOLS + TOOLS[:1])


def test_the_style_follows_the_chat_template() -> None:
    assert tool_style("{% for tool in tools %}...<tool_call>{% endfor %}") == "hermes"
    assert tool_style("{% for m in messages %}{{ m.content }}{% endfor %}") == "json"
    assert tool_style(None) == "json"
