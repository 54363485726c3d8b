"""DoRA, IA³, prefix tuning and P-tuning as PEFT computes them: greedy tokens and per-position
log-probabilities of adapterd equal those of PEFT's own forward pass on a tiny random Llama, each kind alone
and all six kinds with the base in one batch; prefix-tuning KV blocks hold the adapter's keys and values,
are shared through the prefix cache, never written by requests, and freed."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from adapterd.server.common.config import EngineConfig
from adapterd.server.common.protocol import GenerateRequest, SamplingParams
from adapterd.server.llm import LLM
from tests.reference import (
    greedy_forward,
    greedy_generate,
    is_prompt_learning,
    load_base,
    load_peft,
    make_ia3_adapter,
    make_lora_adapter,
    make_p_tuning_adapter,
    make_prefix_adapter,
    make_prompt_adapter,
    next_token_logprobs,
)

NEW_TOKENS = 16
GREEDY = SamplingParams(max_new_tokens=NEW_TOKENS, ignore_eos=True)
PROMPTS = [[5, 6, 7, 8, 9], [10, 20, 30], list(range(40, 77)), [100, 3, 100, 3, 7, 19, 200, 201]]
ATTENTION = ["q_proj", "k_proj", "v_proj", "o_proj"]
PREFIX_TOKENS = 20  # one whole 16-token KV block and part of a second


def make_adapters(base: Path, root: Path) -> dict[str, Path]:
    return {
        "lora": make_lora_adapter(base, root / "lora", r=8, alpha=16, target_modules=ATTENTION, seed=1),
        "dora-qv": make_lora_adapter(
            base, root / "dora-qv", r=4, alpha=8, target_modules=["q_proj", "v_proj"], use_dora=True, seed=2
        ),
        "dora-all-rslora": make_lora_adapter(
            base,
            root / "dora-all",
            r=16,
            alpha=32,
            target_modules="all-linear",
            use_rslora=True,
            use_dora=True,
            seed=3,
        ),
        "ia3": make_ia3_adapter(base, root / "ia3", seed=4),  # PEFT's defaults: k, v and down (its input)
        "ia3-mlp": make_ia3_adapter(
            base,
            root / "ia3-mlp",
            target_modules=["q_proj", "gate_proj", "up_proj"],
            feedforward_modules=["up_proj"],
            seed=5,
        ),
        "soft": make_prompt_adapter(base, root / "soft", num_virtual_tokens=8, seed=6),
        "p-tuning": make_p_tuning_adapter(base, root / "p-tuning", num_virtual_tokens=5, seed=7),
        "prefix": make_prefix_adapter(base, root / "prefix", num_virtual_tokens=PREFIX_TOKENS, seed=8),
        "prefix-short": make_prefix_adapter(base, root / "prefix-short", num_virtual_tokens=3, seed=9),
    }


NEW_KINDS = ["dora-qv", "dora-all-rslora", "ia3", "ia3-mlp", "p-tuning", "prefix", "prefix-short"]


@pytest.fixture(scope="module")
def adapters(tiny_llama: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    return make_adapters(tiny_llama, tmp_path_factory.mktemp("kinds"))


def engine_config() -> EngineConfig:
    return EngineConfig(max_rank=16, max_gpu_adapters=6, max_soft_prompts=3, kv_cache_tokens=4096)


@pytest.fixture(scope="module")
def llm(tiny_llama: Path, adapters: dict[str, Path]):
    engine = LLM(model=str(tiny_llama), quantize="none", device="cpu", engine=engine_config())
    for name, path in adapters.items():
        engine.add_adapter(name, path)
    yield engine
    engine.close()


def reference_tokens(base: Path, adapter: Path | None, prompt: list[int]) -> list[int]:
    if adapter is None:
        return greedy_generate(load_base(base), prompt, NEW_TOKENS)
    model = load_peft(base, adapter)
    return (greedy_forward if is_prompt_learning(adapter) else greedy_generate)(model, prompt, NEW_TOKENS)


def run(llm: LLM, requests: list[tuple[str | None, list[int]]], params: SamplingParams = GREEDY):
    return llm.generate(
        [GenerateRequest(prompt_ids=tuple(p), adapter_id=a, params=params) for a, p in requests]
    )


@pytest.mark.parametrize("name", NEW_KINDS)
def test_kind_alone_equals_peft(llm: LLM, tiny_llama: Path, adapters: dict[str, Path], name: str):
    prompt = PROMPTS[0]
    expected = reference_tokens(tiny_llama, adapters[name], prompt)
    assert expected != reference_tokens(tiny_llama, None, prompt), "the adapter must change the output"
    [out] = run(llm, [(name, prompt)])
    assert list(out.token_ids) == expected


@pytest.mark.parametrize("name", NEW_KINDS)
def test_prompt_logprobs_equal_peft_forward(llm: LLM, tiny_llama: Path, adapters: dict[str, Path], name: str):
    """Every position's log-probability of the actual next prompt token, as PEFT's forward pass gives it."""
    prompt = PROMPTS[2]
    [out] = run(llm, [(name, prompt)], SamplingParams(max_new_tokens=1, prompt_logprobs=0))
    assert out.prompt_logprobs is not None
    ours = torch.tensor([score.logprob for score in out.prompt_logprobs[1:]])
    theirs = next_token_logprobs(load_peft(tiny_llama, adapters[name]), prompt)
    expected = theirs[torch.arange(len(prompt) - 1), torch.tensor(prompt[1:])]
    base = next_token_logprobs(load_base(tiny_llama), prompt)[
        torch.arange(len(prompt) - 1), torch.tensor(prompt[1:])
    ]
    assert (expected - base).abs().max() > 0.1, "the adapter must change the scores"
    torch.testing.assert_close(ours, expected, atol=2e-4, rtol=0)


MIXED = [  # every kind and the base in one continuous batch, with prompts of different lengths
    (None, PROMPTS[0]),
    ("lora", PROMPTS[1]),
    ("dora-all-rslora", PROMPTS[2]),
    ("dora-qv", PROMPTS[3]),
    ("ia3", PROMPTS[1]),
    ("ia3-mlp", PROMPTS[2]),
    ("soft", PROMPTS[3]),
    ("p-tuning", PROMPTS[0]),
    ("prefix", PROMPTS[1]),
    ("prefix-short", PROMPTS[2]),
]


def test_mixed_batch_of_every_kind_equals_peft_row_by_row(
    llm: LLM, tiny_llama: Path, adapters: dict[str, Path]
):
    expected = [reference_tokens(tiny_llama, adapters[a] if a else None, p) for a, p in MIXED]
    outputs = run(llm, MIXED)
    assert [list(o.token_ids) for o in outputs] == expected


def test_prefix_blocks_hold_the_adapter_and_are_shared_and_freed(tiny_llama: Path, adapters: dict[str, Path]):
    llm = LLM(model=str(tiny_llama), quantize="none", device="cpu", engine=engine_config())
    try:
        llm.add_adapter("prefix", adapters["prefix"])
        expected = reference_tokens(tiny_llama, adapters["prefix"], PROMPTS[3])
        first = run(llm, [("prefix", PROMPTS[3])])
        blocks = llm.engine.blocks
        hits_before = blocks.hit_tokens
        again = run(llm, [("prefix", p) for p in PROMPTS])  # four requests at once, on the cached prefix
        assert [list(o.token_ids) for o in first + again[3:]] == [expected, expected]
        assert blocks.hit_tokens - hits_before == 4 * 16, "each request takes the cached whole prefix block"
        adapter = llm.adapters.resolve("prefix")
        assert adapter is not None
        kv, size = llm.engine.runner.kv, blocks.block_size
        held = [b for b in range(blocks.num_blocks) if _holds_prefix(kv, b, size, adapter.weights)]
        assert held, "the whole prefix block is in the cache"
        assert blocks.num_free_blocks == blocks.num_blocks, "every block is free or evictable again"
    finally:
        llm.close()


def _holds_prefix(kv, block: int, size: int, weights) -> bool:
    """Whether `block` holds the prefix's first 16 keys and values in every layer, bit for bit."""
    slots = slice(block * size, (block + 1) * size)
    return all(
        torch.equal(kv.k[layer, slots], weights.keys[layer, :size])
        and torch.equal(kv.v[layer, slots], weights.values[layer, :size])
        for layer in range(kv.k.shape[0])
    )


NF4_NOISE = 0.15  # noise of bitsandbytes CPU NF4 kernels (bf16 activations; PEFT here without repacking)


@pytest.fixture(scope="module")
def nf4_llm(tiny_llama: Path, adapters: dict[str, Path]):
    engine = LLM(model=str(tiny_llama), quantize="nf4", device="cpu", engine=engine_config())
    for name in NEW_KINDS:
        engine.add_adapter(name, adapters[name])
    yield engine
    engine.close()


@pytest.mark.parametrize("name", NEW_KINDS)
def test_on_nf4_scores_follow_peft_on_the_same_quantized_base(
    nf4_llm: LLM, tiny_llama: Path, adapters: dict[str, Path], name: str
):
    """DoRA's norms use the dequantized NF4 weight on both sides; every kind's per-position scores stay within
    the kernels' noise of PEFT's, while the adapter moves them by far more. PEFT runs without bitsandbytes'
    CPU repacking: with it, its DoRA norms are wrong on AVX512-BF16 CPUs (server/model/dense.py)."""
    from tests.parity.test_quantized_parity import BNB

    prompt = PROMPTS[2]
    [out] = run(nf4_llm, [(name, prompt)], SamplingParams(max_new_tokens=1, prompt_logprobs=0))
    assert out.prompt_logprobs is not None
    ours = torch.tensor([score.logprob for score in out.prompt_logprobs[1:]])
    targets = (torch.arange(len(prompt) - 1), torch.tensor(prompt[1:]))
    peft = without_cpu_repacking(load_peft(tiny_llama, adapters[name], quantization_config=BNB["nf4"]))
    theirs = next_token_logprobs(peft, prompt)[targets]
    base = next_token_logprobs(load_base(tiny_llama, quantization_config=BNB["nf4"]), prompt)[targets]
    assert (theirs - base).abs().max() > 5 * NF4_NOISE, "the adapter must change the scores"
    assert (ours - theirs).abs().max() < NF4_NOISE


def without_cpu_repacking(model):
    """`model` with bitsandbytes' AVX512-BF16 weight repacking off, so that PEFT's DoRA, which dequantizes the
    weight after the base layer's first forward, reads the NF4 weight and not the repacked bytes (see
    server/model/dense.py and the test below)."""
    for module in model.modules():
        if hasattr(module, "support_avx512bf16_for_cpu"):
            module.support_avx512bf16_for_cpu = False
    return model


def test_the_dense_nf4_weight_survives_bitsandbytes_cpu_repacking(tiny_llama: Path):
    import bitsandbytes as bnb

    from adapterd.server.model.dense import dense_weight
    from tests.parity.test_quantized_parity import BNB

    model = load_base(tiny_llama, quantization_config=BNB["nf4"])
    linear = model.model.layers[0].self_attn.q_proj
    before = dense_weight(linear)
    with torch.no_grad():
        model(input_ids=torch.tensor([[5, 6, 7]]))
    if not getattr(linear.weight.quant_state, "packing_format_for_cpu", False):
        pytest.skip("this CPU has no AVX512-BF16: bitsandbytes does not repack")
    naive = bnb.functional.dequantize_4bit(linear.weight.data, linear.weight.quant_state).float()
    assert (naive - before).abs().max() > before.abs().max() / 2, "the naive read is garbage"
    torch.testing.assert_close(dense_weight(linear), before, atol=2e-2 * before.abs().max().item(), rtol=0)
