"""Incremental detokenization with stop sequences held back until they can no longer match."""

from __future__ import annotations

from typing import Any

CONTEXT_TOKENS = 5  # prompt tokens decoded in front of the output so leading spaces come out right


class Detokenizer:
    def __init__(self, tokenizer: Any | None, prompt_ids: list[int], stop: tuple[str, ...]) -> None:
        self.tokenizer = tokenizer
        self.ids = list(prompt_ids[-CONTEXT_TOKENS:])
        self.prefix_offset = 0
        self.read_offset = len(self.ids)
        self.stop = stop
        self.hold_back = max((len(s) for s in stop), default=1) - 1
        self.full_text = ""
        self.num_emitted = 0  # characters of full_text already streamed
        self.stopped_at: int | None = None

    @property
    def text(self) -> str:
        return self.full_text if self.stopped_at is None else self.full_text[: self.stopped_at]

    def add(self, token_id: int) -> str:
        """Take one generated token; return the text that may be streamed now."""
        if self.tokenizer is None:
            return ""
        self.ids.append(token_id)
        self.full_text += self._decode_new()
        self._find_stop()
        end = len(self.text) if self.stopped_at is not None else len(self.full_text) - self.hold_back
        return self._emit(end)

    def flush(self) -> str:
        """The text still held back, at the end of the sequence."""
        return self._emit(len(self.text))

    def _emit(self, end: int) -> str:
        if end <= self.num_emitted:
            return ""
        piece = self.full_text[self.num_emitted : end]
        self.num_emitted = end
        return piece

    def _decode_new(self) -> str:
        assert self.tokenizer is not None
        decode = self.tokenizer.decode
        prefix = decode(self.ids[self.prefix_offset : self.read_offset], skip_special_tokens=True)
        text = decode(self.ids[self.prefix_offset :], skip_special_tokens=True)
        if len(text) <= len(prefix) or text.endswith("\ufffd"):
            return ""  # an incomplete UTF-8 character: wait for the next token
        self.prefix_offset, self.read_offset = self.read_offset, len(self.ids)
        return text[len(prefix) :]

    def _find_stop(self) -> None:
        if not self.stop or self.stopped_at is not None:
            return
        window_start = max(0, self.num_emitted - self.hold_back)
        hits = [i for s in self.stop if (i := self.full_text.find(s, window_start)) >= 0]
        if hits:
            self.stopped_at = min(hits)
