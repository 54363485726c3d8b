"""Training data: the whole file validated with line-numbered errors; prompts tokenized exactly as the server
encodes the same request (plain prompts and the chat template); the loss only on the completion and eos;
truncation; the held-out split."""

from __future__ import annotations

import json
from typing import Any

import pytest

from adapterd.server.model.resolve import ResolvedModel
from adapterd.server.model.tokenizer import encode_chat, load_tokenizer
from adapterd.server.trainer.data import (
    IGNORE_INDEX,
    Example,
    batches,
    read_examples,
    split_held_out,
    tokenize,
)
from adapterd.server.trainer.errors import InvalidData

CHAT = {
    "messages": [{"role": "user", "content": "2024-03-07?"}, {"role": "assistant", "content": "07.03.2024"}]
}


def lines(*records: Any) -> list[bytes]:
    return [(r if isinstance(r, str) else json.dumps(r)).encode() + b"\n" for r in records]


def problems(*records: Any) -> list[str]:
    with pytest.raises(InvalidData) as caught:
        read_examples(lines(*records))
    return caught.value.problems


def test_both_formats_parse() -> None:
    prompt, chat = read_examples(
        lines({"prompt": "a", "completion": "b", "id": 7}, "", CHAT)
    )  # blank: skipped
    assert prompt == Example(1, "b", prompt="a")
    assert chat.line == 3 and chat.completion == "07.03.2024"
    assert chat.messages == ({"role": "user", "content": "2024-03-07?"},)
    assert chat.request_kwargs() == {"messages": chat.messages}


@pytest.mark.parametrize(
    ("record", "message"),
    [
        ('{"prompt": "a", "completion": ', "not valid JSON"),
        ("[1, 2]", "expected a JSON object"),
        ({"text": "a"}, 'expected "prompt" and "completion", or "messages"'),
        ({"prompt": "a", "completion": "b", "messages": []}, "not both"),
        ({"prompt": "a"}, '"completion" is missing'),
        ({"completion": "b"}, '"prompt" is missing'),
        ({"prompt": "a", "completion": "  "}, '"completion" must not be empty'),
        ({"prompt": "", "completion": "b"}, '"prompt" must not be empty'),
        ({"prompt": 3, "completion": "b"}, '"prompt" must be a string, not int'),
        ({"prompt": "a", "completion": ["b"]}, '"completion" must be a string, not list'),
        ({"messages": "hi"}, "must be a list of at least two messages"),
        ({"messages": [{"role": "assistant", "content": "b"}]}, "at least two messages"),
        ({"messages": [{"role": "user", "content": "a"}, {"role": "user", "content": "b"}]}, "last message"),
        (
            {"messages": [{"role": "robot", "content": "a"}, {"role": "assistant", "content": "b"}]},
            "role must",
        ),
        ({"messages": [{"role": "user", "content": 1}, {"role": "assistant", "content": "b"}]}, "content"),
        ({"messages": [{"role": "user", "content": "a"}, {"role": "assistant", "content": ""}]}, "empty"),
        ({"messages": [{"role": "user", "content": "a", "name": "x"}, CHAT["messages"][1]]}, "only"),
    ],
)
def test_each_problem_names_its_line(record: Any, message: str) -> None:
    [problem] = problems({"prompt": "ok", "completion": "ok"}, record)
    assert problem.startswith("line 2: ") and message in problem


def test_every_bad_line_is_reported_at_once_with_its_number() -> None:
    good = {"prompt": "a", "completion": "b"}
    with pytest.raises(InvalidData) as caught:
        read_examples([b"not json\n", json.dumps(good).encode(), b"\n", b'{"prompt": 1}\n', b"\xff\xfe\n"])
    assert [p.split(":")[0] for p in caught.value.problems] == ["line 1", "line 4", "line 5"]
    assert str(caught.value).startswith("data: 3 invalid lines: line 1: not valid JSON")
    assert "line 5: not UTF-8 text" in str(caught.value)


def test_many_bad_lines_are_summarised() -> None:
    with pytest.raises(InvalidData, match=r"\(and 15 more\)$") as caught:
        read_examples([b"x\n"] * 25, "eval_data")
    assert len(caught.value.problems) == 10 and str(caught.value).startswith("eval_data: 25 invalid lines")


def test_an_empty_file_is_refused() -> None:
    with pytest.raises(InvalidData, match="no examples"):
        read_examples([b"\n", b"  \n"])


@pytest.fixture(scope="module")
def tokenizer(default_model: ResolvedModel) -> Any:
    return load_tokenizer(default_model.path)


def test_plain_prompts_tokenize_as_the_server_does_and_only_the_completion_has_labels(tokenizer: Any) -> None:
    example = Example(1, " 07.03.2024", prompt="Date: 2024-03-07\nLedger:")
    eos = tokenizer.eos_token_id
    tokenized = tokenize(tokenizer, example, eos, max_seq_len=1024)
    prompt = list(tokenizer(example.prompt).input_ids)  # what LLM.encode feeds the model for this prompt
    completion = list(tokenizer(example.completion, add_special_tokens=False).input_ids)
    assert tokenized.input_ids == prompt + completion + [eos]
    assert tokenized.labels == [IGNORE_INDEX] * len(prompt) + completion + [eos]
    assert tokenizer.decode(tokenized.input_ids) == example.prompt + example.completion + tokenizer.eos_token


def test_chat_examples_use_the_servers_chat_template(tokenizer: Any) -> None:
    [example] = read_examples(lines(CHAT))
    tokenized = tokenize(tokenizer, example, tokenizer.eos_token_id, max_seq_len=1024)
    prompt = encode_chat(tokenizer, CHAT["messages"][:1])
    assert tokenized.input_ids[: len(prompt)] == prompt
    assert tokenized.labels[: len(prompt)] == [IGNORE_INDEX] * len(prompt)
    answer = tokenizer.decode([t for t in tokenized.labels if t != IGNORE_INDEX])
    assert answer == "07.03.2024" + tokenizer.eos_token
    assert tokenizer.decode(prompt).endswith("<|im_start|>assistant\n")


def test_long_examples_are_cut_at_max_seq_len(tokenizer: Any) -> None:
    example = Example(1, " one two three four five six", prompt="Count:")
    tokenized = tokenize(tokenizer, example, tokenizer.eos_token_id, max_seq_len=5)
    assert len(tokenized.input_ids) == len(tokenized.labels) == 5
    assert tokenized.input_ids == tokenize(tokenizer, example, 2, 1024).input_ids[:5]


def test_held_out_split() -> None:
    examples = [Example(i, str(i), prompt="p") for i in range(1, 51)]
    train, held_out = split_held_out(examples, None, seed=3)
    assert len(held_out) == 5 and len(train) == 45
    assert sorted(e.line for e in train + held_out) == list(range(1, 51))
    assert split_held_out(examples, None, seed=3) == (train, held_out)
    assert split_held_out(examples, None, seed=4)[1] != held_out
    given = [Example(1, "x", prompt="p")]
    assert split_held_out(examples, given, seed=3) == (examples, given)
    assert len(split_held_out(examples * 30, None, 0)[1]) == 100
    with pytest.raises(InvalidData, match="at least two examples"):
        split_held_out(examples[:1], None, 0)


def test_batches_cover_every_example_each_epoch() -> None:
    stream = batches(list(range(10)), 4, seed=0)  # type: ignore[arg-type]
    epoch = [next(stream) for _ in range(3)]
    assert [len(b) for b in epoch] == [4, 4, 2]
    assert sorted(x for b in epoch for x in b) == list(range(10))  # type: ignore[type-var]
