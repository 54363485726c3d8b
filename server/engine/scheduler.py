"""Continuous batching: each step decodes the running sequences and prefills (chunks of) admitted ones.

Admission is FIFO and needs three things: a batch row, KV blocks for the whole sequence, and a slot for the
sequence's adapter. A sequence first takes whatever leading blocks the prefix cache holds for its model and
tokens; only the rest is prefilled. With nothing decoding, a step prefills up to `max_prefill_tokens` new
tokens. While sequences decode, every step carries each of them one token further *and* up to
`prefill_chunk_tokens` prompt tokens of the admitted ones (a mixed step; the model packs its rows'
real tokens when their lengths differ, see `RaggedRows`), so a long prompt arriving mid-stream delays
each stream by one chunk's compute per step instead of freezing it for the whole prompt. A sequence is
sampled once its prompt is in. When decoding runs out of KV blocks the newest running sequence is
preempted: its blocks are freed and it goes back to the front of the queue, to be recomputed later.
"""

from __future__ import annotations

from collections import deque

from adapterd.server.common.config import EngineConfig
from adapterd.server.engine.adapter_slots import AdapterSlots
from adapterd.server.engine.kv_cache import BlockAllocator
from adapterd.server.engine.sequence import Sequence, Status


class Scheduler:
    def __init__(self, config: EngineConfig, blocks: BlockAllocator, adapters: AdapterSlots) -> None:
        self.config = config
        self.blocks = blocks
        self.adapters = adapters
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []
        self.num_preemptions = 0

    @property
    def has_work(self) -> bool:
        return bool(self.waiting or self.running)

    def add(self, seq: Sequence) -> None:
        self.waiting.append(seq)

    def schedule(self) -> tuple[list[Sequence], bool]:
        """The sequences of the next step (each with `num_scheduled` new tokens), and whether it prefills
        (a mixed step counts as one: every row's new tokens start at its `num_cached`)."""
        self._admit()
        decoding = [s for s in self.running if not s.is_prefilling]
        if len(decoding) == len(self.running):
            return self._reserve_decode(decoding), False
        if not decoding:
            return self._chunks(self.running, self.config.max_prefill_tokens), True
        rows = self._reserve_decode(decoding)  # may preempt, a prefilling sequence included
        prefilling = [s for s in self.running if s.is_prefilling]
        return rows + self._chunks(prefilling, self.config.prefill_chunk_tokens), True

    def _chunks(self, prefilling: list[Sequence], budget: int) -> list[Sequence]:
        """The next chunk of each prefilling sequence, oldest first, within `budget` new tokens. A sequence
        that scores its prompt goes whole (its scores need every position's hidden state in one forward)."""
        scheduled: list[Sequence] = []
        for seq in prefilling:
            remaining = seq.num_tokens - seq.num_cached
            take = remaining if seq.params.prompt_logprobs is not None else min(remaining, budget)
            if take > budget and scheduled:
                break
            seq.num_scheduled = take
            scheduled.append(seq)
            budget -= take
            if budget <= 0:
                break
        return scheduled

    def finish(self, seq: Sequence) -> None:
        if seq in self.running:
            self.running.remove(seq)
            self._release(seq)
        elif seq in self.waiting:
            self.waiting.remove(seq)

    def _admit(self) -> list[Sequence]:
        admitted: list[Sequence] = []
        while self.waiting and len(self.running) < self.config.max_batch:
            seq = self.waiting[0]
            num_hit = self.blocks.reuse_prefix(seq)
            if not self._can_admit(seq):
                self.blocks.free(seq)  # the cached blocks it took go back (they stay cached)
                break
            self.blocks.record_admission(seq.num_tokens, num_hit)
            self.waiting.popleft()
            self.adapters.acquire(seq.adapter)
            self.blocks.allocate(seq, seq.num_tokens)
            seq.status = Status.RUNNING
            self.running.append(seq)
            admitted.append(seq)
        return admitted

    def _can_admit(self, seq: Sequence) -> bool:
        return self.blocks.can_allocate(seq, seq.num_tokens) and self.adapters.can_place(seq.adapter)

    def _reserve_decode(self, decoding: list[Sequence]) -> list[Sequence]:
        """Make room in the cache for one more token of every decoding sequence, preempting if needed (the
        newest running sequence first, a prefilling one included)."""
        scheduled: list[Sequence] = []
        for seq in decoding:
            if seq not in self.running:
                continue  # preempted while making room for an older sequence
            while not self.blocks.can_allocate(seq, seq.num_tokens):
                self._preempt(self.running[-1])
                if seq not in self.running:
                    break
            else:
                self.blocks.allocate(seq, seq.num_tokens)
                seq.num_scheduled = 1
                scheduled.append(seq)
        return scheduled

    def _preempt(self, seq: Sequence) -> None:
        self.running.remove(seq)
        self._release(seq)
        seq.status = Status.WAITING
        self.waiting.appendleft(seq)
        self.num_preemptions += 1

    def _release(self, seq: Sequence) -> None:
        self.blocks.free(seq)
        self.adapters.release(seq.adapter)
