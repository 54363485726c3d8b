"""Prefix caching in the engine, checked against PEFT: a request whose leading blocks come from the cache
generates what PEFT generates (for the base, a LoRA and a soft prompt), another adapter or a new version of
the same one gets no hit, and under KV pressure (preemption and recompute) and cancellation no block leaks."""

from __future__ import annotations

from pathlib import Path

import pytest

from adapterd.server.common.config import EngineConfig
from adapterd.server.common.protocol import GenerateRequest, SamplingParams
from adapterd.server.llm import LLM
from tests.reference import make_lora_adapter, make_prompt_adapter, peft_greedy

NEW_TOKENS = 12
GREEDY = SamplingParams(max_new_tokens=NEW_TOKENS, ignore_eos=True)
SYSTEM = [(7 * i + 3) % 250 + 2 for i in range(64)]  # a 64-token "system prompt": four 16-token blocks
PROMPTS = [[*SYSTEM, 5, 6, 7], [*SYSTEM, 8, 9], [*SYSTEM, 5, 6, 7]]


@pytest.fixture(scope="module")
def adapters(tiny_llama: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("prefix-adapters")
    return {
        "lora-a": make_lora_adapter(
            tiny_llama, root / "a", r=8, alpha=16, target_modules="all-linear", seed=1
        ),
        "lora-a2": make_lora_adapter(
            tiny_llama, root / "a2", r=8, alpha=16, target_modules="all-linear", seed=2
        ),
        "soft": make_prompt_adapter(tiny_llama, root / "soft", num_virtual_tokens=8, seed=3),
    }


def reference(base: Path, adapter: Path | None, prompt: list[int], new_tokens: int = NEW_TOKENS) -> list[int]:
    return peft_greedy(base, adapter, prompt, new_tokens)


def engine(tiny_llama: Path, **config: int) -> LLM:
    defaults = {"max_rank": 8, "max_gpu_adapters": 2, "max_soft_prompts": 1, "kv_cache_tokens": 4096}
    return LLM(
        model=str(tiny_llama), quantize="none", device="cpu", engine=EngineConfig(**{**defaults, **config})
    )


def run(llm: LLM, adapter_id: str | None, prompt: list[int]) -> list[int]:
    [out] = llm.generate([GenerateRequest(prompt_ids=tuple(prompt), adapter_id=adapter_id, params=GREEDY)])
    return list(out.token_ids)


def test_cached_prefixes_give_peft_tokens_and_stay_with_their_model(
    tiny_llama: Path, adapters: dict[str, Path]
) -> None:
    with engine(tiny_llama) as llm:
        llm.add_adapter("lora-a", adapters["lora-a"])
        llm.add_adapter("soft", adapters["soft"])
        blocks = llm.engine.blocks
        for name in (None, "lora-a", "soft"):
            path = adapters[name] if name else None
            before = blocks.hit_tokens
            first = run(llm, name, PROMPTS[0])
            assert blocks.hit_tokens == before, f"{name}: hit another model's blocks"
            second, third = run(llm, name, PROMPTS[1]), run(llm, name, PROMPTS[2])
            assert blocks.hit_tokens - before == 64 + 64  # the shared system prompt, twice
            assert first == third == reference(tiny_llama, path, PROMPTS[0]), name
            assert second == reference(tiny_llama, path, PROMPTS[1]), name
        # A new version of an adapter (a re-upload) never reuses the old version's blocks.
        llm.add_adapter("lora-a", adapters["lora-a2"])
        before = blocks.hit_tokens
        assert run(llm, "lora-a", PROMPTS[0]) == reference(tiny_llama, adapters["lora-a2"], PROMPTS[0])
        assert blocks.hit_tokens == before


def test_kv_pressure_preemption_and_cancellation_leak_no_block(
    tiny_llama: Path, adapters: dict[str, Path]
) -> None:
    """A cache of 24 blocks for 8 requests of 5 blocks each: the engine preempts and recomputes (from the
    cache where it can), and every answer is still PEFT's."""
    requests = [(None if i % 2 else "lora-a", SYSTEM[: 48 + i]) for i in range(8)]
    with engine(tiny_llama, kv_cache_tokens=24 * 16) as llm:
        llm.add_adapter("lora-a", adapters["lora-a"])
        outputs = llm.generate(
            [GenerateRequest(prompt_ids=tuple(p), adapter_id=a, params=GREEDY) for a, p in requests]
        )
        assert llm.engine.scheduler.num_preemptions > 0
        for (name, prompt), out in zip(requests, outputs, strict=True):
            assert list(out.token_ids) == reference(tiny_llama, adapters[name] if name else None, prompt)
        long = GenerateRequest(
            prompt_ids=tuple(SYSTEM), params=SamplingParams(max_new_tokens=200, ignore_eos=True)
        )
        events = llm.stream(long)
        next(events)
        events.close()  # the client went away: the request is cancelled
        llm.loop.call(lambda e: None).result(timeout=30)  # one step later it has been freed
        blocks = llm.engine.blocks
        assert blocks.num_free_blocks == blocks.num_blocks and not any(blocks.refs)
