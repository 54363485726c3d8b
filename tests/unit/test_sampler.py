"""Sampling: the logits filters match transformers' own warpers, and seeded sampling is reproducible."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
from transformers.generation.logits_process import (
    RepetitionPenaltyLogitsProcessor,
    TopKLogitsWarper,
    TopPLogitsWarper,
)

from adapterd.server.common.config import EngineConfig
from adapterd.server.common.protocol import GenerateRequest, SamplingParams
from adapterd.server.engine.detokenizer import Detokenizer
from adapterd.server.engine.logits_processors import apply_repetition_penalty
from adapterd.server.engine.messages import SinkOutbox
from adapterd.server.engine.sampler import filter_logits, sample, sampling_probs
from adapterd.server.engine.sequence import Sequence
from adapterd.server.llm import LLM

VOCAB = 500
SEEDS = [0, 1, 2, 3]
PROMPT = (5, 6, 7, 8, 9)


def random_logits(seed: int, scale: float = 3.0) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return torch.randn(VOCAB, generator=generator) * scale  # [vocab]


def make_seq(params: SamplingParams, prompt_ids: list[int] | None = None) -> Sequence:
    generator = None if params.is_greedy else torch.Generator().manual_seed(params.seed or 0)
    return Sequence(
        request_id="r",
        prompt_ids=prompt_ids or [1, 2, 3],
        params=params,
        outbox=SinkOutbox(lambda event: None),
        detokenizer=Detokenizer(None, [], ()),
        generator=generator,
    )


@pytest.mark.parametrize("seed", SEEDS)
@pytest.mark.parametrize("top_k", [1, 2, 10, 50, VOCAB - 1])
def test_top_k_equals_transformers(seed: int, top_k: int) -> None:
    logits = random_logits(seed)
    expected = TopKLogitsWarper(top_k)(torch.zeros(1, 1, dtype=torch.long), logits[None])[0]
    actual = filter_logits(logits, SamplingParams(top_k=top_k))
    assert torch.equal(actual, expected)
    assert int(torch.isfinite(actual).sum()) == top_k


def test_top_k_of_one_keeps_only_the_argmax() -> None:
    logits = random_logits(7)
    kept = torch.isfinite(filter_logits(logits, SamplingParams(top_k=1))).nonzero().flatten().tolist()
    assert kept == [int(logits.argmax())]


@pytest.mark.parametrize("top_k", [0, VOCAB, VOCAB + 10])
def test_top_k_zero_or_at_least_vocab_keeps_everything(top_k: int) -> None:
    logits = random_logits(3)
    assert torch.equal(filter_logits(logits, SamplingParams(top_k=top_k)), logits)


@pytest.mark.parametrize("seed", SEEDS)
@pytest.mark.parametrize("top_p", [0.001, 0.1, 0.5, 0.8, 0.95, 0.999])
@pytest.mark.parametrize("scale", [1.0, 3.0])
def test_top_p_equals_transformers(seed: int, top_p: float, scale: float) -> None:
    logits = random_logits(seed, scale)
    expected = TopPLogitsWarper(top_p)(torch.zeros(1, 1, dtype=torch.long), logits[None])[0]
    actual = filter_logits(logits, SamplingParams(top_p=top_p))
    assert torch.equal(actual, expected)


def test_top_p_below_the_top_probability_keeps_only_the_top_token() -> None:
    logits = random_logits(5)
    top_probability = float(torch.softmax(logits, dim=-1).max())
    kept = filter_logits(logits, SamplingParams(top_p=top_probability / 2))
    assert torch.isfinite(kept).nonzero().flatten().tolist() == [int(logits.argmax())]


def test_top_p_keeps_a_growing_nucleus() -> None:
    logits = random_logits(4, scale=1.0)
    sizes = [
        int(torch.isfinite(filter_logits(logits, SamplingParams(top_p=p))).sum()) for p in (0.2, 0.6, 0.9)
    ]
    assert 1 < sizes[0] < sizes[1] < sizes[2] < VOCAB


@pytest.mark.parametrize("seed", SEEDS)
@pytest.mark.parametrize(("top_k", "top_p"), [(5, 0.5), (40, 0.9), (200, 0.3), (1, 0.9)])
def test_top_k_then_top_p_equals_transformers(seed: int, top_k: int, top_p: float) -> None:
    logits = random_logits(seed, scale=1.0)
    ids = torch.zeros(1, 1, dtype=torch.long)
    expected = TopPLogitsWarper(top_p)(ids, TopKLogitsWarper(top_k)(ids, logits[None]))[0]
    assert torch.equal(filter_logits(logits, SamplingParams(top_k=top_k, top_p=top_p)), expected)


@pytest.mark.parametrize("seed", SEEDS)
@pytest.mark.parametrize("penalty", [0.5, 1.3, 2.0])
def test_repetition_penalty_equals_transformers(seed: int, penalty: float) -> None:
    logits = random_logits(seed)
    token_ids = torch.randint(0, VOCAB, (40,), generator=torch.Generator().manual_seed(seed)).tolist()
    token_ids += token_ids[:10]  # repeated ids are penalized once, not once per occurrence
    processor = RepetitionPenaltyLogitsProcessor(penalty)
    expected = processor(torch.tensor([token_ids]), logits[None].clone())[0]
    actual = apply_repetition_penalty(logits, token_ids, penalty)
    assert torch.equal(actual, expected)
    unseen = torch.ones(VOCAB, dtype=torch.bool)
    unseen[token_ids] = False
    assert torch.equal(actual[unseen], logits[unseen])
    assert not torch.equal(actual[~unseen], logits[~unseen])


def test_repetition_penalty_does_not_modify_its_input() -> None:
    logits = random_logits(0)
    before = logits.clone()
    apply_repetition_penalty(logits, [1, 2, 3], 2.0)
    assert torch.equal(logits, before)


def test_greedy_rows_are_the_argmax() -> None:
    logits = torch.stack([random_logits(seed) for seed in SEEDS])  # [B, vocab]
    seqs = [make_seq(SamplingParams()) for _ in SEEDS]
    assert sample(logits, seqs, set()) == logits.argmax(dim=-1).tolist()


def test_greedy_rows_are_the_argmax_beside_sampled_rows() -> None:
    logits = torch.stack([random_logits(seed, scale=1.0) for seed in SEEDS])  # [B, vocab]
    params = [SamplingParams(), SamplingParams(temperature=1.0, seed=1), SamplingParams(), SamplingParams()]
    tokens = sample(logits, [make_seq(p) for p in params], set())
    argmax = logits.argmax(dim=-1).tolist()
    assert [tokens[0], tokens[2], tokens[3]] == [argmax[0], argmax[2], argmax[3]]


def test_greedy_with_repetition_penalty_is_the_argmax_of_penalized_logits() -> None:
    logits = random_logits(2)
    top_two = torch.topk(logits, 2).indices.tolist()
    seq = make_seq(SamplingParams(repetition_penalty=1e6), prompt_ids=[top_two[0]])
    assert sample(logits[None], [seq], set()) == [top_two[1]]


def test_temperature_with_top_k_one_picks_the_argmax() -> None:
    logits = torch.stack([random_logits(seed, scale=0.1) for seed in SEEDS])  # nearly flat
    seqs = [make_seq(SamplingParams(temperature=2.0, top_k=1, seed=seed)) for seed in SEEDS]
    assert sample(logits, seqs, set()) == logits.argmax(dim=-1).tolist()


@pytest.fixture(scope="module")
def llm(tiny_llama: Path) -> Iterator[LLM]:
    engine = LLM(
        model=str(tiny_llama), quantize="none", device="cpu", engine=EngineConfig(kv_cache_tokens=2048)
    )
    yield engine
    engine.close()


def generate(llm: LLM, prompt: tuple[int, ...] = PROMPT, **params: Any) -> list[int]:
    request = GenerateRequest(
        prompt_ids=prompt, params=SamplingParams(max_new_tokens=24, ignore_eos=True, **params)
    )
    [out] = llm.generate([request])
    return list(out.token_ids)


def test_same_seed_samples_the_same_tokens(llm: LLM) -> None:
    first = generate(llm, temperature=1.0, seed=11)
    assert first == generate(llm, temperature=1.0, seed=11)
    assert first != generate(llm)  # it really sampled


def test_different_seeds_sample_different_tokens(llm: LLM) -> None:
    outputs = {tuple(generate(llm, temperature=1.0, seed=seed)) for seed in (1, 2, 3)}
    assert len(outputs) == 3


def test_seeded_request_samples_the_same_tokens_beside_other_requests(llm: LLM) -> None:
    params = SamplingParams(max_new_tokens=24, ignore_eos=True, temperature=1.0, seed=5)
    alone = generate(llm, temperature=1.0, seed=5)
    requests = [
        GenerateRequest(prompt_ids=(9, 8, 7, 6, 5, 4, 3), params=SamplingParams(temperature=1.0, seed=5)),
        GenerateRequest(prompt_ids=PROMPT, params=params),
        GenerateRequest(prompt_ids=PROMPT, params=params),
    ]
    outputs = llm.generate(requests)
    assert list(outputs[1].token_ids) == alone
    assert list(outputs[2].token_ids) == alone


@pytest.mark.parametrize("temperature", [0.5, 1.0, 5.0])
def test_sampling_with_top_k_one_equals_greedy(llm: LLM, temperature: float) -> None:
    assert generate(llm, temperature=temperature, top_k=1, seed=3) == generate(llm)


def test_sampling_with_a_tiny_top_p_equals_greedy(llm: LLM) -> None:
    assert generate(llm, temperature=1.0, top_p=1e-6, seed=3) == generate(llm)


@pytest.mark.parametrize("temperature", [1e-300, 5e-324, 1e-45])
def test_a_temperature_below_float32s_range_is_the_argmax_limit(temperature: float) -> None:
    """T -> 0 concentrates the distribution on the largest logit: float32 would divide by 0 (0 / 0 is NaN,
    which multinomial refuses, and one such row used to fail its whole batch)."""
    logits = random_logits(0)
    probs = sampling_probs(logits, SamplingParams(temperature=temperature, seed=1))
    assert torch.equal(probs, torch.nn.functional.one_hot(logits.argmax(), VOCAB).double())


def test_a_tie_at_the_top_is_shared_in_the_temperature_limit() -> None:
    logits = random_logits(1)
    top = logits.topk(2).indices
    logits[top[1]] = logits[top[0]]
    probs = sampling_probs(logits, SamplingParams(temperature=1e-300, seed=1))
    assert probs[top].tolist() == [0.5, 0.5] and probs.sum() == 1


@pytest.mark.parametrize("top_p", [1e-300, 5e-324])
def test_a_top_p_below_float32s_range_keeps_the_top_token(top_p: float) -> None:
    logits = random_logits(2)
    kept = filter_logits(logits, SamplingParams(temperature=1.0, top_p=top_p, seed=1))
    assert torch.isfinite(kept).sum() == 1 and kept.argmax() == logits.argmax()


def test_a_huge_temperature_is_uniform_and_an_infinite_logit_is_the_largest() -> None:
    logits = random_logits(3)
    assert torch.allclose(
        sampling_probs(logits, SamplingParams(temperature=1e300, seed=1)),
        torch.full((VOCAB,), 1 / VOCAB, dtype=torch.float64),
    )
    logits[7] = float("inf")
    probs = sampling_probs(logits, SamplingParams(temperature=1e-300, seed=1))
    assert probs[7] == 1


@pytest.mark.parametrize("penalty", [1e-300, 5e-324, 1e300])
def test_an_extreme_repetition_penalty_stays_in_range_and_keeps_masked_tokens_masked(penalty: float) -> None:
    logits = random_logits(4)
    logits[3] = float("-inf")  # masked before the penalty (min_tokens holding back an end token)
    seen = [1, 2, 3, int(logits.argmax())]
    penalised = apply_repetition_penalty(logits, seen, penalty)
    assert not penalised.isnan().any() and not (penalised == float("inf")).any()
    assert penalised[3] == float("-inf")
    positive = [i for i in seen if logits[i] > 0]
    if penalty < 1:
        assert all(penalised[i] == torch.finfo(torch.float32).max for i in positive)


@pytest.mark.parametrize(
    ("params", "needle"),
    [
        ({"temperature": float("inf")}, "finite"),
        ({"temperature": 0.5, "repetition_penalty": float("nan")}, "finite"),
        ({"seed": 2**64}, "seed"),
        ({"seed": -(2**63) - 1}, "seed"),
    ],
)
def test_values_no_sampler_can_use_are_refused(params: dict[str, Any], needle: str) -> None:
    with pytest.raises(ValueError, match=needle):
        SamplingParams(**params)


def test_samples_past_the_largest_seed_count_on_from_the_smallest() -> None:
    request = GenerateRequest(prompt="x", params=SamplingParams(temperature=1.0, seed=2**64 - 1))
    assert [r.params.seed for r in request.samples(3)] == [2**64 - 1, -(2**63), -(2**63) + 1]


def test_a_row_whose_logits_are_not_finite_fails_alone(llm: LLM, tiny_llama: Path, tmp_path: Path) -> None:
    """Its adapter overflowed (here: B set to inf after validation); the rows beside it keep their tokens.
    Found here: the reference LoRA op gave rows without adapter slot 0's delta times 0, and 0 * inf is NaN,
    so one broken adapter in slot 0 made every adapter-less row in its prefill NaN."""
    from tests.reference import make_lora_adapter

    adapter = make_lora_adapter(tiny_llama, tmp_path / "lora", r=4, alpha=8, target_modules=["q_proj"])
    llm.add_adapter("broken", adapter)
    loaded = llm.adapters.resolve("broken")
    assert loaded is not None and loaded.weights.lora is not None  # type: ignore[union-attr]
    loaded.weights.lora.flat.fill_(float("inf"))  # type: ignore[union-attr]
    alone = generate(llm)
    params = SamplingParams(max_new_tokens=24, ignore_eos=True)
    requests = [
        GenerateRequest(prompt_ids=PROMPT, params=params),
        GenerateRequest(prompt_ids=PROMPT, params=params, adapter_id="broken"),
        GenerateRequest(
            prompt_ids=PROMPT,
            params=SamplingParams(max_new_tokens=24, ignore_eos=True, temperature=1.0, seed=2),
        ),
    ]
    innocent, broken, sampled = llm.generate(requests)
    assert list(innocent.token_ids) == alone
    assert (
        broken.finish_reason == "error"
        and "'broken'" in (broken.error or "")
        and "not finite" in (broken.error or "")
    )
    assert list(sampled.token_ids) == generate(llm, temperature=1.0, seed=2)
