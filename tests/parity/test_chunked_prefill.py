"""Chunked prefill against PEFT: a long prompt that arrives while other streams decode is prefilled a chunk
per step, prefill and decode steps alternate (the streams keep producing tokens meanwhile), and every
sequence, the long one included, generates PEFT's greedy tokens: the base, a LoRA and a soft prompt."""

from __future__ import annotations

from pathlib import Path

from adapterd.server.protocol import Completion, SamplingParams, TokenEvent
from tests.parity.test_prefix_cache import adapters, engine, reference  # noqa: F401 (the adapters fixture)

NEW_TOKENS = 12
GREEDY = SamplingParams(max_new_tokens=NEW_TOKENS, ignore_eos=True)
STREAMS = [(None, [5, 6, 7, 8]), ("lora-a", [9, 10, 11]), ("soft", [12, 13, 14, 15, 16])]
LONG = [(11 * i + 5) % 250 + 2 for i in range(150)]


def test_a_long_prompt_is_prefilled_in_chunks_between_decode_steps(tiny_llama: Path, adapters) -> None:  # noqa: F811
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
        chunks, outputs_during = 0, []
        while long.is_prefilling:
            computed = long.num_cached
            core.step()
            chunks += long.num_cached > computed
            outputs_during.append(sum(len(s.output_ids) for s in streams))
        assert chunks >= len(LONG) // 16  # a chunk per prefill step ...
        assert outputs_during[-1] - outputs_during[0] >= 3 * (
            chunks - 1
        )  # ... and the streams decode between
        while core.has_work:
            core.step()
    for i, (adapter, prompt) in enumerate(STREAMS):
        assert done[i] == reference(tiny_llama, adapters[adapter] if adapter else None, prompt, NEW_TOKENS), (
            adapter
        )
    assert done["long"] == reference(tiny_llama, adapters["lora-a"], LONG, NEW_TOKENS)
