"""Log-probabilities in OpenAI's two shapes: the legacy completions object (`tokens`, `token_logprobs`,
`top_logprobs`, `text_offset`) and the chat one (`content: [{token, logprob, bytes, top_logprobs}]`).

Token strings are each token decoded on its own, as vLLM writes them; `top_logprobs` holds the true top k,
best first (a dict in the legacy shape, keyed by token string).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

from adapterd.server.common.protocol import TokenLogprob

TokenText = Callable[[int], str]


class LegacyLogprobs:
    """The legacy `logprobs` object, built token by token (a stream sends each token's part on its own)."""

    def __init__(self, token_text: TokenText, offset: int = 0) -> None:
        self.token_text = token_text
        self.offset = offset  # characters of the choice's text before the next token

    def render(self, scores: Sequence[TokenLogprob]) -> dict[str, Any]:
        out: dict[str, Any] = {"tokens": [], "token_logprobs": [], "top_logprobs": [], "text_offset": []}
        for score in scores:
            text = self.token_text(score.token_id)
            out["tokens"].append(text)
            out["token_logprobs"].append(score.logprob)
            out["top_logprobs"].append(
                None if score.logprob is None else {self.token_text(i): lp for i, lp in score.top}
            )
            out["text_offset"].append(self.offset)
            self.offset += len(text)
        return out


def chat_logprobs(token_text: TokenText, scores: Sequence[TokenLogprob]) -> dict[str, Any]:
    return {"content": [_chat_entry(token_text, s) for s in scores], "refusal": None}


def _chat_entry(token_text: TokenText, score: TokenLogprob) -> dict[str, Any]:
    return {
        **_chat_token(token_text, score.token_id, score.logprob),
        "top_logprobs": [_chat_token(token_text, i, lp) for i, lp in score.top],
    }


def _chat_token(token_text: TokenText, token_id: int, logprob: float | None) -> dict[str, Any]:
    text = token_text(token_id)
    return {"token": text, "logprob": logprob, "bytes": list(text.encode())}
