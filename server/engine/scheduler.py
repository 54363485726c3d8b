"""Continuous batching: each step either prefills newly admitted sequences or decodes the running ones.

Admission is FIFO and needs three things: a batch row, KV blocks for the whole prefill, and a slot for the
sequence's adapter. A sequence first takes whatever leading blocks the prefix cache holds for its model and
tokens; only the rest is prefilled (and counts against the step's prefill budget). When decoding runs out of KV blocks the newest running sequence is preempted: its
blocks are freed and it goes back to the front of the queue, to be recomputed later.
"""

from __future__ import annotations

from collections import deque

from adapterd.server.config import EngineConfig
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
        """The sequences of the next step, and whether it is a prefill step."""
        admitted = self._admit()
        if admitted:
            return admitted, True
        return self._reserve_decode(), False

    def finish(self, seq: Sequence) -> None:
        if seq in self.running:
            self.running.remove(seq)
            self._release(seq)
        elif seq in self.waiting:
            self.waiting.remove(seq)

    def _admit(self) -> list[Sequence]:
        admitted: list[Sequence] = []
        num_prefill_tokens = 0
        while self.waiting and len(self.running) < self.config.max_batch:
            seq = self.waiting[0]
            num_hit = self.blocks.reuse_prefix(seq)
            num_new = seq.num_tokens - num_hit
            too_many_tokens = num_prefill_tokens + num_new > self.config.max_prefill_tokens
            if (admitted and too_many_tokens) or not self._can_admit(seq):
                self.blocks.free(seq)  # the cached blocks it took go back (they stay cached)
                break
            self.blocks.record_admission(seq.num_tokens, num_hit)
            self.waiting.popleft()
            self.adapters.acquire(seq.adapter)
            self.blocks.allocate(seq, seq.num_tokens)
            seq.status = Status.RUNNING
            self.running.append(seq)
            admitted.append(seq)
            num_prefill_tokens += num_new
        return admitted

    def _can_admit(self, seq: Sequence) -> bool:
        return self.blocks.can_allocate(seq, seq.num_tokens) and self.adapters.can_place(seq.adapter)

    def _reserve_decode(self) -> list[Sequence]:
        """Make room in the cache for one more token of every running sequence, preempting if needed."""
        scheduled: list[Sequence] = []
        for seq in list(self.running):
            if seq not in self.running:
                continue  # preempted while making room for an older sequence
            while not self.blocks.can_allocate(seq, seq.num_tokens):
                self._preempt(self.running[-1])
                if seq not in self.running:
                    break
            else:
                self.blocks.allocate(seq, seq.num_tokens)
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
