"""Chunked prefill against PEFT: a long prompt that arrives while other streams decode is prefilled a chunk
per step, in the same steps as the streams' decode rows (mixed steps, their real tokens packed), and every
sequence, the long one included, generates PEFT's greedy tokens: the base, a LoRA and a soft prompt. The
packed layers are checked against the padded ones on the same mixed batch."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import torch

from adapterd.server.common.protocol import Completion, SamplingParams, TokenEvent
from tests.parity.test_prefix_cache import adapters, engine, reference  # noqa: F401 (the adapters fixture)

NEW_TOKENS = 12
GREEDY = SamplingParams(max_new_tokens=NEW_TOKENS, ignore_eos=True)
STREAMS = [(None, [5, 6, 7, 8]), ("lora-a", [9, 10, 11]), ("soft", [12, 13, 14, 15, 16])]
LONG = [(11 * i + 5) % 250 + 2 for i in range(150)]


def test_a_long_prompt_is_prefilled_in_chunks_within_the_decode_steps(tiny_llama: Path, adapters) -> None:  # noqa: F811
    with engine(tiny_llama, prefill_chunk_tokens=16) as llm:
        llm.add_adapter("lora-a", adapters["lora-a"])
        llm.add_adapter("soft", adapters["soft"])
        llm.loop.stop()  # this test drives the engine itself
        core, done = llm.engine, {}

        def add(key: object, adapter: str | None, prompt: list[int]) -> object:
            def sink(event: TokenEvent | Completion) -> None:
                if isinstance(event, Completion):
                    done[key] = list(event.token_ids)

            return core.add_request(str(key), prompt, GREEDY, llm.adapters.resolve(adapter), sink)

        streams = [add(i, adapter, prompt) for i, (adapter, prompt) in enumerate(STREAMS)]
        core.step()  # their prefill
        core.step()
        long = add("long", "lora-a", LONG)
        packed = record_packing(core.runner)
        steps = 0
        while long.is_prefilling:
            computed, outputs = long.num_cached, sum(len(s.output_ids) for s in streams)
            core.step()
            steps += 1
            assert long.num_cached - computed == min(16, len(LONG) - computed)  # a chunk every step ...
            assert sum(len(s.output_ids) for s in streams) == outputs + len(STREAMS)  # ... and a token each
        assert steps == -(-len(LONG) // 16) and all(packed[:steps])
        while core.has_work:
            core.step()
    for i, (adapter, prompt) in enumerate(STREAMS):
        assert done[i] == reference(tiny_llama, adapters[adapter] if adapter else None, prompt, NEW_TOKENS), (
            adapter
        )
    assert done["long"] == reference(tiny_llama, adapters["lora-a"], LONG, NEW_TOKENS)


def record_packing(runner: object) -> list[bool]:
    """Whether each step's batch ran packed (RaggedRows), from now on; the first packed one is also run
    padded, and both must give the same logits (running a batch twice rewrites the same K/V)."""
    packed: list[bool] = []
    build = runner.host_batch  # type: ignore[attr-defined]

    def recording(seqs: list, is_prefill: bool):  # type: ignore[no-untyped-def]
        batch = build(seqs, is_prefill)
        if batch.ragged is not None and not any(packed):
            ragged = runner.forward(batch)  # type: ignore[attr-defined]
            padded = runner.forward(dataclasses.replace(batch, ragged=None))  # type: ignore[attr-defined]
            torch.testing.assert_close(ragged, padded, rtol=1e-4, atol=1e-4)
            assert ragged.argmax(-1).tolist() == padded.argmax(-1).tolist()
        packed.append(batch.ragged is not None)
        return batch

    runner.host_batch = recording  # type: ignore[attr-defined]
    return packed
