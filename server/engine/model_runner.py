"""Turns scheduled sequences into a `ForwardBatch`, runs the model, and returns next-token logits."""

from __future__ import annotations

import torch

from adapterd.server.engine.adapter_slots import AdapterSlots
from adapterd.server.engine.cuda_graphs import DecodeGraphs
from adapterd.server.engine.logprobs import score_hidden
from adapterd.server.engine.sequence import Sequence
from adapterd.server.model.batch import ForwardBatch, LoraBatch, RaggedRows
from adapterd.server.model.llama import KVCache, LlamaModel
from adapterd.server.protocol import TokenLogprob


class ModelRunner:
    def __init__(self, model: LlamaModel, kv: KVCache, adapters: AdapterSlots, block_size: int) -> None:
        self.model = model
        self.kv = kv
        self.adapters = adapters
        self.block_size = block_size
        self.device = kv.k.device
        self.graphs: DecodeGraphs | None = None  # set by the engine on CUDA (see cuda_graphs.py)

    def run(self, seqs: list[Sequence], is_prefill: bool) -> torch.Tensor:
        """Logits [B, vocab] for the next token of each sequence; their K/V land in the cache."""
        batch = self.host_batch(seqs, is_prefill)
        if self.graphs is not None and self.graphs.accepts(batch):
            logits = self.graphs.run(batch)
        elif is_prefill and any(seq.needs_prompt_scores for seq in seqs):
            logits = self._run_scoring_prompts(seqs, batch.to(self.device))
        else:
            logits = self.forward(batch.to(self.device))
        for seq in seqs:
            seq.num_cached += seq.num_scheduled
        return logits

    def forward(self, batch: ForwardBatch) -> torch.Tensor:
        return self.model(batch, self.kv)

    def _run_scoring_prompts(self, seqs: list[Sequence], batch: ForwardBatch) -> torch.Tensor:
        """A prefill that also scores the prompt tokens of the rows that asked (only theirs), all of them
        through the LM head together. Prompt token i (i >= 1) is predicted at position num_virtual + i - 1,
        so a soft prompt's virtual tokens are context, never scored."""
        x = self.model.hidden_states(batch, self.kv)  # [B, T, hidden]
        asking = [(row, seq) for row, seq in enumerate(seqs) if seq.needs_prompt_scores]
        hidden = torch.cat(
            [x[row, s.num_virtual : s.num_virtual + len(s.prompt_ids) - 1] for row, s in asking]
        )
        targets = torch.tensor(
            [t for _, s in asking for t in s.prompt_ids[1:]], dtype=torch.long, device=x.device
        )
        k = max(s.params.prompt_logprobs or 0 for _, s in asking)
        scored = score_hidden(self.model.logits, hidden, targets, k)
        start = 0
        for _, seq in asking:
            end = start + len(seq.prompt_ids) - 1
            seq.prompt_logprobs = [TokenLogprob(seq.prompt_ids[0], None), *_top(scored[start:end], seq)]
            start = end
        return self.model.last_logits(x, batch)

    def build_batch(self, seqs: list[Sequence], is_prefill: bool) -> ForwardBatch:
        return self.host_batch(seqs, is_prefill).to(self.device)

    def host_batch(self, seqs: list[Sequence], is_prefill: bool) -> ForwardBatch:
        """The step's batch, built on the host from the sequences' Python state (moving it to the device is
        one pass of non-blocking copies): no device-to-host synchronisation while a step is prepared."""
        starts = [seq.num_cached if is_prefill else seq.num_tokens - 1 for seq in seqs]
        new_ids = [seq.token_ids(start)[: seq.num_scheduled] for seq, start in zip(seqs, starts, strict=True)]
        lengths = [len(ids) for ids in new_ids]
        width, num_keys = max(lengths), max(s + n for s, n in zip(starts, lengths, strict=True))
        long = torch.long
        num_new, start = torch.tensor(lengths, dtype=long), torch.tensor(starts, dtype=long)  # [B]
        cols = torch.arange(width)[None, :]  # [1, T]
        is_real = cols < num_new[:, None]  # [B, T]
        positions = torch.where(is_real, start[:, None] + cols, 0)  # [B, T]
        context = start + num_new  # [B] keys each row sees
        key_pos = torch.arange(num_keys)[None, :]  # [1, L]
        tables = self._block_tables(seqs)  # [B, max_blocks]
        attn_mask = (key_pos[:, None, :] <= positions[:, :, None]) & (key_pos < context[:, None])[:, None, :]
        prompt_slots = self._adapter_slots(seqs, lora=False)
        lora = self._lora_batch(seqs)
        ragged = None
        if RaggedRows.worth_it(lengths):
            contexts = [s + n for s, n in zip(starts, lengths, strict=True)]
            token_lora = LoraBatch(lora.slots.repeat_interleave(num_new), lora.rank, lora.shared_slot)
            ragged = RaggedRows(lengths, contexts, positions[is_real][:, None], token_lora)
        return ForwardBatch(
            input_ids=self._padded(new_ids, width),
            positions=positions,
            write_index=self._slots(tables, positions)[is_real],  # row-major over the real tokens
            real_tokens=None if min(lengths) == width else is_real.flatten().nonzero().squeeze(1),
            read_slots=self._slots(tables, torch.where(key_pos < context[:, None], key_pos, 0)),
            attn_mask=attn_mask[:, None],  # [B, 1, T, L]; padding queries see key 0 only
            last_index=num_new - 1,
            lora=lora,
            prompt_slots=torch.tensor(prompt_slots, dtype=long),
            prompt_lengths=torch.tensor([s.num_virtual for s in seqs], dtype=long),
            # Soft-prompt rows are embedded only while their virtual positions are being prefilled.
            has_soft_prompts=any(s.num_virtual > start for s, start in zip(seqs, starts, strict=True)),
            ragged=ragged,
        )

    def _slots(self, tables: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        blocks = torch.gather(tables, 1, positions // self.block_size)
        return blocks * self.block_size + positions % self.block_size

    def _block_tables(self, seqs: list[Sequence]) -> torch.Tensor:
        width = max(len(s.block_table) for s in seqs)
        return torch.tensor(
            [s.block_table + [0] * (width - len(s.block_table)) for s in seqs], dtype=torch.long
        )

    def _padded(self, rows: list[list[int]], width: int) -> torch.Tensor:
        return torch.tensor([row + [0] * (width - len(row)) for row in rows], dtype=torch.long)

    def _lora_batch(self, seqs: list[Sequence]) -> LoraBatch:
        slots = self._adapter_slots(seqs, lora=True)
        rank = max((s.adapter.rank for s in seqs if s.adapter), default=0)
        shared = slots[0] if len(set(slots)) == 1 and slots[0] >= 0 else None
        return LoraBatch(torch.tensor(slots, dtype=torch.long), rank, shared)

    def _adapter_slots(self, seqs: list[Sequence], lora: bool) -> list[int]:
        return [
            self.adapters.slot_of(s.adapter) if s.adapter and s.adapter.is_lora == lora else -1 for s in seqs
        ]


def _top(scored: list[TokenLogprob], seq: Sequence) -> list[TokenLogprob]:
    """Each score with only as many alternatives as this sequence asked for."""
    k = seq.params.prompt_logprobs or 0
    return [TokenLogprob(t.token_id, t.logprob, t.top[:k]) for t in scored]
