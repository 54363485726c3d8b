"""Next-token choice per row: greedy, or temperature / top-k / top-p sampling with a per-request seed."""

from __future__ import annotations

import torch

from adapterd.server.engine.sequence import Sequence
from adapterd.server.protocol import SamplingParams


def sample(logits: torch.Tensor, seqs: list[Sequence]) -> list[int]:
    """logits: [B, vocab] float32 -> one token id per row."""
    if all(s.params.is_greedy and s.params.repetition_penalty == 1.0 for s in seqs):
        return logits.argmax(dim=-1).tolist()
    return [_sample_row(row, seq) for row, seq in zip(logits, seqs, strict=True)]


def _sample_row(logits: torch.Tensor, seq: Sequence) -> int:
    params = seq.params
    if params.repetition_penalty != 1.0:
        logits = apply_repetition_penalty(logits, seq.prompt_ids + seq.output_ids, params.repetition_penalty)
    if params.is_greedy:
        return int(logits.argmax())
    probs = torch.softmax(filter_logits(logits / params.temperature, params), dim=-1)
    return int(torch.multinomial(probs, 1, generator=seq.generator))


def apply_repetition_penalty(logits: torch.Tensor, token_ids: list[int], penalty: float) -> torch.Tensor:
    """CTRL's penalty, as transformers applies it: seen tokens' logits divided (if > 0) or multiplied."""
    if not token_ids:
        return logits
    ids = torch.tensor(sorted(set(token_ids)), device=logits.device)
    seen = logits[ids]
    logits = logits.clone()
    logits[ids] = torch.where(seen > 0, seen / penalty, seen * penalty)
    return logits


def filter_logits(logits: torch.Tensor, params: SamplingParams) -> torch.Tensor:
    """Keep the top_k logits, then the smallest set whose probability reaches top_p; the rest -inf."""
    if 0 < params.top_k < logits.shape[-1]:
        kth = torch.topk(logits, params.top_k).values[-1]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if params.top_p < 1.0:
        sorted_logits, order = torch.sort(logits, descending=True)
        cumulative = torch.softmax(sorted_logits, dim=-1).cumsum(dim=-1)
        drop = cumulative - torch.softmax(sorted_logits, dim=-1) >= params.top_p  # keeps the first always
        logits = logits.masked_fill(drop.scatter(0, order, drop), float("-inf"))
    return logits
