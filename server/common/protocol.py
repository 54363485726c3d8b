"""Request and event types shared by the engine and every front end."""

from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import dataclass, field
from typing import Any, Literal

from adapterd.server.common.errors import InvalidRequest

FinishReason = Literal["length", "stop", "eos", "cancelled", "error"]
MAX_LOGPROBS = 20  # most alternatives a request may ask for per token (vLLM's limit)
MAX_LOGIT_BIAS = 100.0  # |bias| a token may get (OpenAI's range)
MAX_PENALTY = 2.0  # |presence_penalty| and |frequency_penalty| (OpenAI's range)
# torch.Generator.manual_seed's range: any signed or unsigned 64-bit integer.
MIN_SEED, MAX_SEED = -(2**63), 2**64 - 1
ConstraintKind = Literal["json_schema", "json_object", "regex", "grammar", "choice"]


@dataclass(frozen=True)
class Constraint:
    """What every generated token must keep the output within: a JSON schema (`value` is its JSON text),
    any JSON object, a regular expression, a Lark grammar or a choice list (`value` a JSON list of strings).
    `field` names the request field it came from, for errors."""

    kind: ConstraintKind
    value: str = ""
    field: str = "constraint"

    @property
    def key(self) -> tuple[str, str]:
        """What the compiled grammar is cached by."""
        return self.kind, self.value


def constraint(kind: ConstraintKind, value: Any, field: str) -> Constraint:
    """A Constraint from a front end's value: a schema as an object or its JSON text, a regex or grammar as
    text, choices as a list of strings. Values of the wrong shape raise InvalidRequest naming `field`."""
    if kind == "json_object":
        return Constraint(kind, "", field)
    if kind == "json_schema":
        if isinstance(value, str):
            try:
                value = json.loads(value)
            except ValueError as exc:
                raise InvalidRequest(f"{field} is not valid JSON: {exc}", param=field) from exc
        if not isinstance(value, dict):
            raise InvalidRequest(f"{field} must be a JSON schema (an object)", param=field)
        return Constraint(kind, json.dumps(value), field)  # key order kept: it is the output's order
    if kind == "choice":
        if not isinstance(value, list) or not value or not all(isinstance(c, str) and c for c in value):
            raise InvalidRequest(f"{field} must be a non-empty list of non-empty strings", param=field)
        return Constraint(kind, json.dumps(value), field)
    if not isinstance(value, str) or not value:
        raise InvalidRequest(f"{field} must be a non-empty string", param=field)
    return Constraint(kind, value, field)


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
    # vLLM's and OpenAI's meanings: bias added to a token's logit; no end-of-sequence or stop token before
    # min_tokens; more tokens that end the output (left in it); penalties subtracted from the logits of
    # tokens already generated (presence: once; frequency: once per occurrence).
    logit_bias: tuple[tuple[int, float], ...] = ()
    min_tokens: int = 0
    stop_token_ids: tuple[int, ...] = ()
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    constraint: Constraint | None = None  # structured output: every token keeps the output within it

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
            (
                all(math.isfinite(value) for value in self._floats()),
                "temperature, top_p, penalties and logit_bias values must be finite numbers",
            ),
            (self.temperature >= 0, "temperature must be >= 0"),
            (
                self.seed is None or MIN_SEED <= self.seed <= MAX_SEED,
                f"seed must be in {MIN_SEED}..{MAX_SEED}",
            ),
            (0 < self.top_p <= 1, "top_p must be in (0, 1]"),
            (self.top_k >= 0, "top_k must be >= 0"),
            (self.repetition_penalty > 0, "repetition_penalty must be > 0"),
            (all(isinstance(s, str) and s for s in self.stop), "stop sequences must be non-empty strings"),
            (0 <= self.top_logprobs <= MAX_LOGPROBS, f"top_logprobs must be in 0..{MAX_LOGPROBS}"),
            (
                self.prompt_logprobs is None or 0 <= self.prompt_logprobs <= MAX_LOGPROBS,
                f"prompt_logprobs must be in 0..{MAX_LOGPROBS}",
            ),
            (
                all(abs(bias) <= MAX_LOGIT_BIAS for _, bias in self.logit_bias),
                f"logit_bias values must be in -{MAX_LOGIT_BIAS:g}..{MAX_LOGIT_BIAS:g}",
            ),
            (0 <= self.min_tokens <= self.max_new_tokens, "min_tokens must be in 0..max_new_tokens"),
            (
                abs(self.presence_penalty) <= MAX_PENALTY,
                f"presence_penalty must be in -{MAX_PENALTY:g}..{MAX_PENALTY:g}",
            ),
            (
                abs(self.frequency_penalty) <= MAX_PENALTY,
                f"frequency_penalty must be in -{MAX_PENALTY:g}..{MAX_PENALTY:g}",
            ),
        ]
        return [message for ok, message in checks if not ok]

    def _floats(self) -> list[float]:
        scalars = [self.temperature, self.top_p, self.repetition_penalty]
        return [
            *scalars,
            self.presence_penalty,
            self.frequency_penalty,
            *(bias for _, bias in self.logit_bias),
        ]

    @property
    def is_greedy(self) -> bool:
        return self.temperature == 0

    @property
    def shapes_logits(self) -> bool:
        """Whether anything but temperature, top-k and top-p changes the logits a token is drawn from."""
        return bool(
            self.repetition_penalty != 1.0
            or self.logit_bias
            or self.min_tokens
            or self.presence_penalty
            or self.frequency_penalty
            or self.constraint
        )


def sampling_params(**values: Any) -> SamplingParams:
    """SamplingParams from front-end values (None means the default); bad values raise InvalidRequest."""
    given = {k: v for k, v in values.items() if v is not None}
    try:
        return SamplingParams(**given)
    except (ValueError, TypeError) as exc:
        raise InvalidRequest(str(exc), param=str(exc).split(" ", 1)[0]) from exc  # problems() start with it


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
    tools: tuple[dict[str, Any], ...] = ()  # function definitions the chat template renders (tool calls)

    def __post_init__(self) -> None:
        given = sum(x is not None for x in (self.prompt, self.messages, self.prompt_ids))
        if given != 1:
            raise ValueError("give exactly one of prompt, messages or prompt_ids")

    def samples(self, count: int) -> list[GenerateRequest]:
        """`count` independent samples of this request (OpenAI's n, TGI's best_of); with a seed, sample j is
        seeded `seed + j` (past the largest seed, counting on from the smallest), so each can be repeated
        alone."""
        seed = self.params.seed
        if seed is None:
            return [self] * count
        return [
            dataclasses.replace(self, params=dataclasses.replace(self.params, seed=_wrapped_seed(seed + j)))
            for j in range(count)
        ]


def _wrapped_seed(seed: int) -> int:
    return seed - (MAX_SEED - MIN_SEED + 1) if seed > MAX_SEED else seed


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


@dataclass(frozen=True)
class Health:
    """Whether the engine serves (liveness); `reason` says why not."""

    ok: bool
    reason: str = ""
