"""Training data: JSONL validated line by line, tokenized as the server tokenizes, split for evaluation.

Each line is `{"prompt": str, "completion": str}` or `{"messages": [{"role", "content"}, ...]}` whose last
message is the assistant's answer. The prompt tokens are exactly what the server feeds the model for the
same request (`LLM.encode`: a plain prompt tokenized as is, messages through `encode_chat`); the completion's
tokens and the end-of-sequence token follow, and only they carry a loss.
"""

from __future__ import annotations

import json
import random
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from typing import Any

from adapterd.server.model.tokenizer import encode_chat
from adapterd.server.trainer.errors import InvalidData

IGNORE_INDEX = -100  # labels that carry no loss (torch's cross_entropy default)
MAX_PROBLEMS_SHOWN = 10
ROLES = ("system", "user", "assistant", "tool")
MAX_HELD_OUT = 100


@dataclass(frozen=True)
class Example:
    """One line: the request the server would see (a prompt or chat messages) and the reference answer."""

    line: int
    completion: str
    prompt: str | None = None
    messages: tuple[dict[str, str], ...] | None = None  # the conversation before the answer

    def request_kwargs(self) -> dict[str, Any]:
        """The `GenerateRequest` fields that reproduce this example's prompt."""
        return {"prompt": self.prompt} if self.messages is None else {"messages": self.messages}


@dataclass(frozen=True)
class TokenizedExample:
    input_ids: list[int]  # prompt then completion then eos
    labels: list[int]  # IGNORE_INDEX on the prompt, the token ids on the completion and eos


def read_examples(lines: Iterable[bytes], name: str = "data") -> list[Example]:
    """Parse and validate a whole JSONL file; raises InvalidData listing the bad lines by number."""
    examples, problems = [], []
    for number, raw in enumerate(lines, start=1):
        if not raw.strip():
            continue
        try:
            examples.append(parse_line(raw, number))
        except ValueError as exc:
            problems.append(f"line {number}: {exc}")
    if problems:
        raise InvalidData(name, problems[:MAX_PROBLEMS_SHOWN], len(problems))
    if not examples:
        raise InvalidData(name, ["the file has no examples"])
    return examples


def parse_line(raw: bytes | str, number: int) -> Example:
    try:
        record = json.loads(raw)
    except UnicodeDecodeError as exc:
        raise ValueError("not UTF-8 text") from exc
    except json.JSONDecodeError as exc:
        raise ValueError(f"not valid JSON ({exc.msg} at column {exc.colno})") from exc
    if not isinstance(record, dict):
        raise ValueError('expected a JSON object with "prompt" and "completion", or "messages"')
    has_prompt, has_messages = "prompt" in record or "completion" in record, "messages" in record
    if has_prompt and has_messages:
        raise ValueError('give either "prompt" and "completion" or "messages", not both')
    if has_messages:
        return _chat_example(record["messages"], number)
    if not has_prompt:
        raise ValueError('expected "prompt" and "completion", or "messages"')
    prompt, completion = record.get("prompt"), record.get("completion")
    return Example(number, _text(completion, '"completion"'), prompt=_text(prompt, '"prompt"'))


def _chat_example(messages: Any, number: int) -> Example:
    if not isinstance(messages, list) or len(messages) < 2:
        raise ValueError('"messages" must be a list of at least two messages, the last one the answer')
    for index, message in enumerate(messages):
        if not isinstance(message, dict) or set(message) - {"role", "content"}:
            raise ValueError(f'messages[{index}] must be an object with only "role" and "content"')
        if message.get("role") not in ROLES:
            raise ValueError(f"messages[{index}].role must be one of {', '.join(ROLES)}")
        _text(message.get("content"), f"messages[{index}].content", allow_empty=True)
    if messages[-1]["role"] != "assistant":
        raise ValueError('the last message must be the assistant\'s answer (role "assistant")')
    answer = _text(messages[-1]["content"], f"messages[{len(messages) - 1}].content")
    context = tuple({"role": m["role"], "content": m["content"]} for m in messages[:-1])
    return Example(number, answer, messages=context)


def _text(value: Any, name: str, allow_empty: bool = False) -> str:
    if value is None:
        raise ValueError(f"{name} is missing")
    if not isinstance(value, str):
        raise ValueError(f"{name} must be a string, not {type(value).__name__}")
    if not allow_empty and not value.strip():
        raise ValueError(f"{name} must not be empty")
    return value


def prompt_ids(tokenizer: Any, example: Example) -> list[int]:
    """The prompt's tokens exactly as the server encodes the same request (see `LLM.encode`)."""
    if example.messages is not None:
        return encode_chat(tokenizer, list(example.messages))
    return list(tokenizer(example.prompt).input_ids)


def completion_ids(tokenizer: Any, example: Example, eos_token_id: int) -> list[int]:
    return [*tokenizer(example.completion, add_special_tokens=False).input_ids, eos_token_id]


def tokenize(tokenizer: Any, example: Example, eos_token_id: int, max_seq_len: int) -> TokenizedExample:
    """Prompt + completion + eos, cut to `max_seq_len`; the loss falls on the completion and eos only."""
    prompt = prompt_ids(tokenizer, example)
    completion = completion_ids(tokenizer, example, eos_token_id)
    input_ids = (prompt + completion)[:max_seq_len]
    labels = ([IGNORE_INDEX] * len(prompt) + completion)[:max_seq_len]
    return TokenizedExample(input_ids, labels)


def split_held_out(
    examples: list[Example], eval_examples: list[Example] | None, seed: int
) -> tuple[list[Example], list[Example]]:
    """(train, held out): the eval file when given, else a seeded 10% of the data (1 to 100 examples)."""
    if eval_examples is not None:
        return examples, eval_examples
    if len(examples) < 2:
        raise InvalidData("data", ["at least two examples are needed to hold one out (or send eval_data)"])
    shuffled = examples[:]
    random.Random(seed).shuffle(shuffled)
    num_held_out = min(MAX_HELD_OUT, max(1, len(examples) // 10))
    return shuffled[num_held_out:], shuffled[:num_held_out]


def batches(examples: list[TokenizedExample], batch_size: int, seed: int) -> Iterator[list[TokenizedExample]]:
    """Endless batches: each epoch a fresh seeded shuffle."""
    order = random.Random(seed)
    while True:
        shuffled = examples[:]
        order.shuffle(shuffled)
        for start in range(0, len(shuffled), batch_size):
            yield shuffled[start : start + batch_size]
