"""Decode steps through CUDA graphs' padded static buffers (cuda_graphs.py) give PEFT's greedy tokens.

On CPU the padded path runs eagerly (`capture=False`): the padding itself (pad rows without adapters that
write to a spare KV slot, masked key columns, LoRA at the slots' full rank) is what is checked. With a GPU,
graphs are captured and replayed, and their tokens must equal the eager engine's.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from adapterd.server.common.config import EngineConfig
from adapterd.server.common.protocol import GenerateRequest, SamplingParams
from adapterd.server.engine.cuda_graphs import BATCH_BUCKETS, KEY_BUCKET, bucket_keys, bucket_rows
from adapterd.server.llm import LLM
from tests.parity.test_engine_parity import PROMPTS, reference
from tests.reference import make_ia3_adapter, make_lora_adapter, make_prefix_adapter, make_prompt_adapter

CONFIG = EngineConfig(max_rank=16, max_gpu_adapters=4, max_soft_prompts=2, kv_cache_tokens=1024)
# (adapter, prompt, new tokens): rows leave the batch at different steps, so buckets change as it shrinks.
# Every kind: LoRA, DoRA and IA³ rows share the linear slots (DoRA and IA³ through the scale stacks, pad rows
# on their all-ones row), soft-prompt and prefix rows decode like any other once their prefill is done.
REQUESTS = [
    (None, PROMPTS[0], 12),
    ("r4", PROMPTS[1], 20),
    ("dora16", PROMPTS[2], 16),
    ("soft", PROMPTS[3], 24),
    ("ia3", PROMPTS[1], 14),
    ("prefix", PROMPTS[0], 18),
]


@pytest.fixture(scope="module")
def adapters(tiny_llama: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("graph-adapters")
    return {
        "r4": make_lora_adapter(tiny_llama, root / "r4", r=4, alpha=8, target_modules="all-linear", seed=1),
        "dora16": make_lora_adapter(
            tiny_llama, root / "dora16", r=16, alpha=32, target_modules="all-linear", use_dora=True, seed=2
        ),
        "soft": make_prompt_adapter(tiny_llama, root / "soft", num_virtual_tokens=6, seed=3),
        "ia3": make_ia3_adapter(tiny_llama, root / "ia3", seed=4),
        "prefix": make_prefix_adapter(tiny_llama, root / "prefix", num_virtual_tokens=5, seed=5),
    }


def make_llm(model: Path, adapters: dict[str, Path], device: str, config: EngineConfig = CONFIG) -> LLM:
    llm = LLM(model=str(model), quantize="none", device=device, engine=config)
    for name, path in adapters.items():
        llm.add_adapter(name, path)
    return llm


def generate(llm: LLM) -> list[list[int]]:
    requests = [
        GenerateRequest(
            prompt_ids=tuple(p), adapter_id=a, params=SamplingParams(max_new_tokens=n, ignore_eos=True)
        )
        for a, p, n in REQUESTS
    ]
    return [list(out.token_ids) for out in llm.generate(requests)]


def test_buckets() -> None:
    assert [bucket_rows(n) for n in (1, 3, 5, 17, 64, 65, 256)] == [1, 4, 8, 24, 64, 96, 256]
    assert bucket_rows(BATCH_BUCKETS[-1] + 1) is None
    assert [bucket_keys(n) for n in (1, KEY_BUCKET, KEY_BUCKET + 1)] == [
        KEY_BUCKET,
        KEY_BUCKET,
        2 * KEY_BUCKET,
    ]


def test_padded_decode_steps_give_pefts_tokens(tiny_llama: Path, adapters: dict[str, Path]) -> None:
    llm = make_llm(tiny_llama, adapters, "cpu")
    try:
        llm.engine.use_decode_graphs(capture=False)
        got = generate(llm)
        buckets = set(llm.engine.runner.graphs.graphs) if llm.engine.runner.graphs else set()
    finally:
        llm.close()
    for (adapter, prompt, new_tokens), tokens in zip(REQUESTS, got, strict=True):
        assert tokens == reference(tiny_llama, adapter and adapters[adapter], prompt)[:new_tokens], adapter
    # Six rows (bucket 8), then five, four and three (bucket 4), two, one; with LoRA and scale rows, then
    # the soft prompt's row alone.
    assert {rows for rows, _, _, _ in buckets} == {8, 4, 2, 1}
    assert (
        {has_lora for _, _, has_lora, _ in buckets}
        == {has_scales for *_, has_scales in buckets}
        == {True, False}
    )


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_replayed_graphs_give_the_eager_engines_tokens(tiny_llama: Path, adapters: dict[str, Path]) -> None:
    results = []
    for graphs in (True, False):
        config = EngineConfig(**{**vars(CONFIG), "cuda_graphs": graphs})
        llm = make_llm(tiny_llama, adapters, "cuda", config)
        try:
            results.append(generate(llm))
            assert (llm.engine.runner.graphs is not None) == graphs
            if graphs:
                assert all(g.graph is not None for g in llm.engine.runner.graphs.graphs.values())
        finally:
            llm.close()
    assert results[0] == results[1]
