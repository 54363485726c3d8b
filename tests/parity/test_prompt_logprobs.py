"""Prompt log-probabilities in the engine, in one batch: rows asking for different numbers of alternatives, a
one-token prompt (nothing to score), a row that asks for none, and a score-only row (max_new_tokens 0)."""

from __future__ import annotations

import pytest
import torch

from adapterd.server.common.config import EngineConfig
from adapterd.server.common.protocol import GenerateRequest, SamplingParams
from adapterd.server.llm import LLM
from tests.reference import load_base, next_token_logprobs

PROMPTS = [[5, 17, 33, 4, 90, 12], [7], [9, 8, 7, 6, 5, 4, 3, 2], [40, 41, 42]]
ASKS = [3, 0, 1, None]


@pytest.fixture(scope="module")
def answers(tiny_llama):
    config = EngineConfig(max_batch=8, kv_cache_tokens=1024, max_seq_len=256)
    with LLM(model=str(tiny_llama), quantize="none", device="cpu", engine=config) as llm:
        requests = [
            GenerateRequest(
                prompt_ids=tuple(p),
                params=SamplingParams(max_new_tokens=0 if i == 2 else 2, prompt_logprobs=k),
            )
            for i, (p, k) in enumerate(zip(PROMPTS, ASKS, strict=True))
        ]
        return llm.generate(requests)


def test_each_row_gets_its_own_prompt_scores(tiny_llama, answers):
    model = load_base(tiny_llama)
    for prompt, k, done in zip(PROMPTS, ASKS, answers, strict=True):
        if k is None:
            assert done.prompt_logprobs is None
            continue
        ref = next_token_logprobs(model, prompt)
        assert [s.token_id for s in done.prompt_logprobs] == prompt
        assert done.prompt_logprobs[0].logprob is None and done.prompt_logprobs[0].top == ()
        for i, score in enumerate(done.prompt_logprobs[1:], start=1):
            assert score.logprob == pytest.approx(float(ref[i - 1, prompt[i]]), abs=1e-4)
            best = torch.topk(ref[i - 1], k)
            assert [t for t, _ in score.top] == best.indices.tolist()
            assert [lp for _, lp in score.top] == pytest.approx(best.values.tolist(), abs=1e-4)


def test_a_score_only_row_generates_nothing(answers):
    assert answers[2].token_ids == () and answers[2].finish_reason == "length"
    assert [len(a.token_ids) for i, a in enumerate(answers) if i != 2] == [2, 2, 2]
