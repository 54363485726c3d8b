"""A sequence: one request's tokens, its place in the KV cache, its adapter and its output stream."""

from __future__ import annotations

import itertools
from dataclasses import dataclass, field
from enum import Enum, auto
from typing import TYPE_CHECKING

import torch

from adapterd.server.common.protocol import Completion, FinishReason, SamplingParams, TokenLogprob

if TYPE_CHECKING:
    from adapterd.server.engine.adapter_slots import LoadedAdapter
    from adapterd.server.engine.detokenizer import Detokenizer
    from adapterd.server.engine.grammar import GrammarMatcher
    from adapterd.server.engine.messages import Outbox

_ids = itertools.count()


class Status(Enum):
    WAITING = auto()
    RUNNING = auto()
    FINISHED = auto()


@dataclass(eq=False)
class Sequence:
    request_id: str
    prompt_ids: list[int]
    params: SamplingParams
    outbox: Outbox  # where the engine delivers this request's events, once per step
    detokenizer: Detokenizer
    adapter: LoadedAdapter | None = None
    grammar: GrammarMatcher | None = None  # structured output: where the output stands in its grammar
    seq_id: int = field(default_factory=lambda: next(_ids))
    output_ids: list[int] = field(default_factory=list)
    block_table: list[int] = field(default_factory=list)
    num_cached: int = 0  # leading tokens whose K/V are in the cache
    num_scheduled: int = 0  # new tokens the current step computes (a prefill chunk, or 1 to decode)
    num_committed: int = 0  # leading tokens whose blocks are findable in the prefix cache (whole blocks)
    block_keys: list[bytes] = field(default_factory=list)  # prefix key of each full block so far
    status: Status = Status.WAITING
    is_cancelled: bool = False
    generator: torch.Generator | None = None  # seeded sampling; None for greedy
    seed: int | None = None  # the generator's seed
    logprobs: list[TokenLogprob] = field(default_factory=list)  # one per output token
    prompt_logprobs: list[TokenLogprob] | None = None  # once scored (params.prompt_logprobs is not None)

    @property
    def needs_prompt_scores(self) -> bool:
        return self.params.prompt_logprobs is not None and self.prompt_logprobs is None

    @property
    def is_prefilling(self) -> bool:
        """More than the last token still lacks K/V (its prompt, or a recompute, is not all in yet), or its
        prompt is still to be scored (that takes a prefill step, however short the prompt)."""
        return self.num_tokens - self.num_cached > 1 or self.needs_prompt_scores

    @property
    def num_virtual(self) -> int:
        """Soft-prompt rows in front of the prompt: they take positions 0..V-1, as in PEFT."""
        return self.adapter.num_virtual_tokens if self.adapter else 0

    @property
    def num_tokens(self) -> int:
        return self.num_virtual + len(self.prompt_ids) + len(self.output_ids)

    def token_ids(self, start: int) -> list[int]:
        """Token ids from position `start` on; virtual positions hold 0 (their embedding is replaced)."""
        ids = [0] * self.num_virtual + self.prompt_ids + self.output_ids
        return ids[start:]

    def finish(self, reason: FinishReason, error: str | None = None) -> Completion:
        self.status = Status.FINISHED
        return Completion(
            request_id=self.request_id,
            text=self.detokenizer.text,
            token_ids=tuple(self.output_ids),
            finish_reason=reason,
            prompt_tokens=len(self.prompt_ids),
            error=error,
            logprobs=tuple(self.logprobs),
            prompt_logprobs=None if self.prompt_logprobs is None else tuple(self.prompt_logprobs),
            seed=self.seed,
        )
