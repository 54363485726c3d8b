"""Streamed text: the pieces add up to the decoded output, and stop sequences never leak into the stream."""

from __future__ import annotations

from typing import Any

import pytest
from transformers import AutoTokenizer

from adapterd.server.engine.detokenizer import Detokenizer
from adapterd.server.model.resolve import ResolvedModel

PROMPT = "Write something for me:"
TEXTS = {
    "spaces": "Hello world, how are you?  Two spaces, then   three.",
    "leading-space": " starts with a space",
    "unicode": "Café, naïve, 日本語 and Ελληνικά",
    "emoji": "emoji 🤗🎉 party 👩‍👩‍👧 family",
    "newlines": "line one\nline two\n\n  indented\tand a tab\n",
    "code": "def f(x):\n    return x ** 2  # square\n",
}


@pytest.fixture(scope="module")
def tokenizer(default_model: ResolvedModel) -> Any:
    return AutoTokenizer.from_pretrained(default_model.path)


def stream(tokenizer: Any, text: str, stop: tuple[str, ...] = ()) -> tuple[list[str], Detokenizer, list[int]]:
    """Feed `text`'s tokens one by one as the engine does: (pieces streamed, the detokenizer, ids fed)."""
    detokenizer = Detokenizer(tokenizer, tokenizer.encode(PROMPT), stop)
    pieces: list[str] = []
    fed: list[int] = []
    for token_id in tokenizer.encode(text, add_special_tokens=False):
        fed.append(token_id)
        pieces.append(detokenizer.add(token_id))
        if detokenizer.stopped_at is not None:
            break
    pieces.append(detokenizer.flush())
    return pieces, detokenizer, fed


@pytest.mark.parametrize("name", TEXTS)
def test_streamed_pieces_add_up_to_the_decoded_text(tokenizer: Any, name: str) -> None:
    pieces, detokenizer, ids = stream(tokenizer, TEXTS[name])
    expected = tokenizer.decode(ids, skip_special_tokens=True)
    assert "".join(pieces) == expected == TEXTS[name]
    assert detokenizer.text == expected


def test_multi_token_characters_are_never_streamed_half_done(tokenizer: Any) -> None:
    text = TEXTS["emoji"]
    assert len(tokenizer.encode("🤗", add_special_tokens=False)) > 1, "the test needs a multi-token emoji"
    pieces, _, _ = stream(tokenizer, text)
    assert all("\ufffd" not in piece for piece in pieces)
    assert "" in pieces  # a token that ends mid-character streams nothing yet


def test_special_tokens_are_not_streamed(tokenizer: Any) -> None:
    ids = [*tokenizer.encode("Hi", add_special_tokens=False), tokenizer.eos_token_id]
    detokenizer = Detokenizer(tokenizer, tokenizer.encode(PROMPT), ())
    pieces = [detokenizer.add(token_id) for token_id in ids] + [detokenizer.flush()]
    assert "".join(pieces) == "Hi"


STOP_CASES = [  # (text, stop sequences, text before the first stop)
    ("Hello world, how are you?", ("world",), "Hello "),
    ("Hello world, how are you?", ("ld, h",), "Hello wor"),  # spans three tokens
    ("Hello world, how are you?", ("you?", "how"), "Hello world, "),  # the earliest match wins
    (
        "Hello world, how are you?",
        ("?", "a very long stop string that never matches"),
        "Hello world, how are you",
    ),
    ("first line\nsecond line\n", ("\n",), "first line"),
    ("party 🤗 time 🎉 over", ("🎉",), "party 🤗 time "),  # a stop made of several tokens' bytes
    ("Hello world", ("Hello",), ""),
]


@pytest.mark.parametrize(("text", "stop", "expected"), STOP_CASES)
def test_text_ends_right_before_the_stop_sequence(
    tokenizer: Any, text: str, stop: tuple[str, ...], expected: str
) -> None:
    """The final text and the stream both end before the stop: no part of it was streamed."""
    pieces, detokenizer, _ = stream(tokenizer, text, stop)
    assert detokenizer.stopped_at is not None
    assert detokenizer.text == expected
    assert "".join(pieces) == expected


def test_stop_sequence_split_across_tokens_is_found(tokenizer: Any) -> None:
    text, stop = "The quick brown fox jumps", "ck bro"
    tokens = [tokenizer.decode([i]) for i in tokenizer.encode(text, add_special_tokens=False)]
    assert not any(stop in token for token in tokens), "the stop must span tokens"
    _, detokenizer, fed = stream(tokenizer, text, (stop,))
    assert detokenizer.text == "The qui"
    assert tokenizer.decode(fed).endswith(" brown")  # stopped at the token that completed the stop


def test_text_that_only_resembles_the_stop_sequence_is_streamed_in_full(tokenizer: Any) -> None:
    text = "wor word worl world"
    pieces, detokenizer, _ = stream(tokenizer, text, ("worlds",))
    assert detokenizer.stopped_at is None
    assert "".join(pieces) == text


def test_stop_text_held_back_until_it_can_no_longer_match(tokenizer: Any) -> None:
    detokenizer = Detokenizer(tokenizer, tokenizer.encode(PROMPT), ("world!",))
    ids = tokenizer.encode("Hello world", add_special_tokens=False)
    streamed = "".join(detokenizer.add(token_id) for token_id in ids)
    assert "world" not in streamed  # it could still become "world!"
    assert streamed + detokenizer.flush() == "Hello world"


def test_without_a_tokenizer_nothing_is_streamed() -> None:
    detokenizer = Detokenizer(None, [1, 2, 3], ("x",))
    assert [detokenizer.add(token_id) for token_id in (5, 6, 7)] == ["", "", ""]
    assert detokenizer.flush() == ""
    assert detokenizer.text == ""
    assert detokenizer.stopped_at is None
