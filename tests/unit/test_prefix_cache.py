"""The block allocator's prefix cache: whole blocks of the same model and leading tokens are shared with
reference counts, never across adapters or adapter versions, evicted least recently used, and nothing leaks."""

from __future__ import annotations

import random

from adapterd.adapters.format import AdapterSpec
from adapterd.server.common.protocol import SamplingParams
from adapterd.server.engine.adapter_slots import LoadedAdapter
from adapterd.server.engine.kv_cache import BlockAllocator
from adapterd.server.engine.sequence import Sequence

BLOCK = 4


def seq(tokens: list[int], adapter: LoadedAdapter | None = None, **params: object) -> Sequence:
    return Sequence("r", list(tokens), SamplingParams(**params), lambda event: None, None, adapter)  # type: ignore[arg-type]


def prefill(blocks: BlockAllocator, s: Sequence) -> int:
    """What the scheduler and the engine do around one prefill; returns the tokens taken from the cache."""
    hit = blocks.reuse_prefix(s)
    blocks.allocate(s, s.num_tokens)
    s.num_cached = s.num_tokens
    blocks.commit(s)
    return hit


def lora(adapter_id: str, version: int, digest: str) -> LoadedAdapter:
    spec = AdapterSpec.__new__(AdapterSpec)  # the cache reads only the id, version and digest
    return LoadedAdapter(adapter_id, spec, version=version, digest=digest)


def test_whole_blocks_of_the_same_prefix_are_shared() -> None:
    blocks = BlockAllocator(16, BLOCK)
    first = seq(list(range(10)))  # blocks [0..3] [4..7] and a partial one
    assert prefill(blocks, first) == 0 and blocks.num_cached_blocks == 2
    second = seq([*range(8), 99, 98, 97])
    assert prefill(blocks, second) == 8  # both full blocks; the partial block is never shared
    assert second.block_table[:2] == first.block_table[:2] and second.block_table[2] != first.block_table[2]
    assert [blocks.refs[b] for b in first.block_table] == [2, 2, 1]
    exact = seq(list(range(8)))  # all of it cached: its last token is computed anyway, for the logits
    assert prefill(blocks, exact) == 4
    for s in (first, second, exact):
        blocks.free(s)
    assert blocks.num_free_blocks == 16 and not any(blocks.refs)


def test_no_sharing_across_models_or_versions() -> None:
    blocks = BlockAllocator(32, BLOCK)
    tokens = list(range(9))
    a1, a2, same_number = (
        lora("a", 1, "aaa"),
        lora("a", 2, "bbb"),
        lora("a", 1, "ccc"),
    )  # re-uploaded after delete
    for model in (None, a1, a2, same_number, lora("b", 1, "aaa")):
        assert prefill(blocks, seq(tokens, model)) == 0
    assert prefill(blocks, seq(tokens, a1)) == 8 and prefill(blocks, seq(tokens)) == 8


def test_prompt_scores_take_nothing_from_the_cache() -> None:
    blocks = BlockAllocator(16, BLOCK)
    prefill(blocks, seq(list(range(9))))
    assert prefill(blocks, seq(list(range(9)), prompt_logprobs=0)) == 0


def test_free_cached_blocks_are_evicted_least_recently_used_and_nothing_leaks() -> None:
    blocks = BlockAllocator(8, BLOCK)
    old, new = seq(list(range(100, 108))), seq(list(range(200, 208)))
    for s in (old, new):
        prefill(blocks, s)
        blocks.free(s)
    assert blocks.num_cached_blocks == 4 and blocks.num_free_blocks == 8
    held = seq(list(range(300, 316)))
    prefill(blocks, held)  # needs 4 fresh blocks: the 4 empty ones, no eviction
    assert blocks.num_cached_blocks == 4 + 4 and blocks.num_free_blocks == 4
    # One more evicts the least recently freed block: old's last (a sequence frees its blocks tail first,
    # so that the head of a prefix, which more prompts share, stays longest).
    prefill(blocks, seq(list(range(400, 404))))
    assert blocks.num_cached_blocks == 8 and blocks.num_free_blocks == 3
    assert blocks.reuse_prefix(seq(list(range(200, 209)))) == 8  # new's prefix survived
    assert blocks.reuse_prefix(seq(list(range(100, 109)))) == 4  # old's first block only

    rng, live = random.Random(0), []
    blocks = BlockAllocator(64, BLOCK)
    for _ in range(2000):
        if live and (len(live) > 6 or rng.random() < 0.5):
            blocks.free(live.pop(rng.randrange(len(live))))
        else:
            s = seq(
                [rng.randrange(3) for _ in range(rng.randrange(1, 20))], rng.choice([None, lora("x", 1, "d")])
            )
            if blocks.can_allocate(s, s.num_tokens):
                prefill(blocks, s)
                live.append(s)
    for s in live:
        blocks.free(s)
    assert blocks.num_free_blocks == 64 and not any(blocks.refs)
    assert len(blocks.cached) == len(blocks.key_of) == len(blocks.evictable) == blocks.num_cached_blocks
