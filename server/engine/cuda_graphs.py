"""Decode steps replayed from CUDA graphs: one graph per (batch rows, key columns, LoRA on/off) bucket.

A decode step of an 8B model is hundreds of small kernels whose launch cost, not the GPU, sets its time
(../shared/gpu/README.md measures ~50x over the memory floor). A captured graph replays them all in one
launch. Graphs need fixed shapes and addresses, so each step is padded up to its bucket and copied into
the bucket's static input tensors:
- pad rows have no adapter (LoRA slot -1), attend to key 0 only, and write their K/V to a spare cache slot
  that no sequence owns (`pad_slot`);
- pad key columns are masked out;
- LoRA runs at the slots' full rank (padded rank columns are exact zeros), so one graph serves every mix
  of adapters; a batch without LoRA rows uses its own graph that skips the LoRA work.
The KV cache, adapter slots and soft-prompt pool are fixed tensors filled in place, so graphs captured
once stay valid while adapters come and go. Prefill steps, and decode steps past the largest bucket,
run eagerly. `capture=False` runs the same padded static path eagerly (how CPU tests check the padding).
"""

from __future__ import annotations

import bisect
import dataclasses
import logging
from collections.abc import Callable
from dataclasses import dataclass

import torch

from adapterd.server.model.batch import ForwardBatch, LoraBatch

log = logging.getLogger("adapterd.engine")

BATCH_BUCKETS = (1, 2, 4, 8, 16, 24, 32, 48, 64, 96, 128, 192, 256)
KEY_BUCKET = 256  # key columns are rounded up to a multiple of this

Forward = Callable[[ForwardBatch], torch.Tensor]


def bucket_rows(rows: int) -> int | None:
    """The smallest batch bucket that holds `rows`, None past the largest."""
    i = bisect.bisect_left(BATCH_BUCKETS, rows)
    return BATCH_BUCKETS[i] if i < len(BATCH_BUCKETS) else None


def bucket_keys(keys: int) -> int:
    return -(-keys // KEY_BUCKET) * KEY_BUCKET


def is_decode(batch: ForwardBatch) -> bool:
    """One new token a row and no soft-prompt or prefix rows to fill in: the shape graphs replay."""
    return (
        batch.input_ids.shape[1] == 1
        and batch.real_tokens is None
        and not batch.has_soft_prompts
        and batch.prefix is None
    )


def pad_decode_batch(
    batch: ForwardBatch, rows: int, keys: int, lora_rank: int, pad_slot: int, ones_slot: int = -1
) -> ForwardBatch:
    """`batch` (a decode step, on the host) padded to `rows` x `keys`; see the module docstring."""
    real = batch.read_slots.shape[0]

    def padded(tensor: torch.Tensor, fill: int | bool, shape: tuple[int, ...]) -> torch.Tensor:
        out = torch.full(shape, fill, dtype=tensor.dtype)
        out[tuple(slice(0, n) for n in tensor.shape)] = tensor
        return out

    attn_mask = padded(batch.attn_mask, False, (rows, 1, 1, keys))
    attn_mask[real:, 0, 0, 0] = True  # a pad row attends to key 0, so its softmax stays finite
    lora = LoraBatch(padded(batch.lora.slots, -1, (rows,)), lora_rank if batch.lora.rank else 0)
    if batch.lora.scale_slots is not None:  # every linear scales, from the same static slots
        lora = dataclasses.replace(lora, scale_slots=padded(batch.lora.scale_slots, ones_slot, (rows,)))
    return ForwardBatch(
        input_ids=padded(batch.input_ids, 0, (rows, 1)),
        positions=padded(batch.positions, 0, (rows, 1)),
        write_index=padded(batch.write_index, pad_slot, (rows,)),
        real_tokens=None,
        read_slots=padded(batch.read_slots, 0, (rows, keys)),
        attn_mask=attn_mask,
        last_index=torch.zeros(rows, dtype=torch.long),
        lora=lora,
        prompt_slots=padded(batch.prompt_slots, -1, (rows,)),
        prompt_lengths=padded(batch.prompt_lengths, 0, (rows,)),
        has_soft_prompts=False,
    )


@dataclass
class _Graph:
    inputs: ForwardBatch  # static tensors on the device
    output: torch.Tensor | None = None  # static logits [rows, vocab], once captured
    graph: torch.cuda.CUDAGraph | None = None


class DecodeGraphs:
    def __init__(
        self,
        forward: Forward,
        device: torch.device,
        max_rows: int,
        lora_rank: int,
        pad_slot: int,
        capture: bool,
        ones_slot: int = -1,
    ) -> None:
        self.forward = forward
        self.device = device
        self.max_rows = min(max_rows, BATCH_BUCKETS[-1])
        self.lora_rank = lora_rank
        self.pad_slot = pad_slot
        self.ones_slot = ones_slot  # the scale stacks' all-ones row
        self.capture = capture
        self.graphs: dict[tuple[int, int, bool, bool], _Graph] = {}
        self.pool = torch.cuda.graph_pool_handle() if capture else None

    def accepts(self, batch: ForwardBatch) -> bool:
        return is_decode(batch) and batch.input_ids.shape[0] <= self.max_rows

    def run(self, batch: ForwardBatch) -> torch.Tensor:
        """Logits [B, vocab] of a decode step given on the host (see `accepts`)."""
        real = batch.input_ids.shape[0]
        rows = bucket_rows(real)
        assert rows is not None
        scales = batch.lora.scale_slots is not None
        key = (rows, bucket_keys(batch.read_slots.shape[1]), batch.lora.rank > 0, scales)
        padded = pad_decode_batch(batch, rows, key[1], self.lora_rank, self.pad_slot, self.ones_slot)
        entry = self.graphs.get(key)
        if entry is None:
            entry = self.graphs[key] = _Graph(padded.to(self.device))
            if self.capture:
                try:
                    self._capture(entry)
                except RuntimeError:  # run this bucket eagerly from its static inputs from now on
                    log.exception("capturing a decode graph failed; that batch shape runs eagerly")
                    entry.graph, entry.output = None, None
        else:
            entry.inputs.copy_(padded)
        if entry.graph is None:
            return self.forward(entry.inputs)[:real]
        entry.graph.replay()
        assert entry.output is not None
        return entry.output[:real]

    def _capture(self, entry: _Graph) -> None:
        """Warm up on a side stream (kernels compile, allocators settle), then record one forward."""
        stream = torch.cuda.Stream(self.device)
        stream.wait_stream(torch.cuda.current_stream(self.device))
        with torch.cuda.stream(stream):
            for _ in range(2):
                self.forward(entry.inputs)
        torch.cuda.current_stream(self.device).wait_stream(stream)
        graph = torch.cuda.CUDAGraph()
        # thread_local: other threads (the registry pinning host memory for an adapter) may call CUDA meanwhile.
        with torch.cuda.graph(graph, pool=self.pool, capture_error_mode="thread_local"):
            entry.output = self.forward(entry.inputs)
        entry.graph = graph
        log.info("captured a decode graph: %d rows, %d keys", *entry.inputs.read_slots.shape)
