"""Turns scheduled sequences into a `ForwardBatch`, runs the model, and returns next-token logits."""

from __future__ import annotations

import torch

from adapterd.server.engine.adapter_slots import AdapterSlots
from adapterd.server.engine.sequence import Sequence
from adapterd.server.model.batch import ForwardBatch, LoraBatch
from adapterd.server.model.llama import KVCache, LlamaModel


class ModelRunner:
    def __init__(self, model: LlamaModel, kv: KVCache, adapters: AdapterSlots, block_size: int) -> None:
        self.model = model
        self.kv = kv
        self.adapters = adapters
        self.block_size = block_size
        self.device = kv.k.device

    def run(self, seqs: list[Sequence], is_prefill: bool) -> torch.Tensor:
        """Logits [B, vocab] for the next token of each sequence; their K/V land in the cache."""
        batch = self.build_batch(seqs, is_prefill)
        logits = self.model(batch, self.kv)
        for seq in seqs:
            seq.num_cached = seq.num_tokens
        return logits

    def build_batch(self, seqs: list[Sequence], is_prefill: bool) -> ForwardBatch:
        starts = [seq.num_cached if is_prefill else seq.num_tokens - 1 for seq in seqs]
        new_ids = [seq.token_ids(start) for seq, start in zip(seqs, starts, strict=True)]
        dev, long = self.device, torch.long
        num_new = torch.tensor([len(ids) for ids in new_ids], dtype=long, device=dev)  # [B]
        start = torch.tensor(starts, dtype=long, device=dev)  # [B]
        width = int(num_new.max())
        cols = torch.arange(width, device=dev)[None, :]  # [1, T]
        is_real = cols < num_new[:, None]  # [B, T]
        positions = torch.where(is_real, start[:, None] + cols, 0)  # [B, T]
        context = start + num_new  # [B] keys each row sees
        key_pos = torch.arange(int(context.max()), device=dev)[None, :]  # [1, L]
        tables = self._block_tables(seqs)  # [B, max_blocks]
        write_slots = self._slots(tables, positions)[is_real]  # row-major over the real tokens
        read_slots = self._slots(tables, torch.where(key_pos < context[:, None], key_pos, 0))
        attn_mask = (key_pos[:, None, :] <= positions[:, :, None]) & (key_pos < context[:, None])[:, None, :]
        return ForwardBatch(
            input_ids=self._padded(new_ids, width),
            positions=positions,
            write_index=write_slots,
            real_tokens=None if bool(is_real.all()) else is_real.flatten().nonzero().squeeze(1),
            read_slots=read_slots,
            attn_mask=attn_mask[:, None],  # [B, 1, T, L]; padding queries see key 0 only
            last_index=num_new - 1,
            lora=self._lora_batch(seqs),
            prompt_slots=self._slots_tensor(self._adapter_slots(seqs, lora=False)),
            prompt_lengths=torch.tensor([s.num_virtual for s in seqs], dtype=long, device=dev),
        )

    def _slots(self, tables: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        blocks = torch.gather(tables, 1, positions // self.block_size)
        return blocks * self.block_size + positions % self.block_size

    def _block_tables(self, seqs: list[Sequence]) -> torch.Tensor:
        width = max(len(s.block_table) for s in seqs)
        rows = [s.block_table + [0] * (width - len(s.block_table)) for s in seqs]
        return torch.tensor(rows, dtype=torch.long, device=self.device)

    def _padded(self, rows: list[list[int]], width: int) -> torch.Tensor:
        padded = [row + [0] * (width - len(row)) for row in rows]
        return torch.tensor(padded, dtype=torch.long, device=self.device)

    def _lora_batch(self, seqs: list[Sequence]) -> LoraBatch:
        slots = self._adapter_slots(seqs, lora=True)
        rank = max((s.adapter.rank for s in seqs if s.adapter), default=0)
        shared = slots[0] if len(set(slots)) == 1 and slots[0] >= 0 else None
        return LoraBatch(self._slots_tensor(slots), rank, shared)

    def _adapter_slots(self, seqs: list[Sequence], lora: bool) -> list[int]:
        return [
            self.adapters.slot_of(s.adapter) if s.adapter and s.adapter.is_lora == lora else -1 for s in seqs
        ]

    def _slots_tensor(self, slots: list[int]) -> torch.Tensor:
        return torch.tensor(slots, dtype=torch.long, device=self.device)
