"""Log-probabilities of tokens and their most likely alternatives, from the model's raw logits.

They are those of the model's own distribution (the request's adapter included), before repetition penalty,
temperature, top-k and top-p, as vLLM and OpenAI report them. Generated tokens get theirs every step (one
logsumexp over the step's last-position logits); prompt tokens only on the rows that ask, in chunks of rows
so that a long prompt never holds [tokens, vocab] logits at once.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from adapterd.server.common.protocol import TokenLogprob

SCORE_CHUNK_ROWS = 256  # prompt positions put through the LM head at once


def token_logprobs(logits: torch.Tensor, token_ids: torch.Tensor, k: int) -> list[TokenLogprob]:
    """logits: [N, vocab] float32, token_ids: [N] -> each token's log-probability and the top k, best first."""
    lse = torch.logsumexp(logits, dim=-1)  # [N]
    chosen = (logits.gather(1, token_ids[:, None]).squeeze(1) - lse).tolist()
    ids = token_ids.tolist()
    if k == 0:
        return [TokenLogprob(i, lp) for i, lp in zip(ids, chosen, strict=True)]
    top = torch.topk(logits, k, dim=-1)
    top_ids, top_values = top.indices.tolist(), (top.values - lse[:, None]).tolist()
    return [
        TokenLogprob(i, lp, tuple(zip(t_ids, t_values, strict=True)))
        for i, lp, t_ids, t_values in zip(ids, chosen, top_ids, top_values, strict=True)
    ]


def score_hidden(
    head: Callable[[torch.Tensor], torch.Tensor], hidden: torch.Tensor, targets: torch.Tensor, k: int
) -> list[TokenLogprob]:
    """hidden: [N, hidden] final hidden states, targets: [N] the token that follows each of them."""
    scored: list[TokenLogprob] = []
    for start in range(0, hidden.shape[0], SCORE_CHUNK_ROWS):
        rows = slice(start, start + SCORE_CHUNK_ROWS)
        scored += token_logprobs(head(hidden[rows]).float(), targets[rows], k)
    return scored
