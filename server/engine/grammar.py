"""Structured output: constraints compiled by llguidance into one matcher per request, and the token masks
the engine applies with them.

Compiling runs where a request is prepared (a front end's worker thread), cached by the constraint's text;
the engine thread only fills each constrained row's mask, applies it before sampling and advances the row's
matcher with the token it drew. llguidance was chosen over xgrammar by `python -m bench.structured`
(docs/performance.md): it checks schemas strictly (keywords it cannot enforce are refused, not ignored),
compiles lazily, and its masks cost well under a millisecond a row here.
"""

from __future__ import annotations

import json
import re
import threading
from collections import OrderedDict
from typing import Any

import torch

from adapterd.server.common.config import GRAMMAR_CACHE_SIZE, MAX_GRAMMAR_BYTES
from adapterd.server.common.errors import InvalidRequest
from adapterd.server.common.protocol import Constraint

# JSON as json.dumps writes it (", " and ": "), no other whitespace: a small model cannot wander off into
# endless newlines, and the output reads as models usually write JSON.
JSON_OPTIONS = {"whitespace_flexible": False, "item_separator": ", ", "key_separator": ": "}
NOUNS = {
    "json_schema": "JSON schema",
    "json_object": "JSON object",
    "regex": "regular expression",
    "grammar": "grammar",
    "choice": "choice list",
}
_BITS = torch.tensor([1 << bit for bit in range(32)], dtype=torch.int64).to(torch.int32)


class GrammarMatcher:
    """One request's place in its grammar (used on the engine thread only)."""

    def __init__(self, matcher: Any) -> None:
        self._matcher = matcher

    def fill(self, bitmask: torch.Tensor, row: int) -> None:
        """Write the tokens allowed next into `bitmask[row]` (32 tokens per int32, llguidance's layout)."""
        words = bitmask[row]
        self._matcher.unsafe_compute_mask_ptr(words.data_ptr(), words.numel() * words.element_size())

    def accept(self, token_id: int) -> None:
        self._matcher.consume_token(token_id)

    @property
    def is_finished(self) -> bool:
        """No token can follow: the output is complete (or the grammar hit a dead end)."""
        return bool(self._matcher.is_stopped() or self._matcher.is_error())


def allowed_tokens(
    matchers: list[GrammarMatcher], vocab_size: int, device: torch.device | None = None
) -> torch.Tensor:
    """[len(matchers), vocab_size] bool on `device`: the tokens each matcher allows next. The masks are
    filled on the host (pinned when a GPU waits) and only their bits, 32 tokens to a word, are copied."""
    words = (vocab_size + 31) // 32
    pin = device is not None and device.type == "cuda"
    bitmask = torch.zeros((len(matchers), words), dtype=torch.int32, pin_memory=pin)
    for row, matcher in enumerate(matchers):
        matcher.fill(bitmask, row)
    bitmask = bitmask.to(device or "cpu", non_blocking=True)
    bits = (bitmask.unsqueeze(-1) & _BITS.to(bitmask.device)) != 0
    return bits.view(len(matchers), words * 32)[:, :vocab_size]


class Grammars:
    """Compiles constraints for one tokenizer; thread-safe, so that worker threads may share it."""

    def __init__(self, tokenizer: Any, vocab_size: int, eos_ids: set[int]) -> None:
        self._hf_tokenizer = tokenizer
        self.vocab_size = vocab_size
        self._eos_ids = sorted(eos_ids)
        self._tokenizer: Any = None  # llguidance's, built on first use (it takes about a second)
        self._compiled: OrderedDict[tuple[str, str], Any] = OrderedDict()
        self._lock = threading.Lock()

    def matcher(self, constraint: Constraint) -> GrammarMatcher:
        """A fresh matcher for `constraint`; raises InvalidRequest (naming its field) if it cannot be used."""
        with self._lock:
            prototype = self._compiled.get(constraint.key)
            if prototype is None:
                prototype = self._compile(constraint)
                self._compiled[constraint.key] = prototype
                if len(self._compiled) > GRAMMAR_CACHE_SIZE:
                    self._compiled.popitem(last=False)
            self._compiled.move_to_end(constraint.key)
            return GrammarMatcher(prototype.deep_copy())

    def _compile(self, constraint: Constraint) -> Any:
        import llguidance

        size = len(constraint.value.encode())
        if size > MAX_GRAMMAR_BYTES:
            raise _invalid(constraint, f"is {size} bytes; the limit is {MAX_GRAMMAR_BYTES}")
        matcher = llguidance.LLMatcher(self._llg_tokenizer(), grammar_text(constraint), log_level=0)
        if matcher.is_error():
            raise _invalid(constraint, f"is not a valid {NOUNS[constraint.kind]}: {_error_text(matcher)}")
        allowed = allowed_tokens([GrammarMatcher(matcher)], self.vocab_size)  # an empty language errs here
        if matcher.is_error() or not allowed.any():
            raise _invalid(constraint, f"is a {NOUNS[constraint.kind]} that no output can satisfy")
        return matcher

    def _llg_tokenizer(self) -> Any:
        if self._tokenizer is None:
            import llguidance.hf

            self._tokenizer = llguidance.hf.from_tokenizer(
                self._hf_tokenizer, n_vocab=self.vocab_size, eos_token=self._eos_ids
            )
        return self._tokenizer


def grammar_text(constraint: Constraint) -> str:
    """llguidance's grammar for a constraint (its errors show when a matcher is built from it)."""
    from llguidance import LLMatcher

    if constraint.kind == "json_object":
        return str(LLMatcher.grammar_from_json_schema('{"type": "object"}', defaults=JSON_OPTIONS))  # type: ignore[arg-type]
    if constraint.kind == "json_schema":
        try:
            return str(LLMatcher.grammar_from_json_schema(constraint.value, defaults=JSON_OPTIONS))  # type: ignore[arg-type]
        except ValueError as exc:
            raise _invalid(constraint, f"is not a JSON object: {exc}") from exc
    if constraint.kind == "regex":
        return str(LLMatcher.grammar_from_regex(constraint.value))
    if constraint.kind == "choice":
        return str(LLMatcher.grammar_from_lark(choice_lark(constraint)))
    return str(LLMatcher.grammar_from_lark(constraint.value))


def lark_json(schema: dict[str, Any]) -> str:
    """A Lark `%json` item for `schema`, written with the same JSON_OPTIONS as a JSON-schema constraint."""
    return f"%json {json.dumps({**schema, 'x-guidance': JSON_OPTIONS})}"


def choice_lark(constraint: Constraint) -> str:
    """A Lark grammar whose only outputs are the choices, each exactly."""
    choices = json.loads(constraint.value)
    if not choices:
        raise _invalid(constraint, "is empty")
    return "start: " + " | ".join(json.dumps(choice, ensure_ascii=False) for choice in choices)


def _invalid(constraint: Constraint, problem: str) -> InvalidRequest:
    return InvalidRequest(f"{constraint.field} {problem}", param=constraint.field)


def _error_text(matcher: Any) -> str:
    """llguidance's message without the grammar listing it appends (lines like `   1 | start: ...`)."""
    lines = [line.strip() for line in str(matcher.get_error()).splitlines() if line.strip()]
    kept = [line for line in lines if not re.match(r"^\d+ \|", line)]
    return " ".join(kept)[:400]
