"""Request and event types shared by the engine and every front end."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, Literal

from adapterd.server.errors import InvalidRequest

FinishReason = Literal["length", "stop", "eos", "cancelled", "error"]
MAX_LOGPROBS = 20  # most alternatives a request may ask for per token (vLLM's limit)


@dataclass(frozen=True)
class SamplingParams:
    """How to pick each next token. temperature 0 is greedy decoding."""

    max_new_tokens: int = 64
    temperature: float = 0.0
    top_p: float = 1.0
    top_k: int = 0
    repetition_penalty: float = 1.0
    seed: int | None = None
    stop: tuple[str, ...] = ()
    ignore_eos: bool = False
    # Log-probabilities of the model's own distribution (before repetition penalty, temperature, top-k and
    # top-p). Every generated token carries its own; `top_logprobs` adds that many alternatives per token.
    top_logprobs: int = 0
    # None: no prompt log-probabilities. k >= 0: every prompt token's log-probability (the first one has
    # none) and its k most likely alternatives, computed on this row only.
    prompt_logprobs: int | None = None

    def __post_init__(self) -> None:
        problems = self.problems()
        if problems:
            raise ValueError("; ".join(problems))

    def problems(self) -> list[str]:
        checks = [
            (
                self.max_new_tokens >= 1 or (self.max_new_tokens == 0 and self.prompt_logprobs is not None),
                "max_new_tokens must be >= 1 (0 only when scoring the prompt)",
            ),
            (self.temperature >= 0, "temperature must be >= 0"),
            (0 < self.top_p <= 1, "top_p must be in (0, 1]"),
            (self.top_k >= 0, "top_k must be >= 0"),
            (self.repetition_penalty > 0, "repetition_penalty must be > 0"),
            (all(isinstance(s, str) and s for s in self.stop), "stop sequences must be non-empty strings"),
            (0 <= self.top_logprobs <= MAX_LOGPROBS, f"top_logprobs must be in 0..{MAX_LOGPROBS}"),
            (
                self.prompt_logprobs is None or 0 <= self.prompt_logprobs <= MAX_LOGPROBS,
                f"prompt_logprobs must be in 0..{MAX_LOGPROBS}",
            ),
        ]
        return [message for ok, message in checks if not ok]

    @property
    def is_greedy(self) -> bool:
        return self.temperature == 0


def sampling_params(**values: Any) -> SamplingParams:
    """SamplingParams from front-end values (None means the default); bad values raise InvalidRequest."""
    given = {k: v for k, v in values.items() if v is not None}
    try:
        return SamplingParams(**given)
    except (ValueError, TypeError) as exc:
        raise InvalidRequest(str(exc)) from exc


@dataclass(frozen=True)
class GenerateRequest:
    """One generation: a prompt as text, chat messages or token ids, and an optional adapter."""

    prompt: str | None = None
    messages: tuple[dict[str, str], ...] | None = None
    prompt_ids: tuple[int, ...] | None = None
    adapter_id: str | None = None
    params: SamplingParams = field(default_factory=SamplingParams)
    request_id: str = ""
    truncate: int | None = None  # keep only the last `truncate` prompt tokens (TGI's `truncate`)

    def __post_init__(self) -> None:
        given = sum(x is not None for x in (self.prompt, self.messages, self.prompt_ids))
        if given != 1:
            raise ValueError("give exactly one of prompt, messages or prompt_ids")

    def samples(self, count: int) -> list[GenerateRequest]:
        """`count` independent samples of this request (OpenAI's n, TGI's best_of); with a seed, sample j is
        seeded `seed + j`, so each can be repeated alone."""
        seed = self.params.seed
        if seed is None:
            return [self] * count
        return [
            dataclasses.replace(self, params=dataclasses.replace(self.params, seed=seed + j))
            for j in range(count)
        ]


@dataclass(frozen=True)
class TokenLogprob:
    """A token with its log-probability under the request's model (base or adapter) and, when asked for,
    its most likely alternatives at that position, best first. The first prompt token has no logprob."""

    token_id: int
    logprob: float | None
    top: tuple[tuple[int, float], ...] = ()


@dataclass(frozen=True)
class TokenEvent:
    """One step of a request's stream: a new token and the text it completed (may be empty).
    The last token says so (`is_last`); the Completion follows it at once."""

    token_id: int
    text: str
    is_last: bool = False
    logprob: float = 0.0
    top: tuple[tuple[int, float], ...] = ()  # the `top_logprobs` alternatives, best first


@dataclass(frozen=True)
class Completion:
    """The end of a request's stream."""

    request_id: str
    text: str
    token_ids: tuple[int, ...]
    finish_reason: FinishReason
    prompt_tokens: int
    error: str | None = None
    logprobs: tuple[TokenLogprob, ...] = ()  # one per generated token
    prompt_logprobs: tuple[TokenLogprob, ...] | None = None  # one per prompt token, when asked for
    seed: int | None = None  # the sampling seed used (drawn when the request gave none); None when greedy


def best_first(choices: list[Completion]) -> list[Completion]:
    """Samples of one request, the highest summed log-probability first (TGI's and OpenAI's best_of)."""
    return sorted(choices, key=lambda c: -sum(s.logprob or 0.0 for s in c.logprobs))
