"""Turns scheduled sequences into a `ForwardBatch`, runs the model, and returns next-token logits."""

from __future__ import annotations

import dataclasses

import torch

from adapterd.adapters.kinds import LinearWeights
from adapterd.server.common.protocol import TokenLogprob
from adapterd.server.engine.adapter_slots import AdapterSlots
from adapterd.server.engine.cuda_graphs import DecodeGraphs
from adapterd.server.engine.logprobs import score_hidden
from adapterd.server.engine.sequence import Sequence
from adapterd.server.model.batch import ForwardBatch, LoraBatch, PrefixRows, RaggedRows
from adapterd.server.model.llama import KVCache, LlamaModel


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
        prompt_slots = [self.adapters.slot_of(s.adapter, "input_embeddings") for s in seqs]
        lora = self._lora_batch(seqs)
        ragged = None
        if RaggedRows.worth_it(lengths):
            contexts = [s + n for s, n in zip(starts, lengths, strict=True)]
            ragged = RaggedRows(lengths, contexts, positions[is_real][:, None], lora.per_token(num_new))
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
            has_soft_prompts=any(
                slot >= 0 and s.num_virtual > start
                for slot, s, start in zip(prompt_slots, seqs, starts, strict=True)
            ),
            ragged=ragged,
            prefix=self._prefix_rows(seqs, starts, lengths),
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
        """The "linear" hook point's rows: LoRA slots of the rows with LoRA weights (LoRA, DoRA), and scale
        rows of those with scale vectors (DoRA, IA³) with the linears they scale."""
        linear = [self.adapters.slot_of(s.adapter, "linear") for s in seqs]
        slots = [
            slot if slot >= 0 and s.adapter and s.adapter.rank else -1
            for slot, s in zip(linear, seqs, strict=True)
        ]
        rank = max((s.adapter.rank for s in seqs if s.adapter), default=0)
        shared = slots[0] if len(set(slots)) == 1 and slots[0] >= 0 else None
        batch = LoraBatch(torch.tensor(slots, dtype=torch.long), rank, shared)
        scaling = {s.adapter for s in seqs if s.adapter and s.adapter.has_scales}
        if not scaling:
            return batch
        ones = self.adapters.ones_slot
        rows = [slot if s.adapter in scaling else ones for slot, s in zip(linear, seqs, strict=True)]
        inputs: set[tuple[int, str]] = set()
        outputs: set[tuple[int, str]] = set()
        for adapter in scaling:
            assert isinstance(adapter.weights, LinearWeights)
            inputs.update(adapter.weights.in_scales)
            outputs.update(adapter.weights.out_scales)
            outputs.update(adapter.weights.magnitudes)
        return dataclasses.replace(
            batch,
            scale_slots=torch.tensor(rows, dtype=torch.long),
            scaled_inputs=frozenset(inputs),
            scaled_outputs=frozenset(outputs),
        )

    def _prefix_rows(self, seqs: list[Sequence], starts: list[int], lengths: list[int]) -> PrefixRows | None:
        """The new tokens at virtual positions of prefix-tuning rows, and their rows in the prefix pool."""
        tokens: list[int] = []
        sources: list[int] = []
        first = 0  # index of the row's first new token among the step's real tokens
        for seq, start, length in zip(seqs, starts, lengths, strict=True):
            slot = self.adapters.slot_of(seq.adapter, "kv_prefix")
            if slot >= 0 and start < seq.num_virtual:
                for position in range(start, min(start + length, seq.num_virtual)):
                    tokens.append(first + position - start)
                    sources.append(slot * self.model.prefix_width + position)
            first += length
        if not tokens:
            return None
        return PrefixRows(torch.tensor(tokens, dtype=torch.long), torch.tensor(sources, dtype=torch.long))


def _top(scored: list[TokenLogprob], seq: Sequence) -> list[TokenLogprob]:
    """Each score with only as many alternatives as this sequence asked for."""
    k = seq.params.prompt_logprobs or 0
    return [TokenLogprob(t.token_id, t.logprob, t.top[:k]) for t in scored]
