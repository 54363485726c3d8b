"""What shapes a row's logits before its token is drawn, in vLLM's order: logit bias and min_tokens, then
the repetition, presence and frequency penalties, then the structured-output mask. Only rows whose
parameters ask for any of it are touched (the mask touches only constrained rows)."""

from __future__ import annotations

import torch

from adapterd.server.engine.grammar import allowed_tokens
from adapterd.server.engine.sequence import Sequence

NEG_INF = float("-inf")


def shape_logits(logits: torch.Tensor, seqs: list[Sequence], eos_ids: set[int]) -> torch.Tensor:
    """logits [B, vocab] -> the logits each row draws from (a new tensor when any row is shaped). A row
    left with no token to draw (its grammar allows only the end, which min_tokens holds back, or its
    grammar reached a dead end) may draw only its end-of-sequence token."""
    rows = [row for row, seq in enumerate(seqs) if seq.params.shapes_logits]
    if not rows:
        return logits
    shaped = logits.clone()
    for row in rows:
        shape_row(shaped[row], seqs[row], eos_ids)
    constrained = [row for row in rows if seqs[row].grammar is not None]
    if constrained:
        matchers = [seqs[row].grammar for row in constrained]
        allowed = allowed_tokens(matchers, logits.shape[-1], logits.device)  # type: ignore[arg-type]
        shaped[constrained] = shaped[constrained].masked_fill(~allowed, NEG_INF)
    dead = [row for row in rows if not torch.isfinite(shaped[row]).any()]
    for row in dead:
        end = sorted(eos_ids)[:1]
        shaped[row, end] = logits[row, end]
    return shaped


def shape_row(logits: torch.Tensor, seq: Sequence, eos_ids: set[int]) -> None:
    """Everything but the grammar mask, in place on one row's [vocab] logits."""
    params = seq.params
    if params.logit_bias:
        ids, biases = zip(*params.logit_bias, strict=True)
        logits[list(ids)] += torch.tensor(biases, dtype=logits.dtype, device=logits.device)
    if len(seq.output_ids) < params.min_tokens:
        ends = set(params.stop_token_ids) | (set() if params.ignore_eos else eos_ids)
        logits[sorted(ends)] = NEG_INF
    if params.repetition_penalty != 1.0:
        logits.copy_(
            apply_repetition_penalty(logits, seq.prompt_ids + seq.output_ids, params.repetition_penalty)
        )
    if (params.presence_penalty or params.frequency_penalty) and seq.output_ids:
        ids, counts = torch.tensor(seq.output_ids, device=logits.device).unique(return_counts=True)
        penalty = params.frequency_penalty * counts.to(logits.dtype) + params.presence_penalty
        logits[ids] -= penalty


def apply_repetition_penalty(logits: torch.Tensor, token_ids: list[int], penalty: float) -> torch.Tensor:
    """CTRL's penalty, as transformers applies it: seen tokens' logits divided (if > 0) or multiplied."""
    if not token_ids:
        return logits
    ids = torch.tensor(sorted(set(token_ids)), device=logits.device)
    seen = logits[ids]
    logits = logits.clone()
    penalised = torch.where(seen > 0, seen / penalty, seen * penalty)
    # A valid penalty of 1e-300 is 0 in float32: a positive logit / 0 is inf, meaning the largest finite one;
    # a masked logit (-inf) * 0 is NaN, meaning it stays masked. Other values are transformers' to the bit.
    largest = torch.finfo(logits.dtype).max
    logits[ids] = torch.nan_to_num(penalised, nan=float("-inf"), posinf=largest, neginf=float("-inf"))
    return logits
