"""Tool calls, whatever the front end: the functions a request offers, the constraint that makes the model
call them, how the model is shown them, and the calls read back.

Two styles. A chat template that renders `tools` and writes calls as `<tool_call>{"name", "arguments"}
</tool_call>` (Hermes, Qwen 2.5 and 3, and their fine-tunes) gets the tools through the template and is held
to that format ("hermes"). Any other model is shown the tools in its system turn and writes calls as a JSON
array `[{"name": ..., "arguments": {...}}, ...]` ("json"). Either way each `arguments` is constrained to its
function's parameter schema: `required` must answer with calls, a named function answers with that
function's arguments only, and `auto` answers with calls or with plain text (which may not start with `[`,
or with `<` in the hermes style).
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from typing import Any, Literal

from adapterd.server.common.errors import InvalidRequest
from adapterd.server.common.protocol import Constraint, constraint
from adapterd.server.engine.grammar import lark_json

NAME = re.compile(r"^[A-Za-z0-9_-]{1,64}$")  # OpenAI's rule for function names
NO_PARAMETERS = {"type": "object", "properties": {}}
ToolMode = Literal["auto", "required", "named"]
ToolStyle = Literal["json", "hermes"]
HERMES_CALL = re.compile(r"<tool_call>\s*(.*?)\s*</tool_call>", re.DOTALL)


def tool_style(chat_template: Any) -> ToolStyle:
    """Hermes style for a chat template that renders tools and writes calls in <tool_call> tags."""
    text = chat_template if isinstance(chat_template, str) else ""
    return "hermes" if "<tool_call>" in text and "tools" in text else "json"


@dataclass(frozen=True)
class Function:
    name: str
    description: str
    parameters: dict[str, Any]

    def definition(self) -> dict[str, Any]:
        """OpenAI's shape, as chat templates with tool support expect it."""
        return {
            "type": "function",
            "function": {"name": self.name, "description": self.description, "parameters": self.parameters},
        }


@dataclass(frozen=True)
class ToolChoice:
    functions: tuple[Function, ...]
    mode: ToolMode
    named: str | None = None  # the function a "named" choice calls
    style: ToolStyle = "json"
    parallel: bool = True  # OpenAI's parallel_tool_calls: false allows one call only

    def constraint(self) -> Constraint:
        if self.mode == "named":
            [function] = [f for f in self.functions if f.name == self.named]
            return constraint("json_schema", function.parameters, f"tools[{self.named}].function.parameters")
        if self.style == "hermes":
            call = lark_json(self.call_schema())
            more = ' ("\\n" call)*' if self.parallel else ""
            calls = f'calls: call{more}\ncall: "<tool_call>\\n" {call} "\\n</tool_call>"'
            start = (
                "start: calls" if self.mode == "required" else "start: calls | text\ntext: /[^<\\s](.|\\n)*/"
            )
            return Constraint("grammar", f"{start}\n{calls}", "tools")
        if self.mode == "required":
            return Constraint("json_schema", json.dumps(self.calls_schema()), "tools")
        calls = lark_json(self.calls_schema())
        return Constraint(
            "grammar", f"start: calls | text\ncalls: {calls}\ntext: /[^\\[\\s](.|\\n)*/", "tools"
        )

    def messages(self, messages: tuple[dict[str, str], ...]) -> tuple[dict[str, str], ...]:
        """The conversation as the model sees it: with the tool prompt in its system turn (json style)."""
        return messages if self.style == "hermes" else with_tool_prompt(messages, self)

    def template_tools(self) -> tuple[dict[str, Any], ...]:
        """The function definitions for the chat template to render (hermes style), else none."""
        return tuple(f.definition() for f in self.functions) if self.style == "hermes" else ()

    def call_schema(self) -> dict[str, Any]:
        """One call of any of the functions: {"name": its name, "arguments": its parameter schema}."""
        return {"anyOf": [_call_schema(f) for f in self.functions]}

    def calls_schema(self) -> dict[str, Any]:
        return {
            "type": "array",
            "minItems": 1,
            **({} if self.parallel else {"maxItems": 1}),
            "items": self.call_schema(),
        }

    def prompt(self) -> str:
        """The system prompt that shows the tools to a model whose chat template does not."""
        listed = "\n".join(json.dumps(f.definition()["function"]) for f in self.functions)
        if self.mode == "named":
            how = f"Call the function {self.named}: answer with only its arguments, as a JSON object."
        else:
            how = (
                'To call functions, answer with only a JSON array of calls: [{"name": <function name>, '
                '"arguments": {<argument name>: <value>}}].'
            )
            if self.mode == "auto":
                how += " If no function helps, answer in plain text."
        return f"You can call these functions:\n{listed}\n{how}"

    def calls(self, text: str) -> list[tuple[str, str]] | None:
        """The (name, arguments JSON) calls the output makes; None when it is plain text or cut short."""
        try:
            if self.mode == "named":
                json.loads(text)
                return [(self.named or "", text)]
            if self.style == "hermes":
                calls = [json.loads(body) for body in HERMES_CALL.findall(text)]
            else:
                calls = json.loads(text)
            if not isinstance(calls, list) or not calls:
                return None
            return [(str(call["name"]), json.dumps(call["arguments"])) for call in calls]
        except (ValueError, TypeError, KeyError):  # cut short (length, a stop string) or not calls at all
            return None


def _call_schema(function: Function) -> dict[str, Any]:
    return {
        "type": "object",
        "properties": {"name": {"const": function.name}, "arguments": function.parameters},
        "required": ["name", "arguments"],
        "additionalProperties": False,
    }


def parse_functions(tools: Any) -> tuple[Function, ...]:
    """OpenAI's `tools`: a list of {"type": "function", "function": {name, description?, parameters?}}."""
    if not isinstance(tools, list) or not tools:
        raise InvalidRequest("tools must be a non-empty list", param="tools")
    functions = []
    for i, tool in enumerate(tools):
        spec = tool.get("function") if isinstance(tool, dict) and tool.get("type") == "function" else None
        if not isinstance(spec, dict):
            raise InvalidRequest(
                f'tools[{i}] must be {{"type": "function", "function": {{...}}}}', param="tools"
            )
        name, parameters = spec.get("name"), spec.get("parameters", NO_PARAMETERS)
        if not isinstance(name, str) or not NAME.match(name):
            raise InvalidRequest(f"tools[{i}].function.name must match {NAME.pattern}", param="tools")
        if not isinstance(parameters, dict):
            raise InvalidRequest(
                f"tools[{i}].function.parameters must be a JSON schema object", param="tools"
            )
        description = spec.get("description") or ""
        functions.append(Function(name, str(description), parameters))
    if len({f.name for f in functions}) < len(functions):
        raise InvalidRequest("tools: function names must be unique", param="tools")
    return tuple(functions)


def parse_tool_choice(
    functions: tuple[Function, ...], choice: Any, style: ToolStyle = "json", parallel: bool = True
) -> ToolChoice | None:
    """OpenAI's `tool_choice`: "none" (None here), "auto" (the default), "required" or
    {"type": "function", "function": {"name": ...}}."""
    if choice is None or choice == "auto":
        return ToolChoice(functions, "auto", style=style, parallel=parallel)
    if choice == "none":
        return None
    if choice == "required":
        return ToolChoice(functions, "required", style=style, parallel=parallel)
    name = choice.get("function", {}).get("name") if isinstance(choice, dict) else None
    if not isinstance(name, str):
        raise InvalidRequest(
            'tool_choice must be "none", "auto", "required" or {"type": "function", "function": {"name": ...}}',
            param="tool_choice",
        )
    if name not in {f.name for f in functions}:
        raise InvalidRequest(f"tool_choice names {name!r}, which is not in tools", param="tool_choice")
    return ToolChoice(functions, "named", name, style, parallel)


def with_tool_prompt(messages: tuple[dict[str, str], ...], choice: ToolChoice) -> tuple[dict[str, str], ...]:
    """The messages with the tool prompt in their system turn (a new first turn if they have none)."""
    first, *rest = messages
    if first["role"] == "system":
        return ({**first, "content": f"{first['content']}\n\n{choice.prompt()}"}, *rest)
    return ({"role": "system", "content": choice.prompt()}, *messages)


def calls_text(tool_calls: Any, where: str, style: ToolStyle = "json") -> str:
    """An assistant turn's earlier `tool_calls` (OpenAI's shape) written as the model writes calls."""
    if not isinstance(tool_calls, list):
        raise InvalidRequest(f"{where}.tool_calls must be a list", param="messages")
    calls = []
    for call in tool_calls:
        function = call.get("function") if isinstance(call, dict) else None
        if not isinstance(function, dict) or not isinstance(function.get("name"), str):
            raise InvalidRequest(f"{where}.tool_calls: each needs a function with a name", param="messages")
        try:
            arguments = json.loads(function.get("arguments") or "{}")
        except (TypeError, ValueError) as exc:
            raise InvalidRequest(
                f"{where}.tool_calls: arguments must be JSON text", param="messages"
            ) from exc
        calls.append({"name": function["name"], "arguments": arguments})
    if style == "hermes":
        return "\n".join(f"<tool_call>\n{json.dumps(call)}\n</tool_call>" for call in calls)
    return json.dumps(calls)
