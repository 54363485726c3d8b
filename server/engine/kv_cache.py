"""Block allocation for the paged KV cache, with adapter-aware prefix caching.

A sequence owns whole blocks of `block_size` token slots. Once a block is full and computed it is
content-addressed: its key chains the keys of the blocks before it, so a key stands for the whole prefix up
to the block's end, and it starts from the sequence's model (the base, or an adapter's id, version and weights' digest: a
LoRA changes every layer's keys and values, and a soft prompt's virtual tokens are part of the prefix). A
later sequence with the same model and the same leading tokens takes those blocks instead of recomputing
them; blocks are shared with reference counts, and cached blocks no sequence holds are evicted least
recently used first when a fresh block is needed. Keys are BLAKE2b digests, so that no prompt can be
crafted to collide with another's.
"""

from __future__ import annotations

import hashlib
from array import array
from collections import OrderedDict

from adapterd.server.engine.sequence import Sequence


class BlockAllocator:
    def __init__(self, num_blocks: int, block_size: int, prefix_caching: bool = True) -> None:
        self.block_size = block_size
        self.num_blocks = num_blocks
        self.prefix_caching = prefix_caching
        self.free_blocks = list(range(num_blocks - 1, -1, -1))  # blocks holding nothing worth keeping
        self.refs = [0] * num_blocks  # sequences holding each block
        self.cached: dict[bytes, int] = {}  # prefix key -> the block holding that prefix's last tokens
        self.key_of: dict[int, bytes] = {}
        self.evictable: OrderedDict[int, None] = OrderedDict()  # cached blocks nobody holds, LRU first
        self.queried_tokens = 0  # prompt tokens of admitted sequences
        self.hit_tokens = 0  # of those, tokens taken from the cache

    @property
    def num_free_blocks(self) -> int:
        return len(self.free_blocks) + len(self.evictable)

    @property
    def num_cached_blocks(self) -> int:
        return len(self.cached)

    def blocks_needed(self, seq: Sequence, num_tokens: int) -> int:
        return max(0, -(-num_tokens // self.block_size) - len(seq.block_table))

    def can_allocate(self, seq: Sequence, num_tokens: int) -> bool:
        return self.blocks_needed(seq, num_tokens) <= self.num_free_blocks

    def allocate(self, seq: Sequence, num_tokens: int) -> None:
        """Grow `seq`'s block table to hold `num_tokens` tokens."""
        for _ in range(self.blocks_needed(seq, num_tokens)):
            seq.block_table.append(self._take_free())

    def free(self, seq: Sequence) -> None:
        for block in reversed(seq.block_table):
            self.refs[block] -= 1
            if self.refs[block] == 0:
                if block in self.key_of:
                    self.evictable[block] = None  # the most recently used end
                else:
                    self.free_blocks.append(block)
        seq.block_table = []
        seq.num_cached = seq.num_committed = 0

    def reuse_prefix(self, seq: Sequence) -> int:
        """Before `seq`'s prefill: take the cached blocks of its longest cached prefix of whole blocks (at
        least its last token is left to compute, for its logits). Returns the tokens taken."""
        if not self.prefix_caching or seq.block_table or seq.params.prompt_logprobs is not None:
            return 0  # prompt scores need every position's hidden state: nothing is skipped
        hits = []
        for key in self._keys(seq, (seq.num_tokens - 1) // self.block_size):
            block = self.cached.get(key)
            if block is None:
                break
            hits.append(block)
        for block in hits:
            if self.refs[block] == 0:
                del self.evictable[block]
            self.refs[block] += 1
        seq.block_table = hits
        seq.num_cached = seq.num_committed = len(hits) * self.block_size
        return seq.num_cached

    def record_admission(self, num_tokens: int, num_hit: int) -> None:
        self.queried_tokens += num_tokens
        self.hit_tokens += num_hit

    def commit(self, seq: Sequence) -> None:
        """After a step: make `seq`'s newly computed full blocks findable by their prefix key. A block whose
        prefix is already cached elsewhere (two equal prompts in one step) stays private to `seq`."""
        if not self.prefix_caching:
            return
        full = seq.num_cached // self.block_size
        first = seq.num_committed // self.block_size
        if full <= first:
            return
        keys = self._keys(seq, full)
        for index in range(first, full):
            block, key = seq.block_table[index], keys[index]
            if block not in self.key_of and key not in self.cached:
                self.cached[key] = block
                self.key_of[block] = key
        seq.num_committed = full * self.block_size

    def _take_free(self) -> int:
        if self.free_blocks:
            block = self.free_blocks.pop()
        else:
            block, _ = self.evictable.popitem(last=False)
            del self.cached[self.key_of.pop(block)]
        self.refs[block] = 1
        return block

    def _keys(self, seq: Sequence, num_blocks: int) -> list[bytes]:
        """The prefix keys of `seq`'s first `num_blocks` blocks (kept on the sequence: tokens only append)."""
        keys = seq.block_keys
        if len(keys) < num_blocks:
            size = self.block_size
            ids = seq.token_ids(len(keys) * size)
            previous = keys[-1] if keys else model_key(seq)
            for i in range(num_blocks - len(keys)):
                digest = hashlib.blake2b(previous, digest_size=16)
                digest.update(array("q", ids[i * size : (i + 1) * size]).tobytes())
                previous = digest.digest()
                keys.append(previous)
        return keys[:num_blocks]


def model_key(seq: Sequence) -> bytes:
    """What a sequence's prefix keys start from: its adapter (id, version and the digest of its weights), or
    the base model."""
    adapter = seq.adapter
    if adapter is None:
        return b"base"
    return f"adapter\0{adapter.adapter_id}\0{adapter.version}\0{adapter.digest}".encode()
