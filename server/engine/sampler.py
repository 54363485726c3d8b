"""Next-token choice per row: greedy, or temperature / top-k / top-p sampling with a per-request seed, from
the logits `logits_processors` shaped (logit bias, min_tokens, penalties, the structured-output mask)."""

from __future__ import annotations

import torch

from adapterd.server.common.protocol import SamplingParams
from adapterd.server.engine.logits_processors import shape_logits
from adapterd.server.engine.sequence import Sequence


def sample(logits: torch.Tensor, seqs: list[Sequence], eos_ids: set[int]) -> list[int]:
    """logits: [B, vocab] float32 -> one token id per row."""
    logits = shape_logits(logits, seqs, eos_ids)
    if all(s.params.is_greedy for s in seqs):
        return logits.argmax(dim=-1).tolist()
    return [_sample_row(row, seq) for row, seq in zip(logits, seqs, strict=True)]


def _sample_row(logits: torch.Tensor, seq: Sequence) -> int:
    params = seq.params
    if params.is_greedy:
        return int(logits.argmax())
    return int(torch.multinomial(sampling_probs(logits, params), 1, generator=seq.generator))


def sampling_probs(logits: torch.Tensor, params: SamplingParams) -> torch.Tensor:
    """The distribution a sampled row draws from, for any finite temperature > 0 a request may carry: the
    largest logit is shifted to 0 and the division is in float64 (where 1e-300 is not 0), so a tiny
    temperature leaves the argmax (ties shared) rather than 0 / 0, and a +inf logit (a penalty's overflow)
    counts as the largest finite one."""
    logits = logits.clamp(max=torch.finfo(logits.dtype).max)
    scaled = (logits - logits.max()).double() / params.temperature
    return torch.softmax(filter_logits(scaled, params), dim=-1)


def filter_logits(logits: torch.Tensor, params: SamplingParams) -> torch.Tensor:
    """Keep the top_k logits, then the smallest set whose probability reaches top_p; the rest -inf."""
    if 0 < params.top_k < logits.shape[-1]:
        kth = torch.topk(logits, params.top_k).values[-1]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if params.top_p < 1.0:
        sorted_logits, order = torch.sort(logits, descending=True)
        cumulative = torch.softmax(sorted_logits, dim=-1).cumsum(dim=-1)
        drop = cumulative - torch.softmax(sorted_logits, dim=-1) >= params.top_p
        drop[0] = False  # the most likely token stays, even for a top_p below float32's smallest number
        logits = logits.masked_fill(drop.scatter(0, order, drop), float("-inf"))
    return logits
