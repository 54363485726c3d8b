"""The engine: one loop that owns the model. step() = schedule -> run -> sample -> postprocess."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import torch

from adapterd.server.common.config import EngineConfig
from adapterd.server.common.errors import InvalidRequest
from adapterd.server.common.protocol import FinishReason, SamplingParams, TokenEvent, TokenLogprob
from adapterd.server.engine.adapter_slots import AdapterSlots, LoadedAdapter
from adapterd.server.engine.cuda_graphs import DecodeGraphs
from adapterd.server.engine.detokenizer import Detokenizer
from adapterd.server.engine.kv_cache import BlockAllocator
from adapterd.server.engine.logprobs import token_logprobs
from adapterd.server.engine.messages import AddRequest, Event, EventSink, Outbox, RequestOutput, SinkOutbox
from adapterd.server.engine.model_runner import ModelRunner
from adapterd.server.engine.sampler import sample
from adapterd.server.engine.scheduler import Scheduler
from adapterd.server.engine.sequence import Sequence
from adapterd.server.model.llama import KVCache, LlamaModel


class LLMEngine:
    """Synchronous and single-threaded: the `EngineLoop` thread is its only caller."""

    def __init__(
        self, model: LlamaModel, tokenizer: Any | None, eos_ids: set[int], config: EngineConfig
    ) -> None:
        device, dtype = model.embed_tokens.weight.device, model.embed_tokens.weight.dtype
        config = config.for_device(device.type)
        self.config = config
        self.tokenizer = tokenizer
        self.eos_ids = eos_ids
        self.max_positions = getattr(model.config, "max_position_embeddings", config.max_seq_len)
        self.vocab_size = model.config.vocab_size
        self.adapters = AdapterSlots(model, config, dtype, device)
        self.blocks = BlockAllocator(config.num_kv_blocks, config.kv_block_size, config.prefix_caching)
        # One block past the allocator's: the spare slot that padding rows of a CUDA-graph step write to.
        self.pad_slot = config.num_kv_blocks * config.kv_block_size
        kv = KVCache(model.config, self.pad_slot + config.kv_block_size, dtype, device)
        self.scheduler = Scheduler(config, self.blocks, self.adapters)
        self.runner = ModelRunner(model, kv, self.adapters, config.kv_block_size)
        if config.cuda_graphs and device.type == "cuda":
            self.use_decode_graphs(capture=True)
        self.num_generated_tokens = 0
        self.sequences: dict[str, Sequence] = {}  # by request id, until finished
        self._outputs: dict[Sequence, list[Event]] = {}  # this step's events, delivered at its end

    def use_decode_graphs(self, capture: bool) -> None:
        """Run decode steps through padded static buffers, replayed from CUDA graphs when `capture`."""
        self.runner.graphs = DecodeGraphs(
            self.runner.forward,
            self.runner.device,
            self.config.max_batch,
            self.config.max_rank,
            self.pad_slot,
            capture=capture,
            ones_slot=self.adapters.ones_slot,
        )

    def claim_thread(self) -> None:
        """Called first on the thread that will run every step: set its torch threads (on a CPU)."""
        if self.config.cpu_threads and self.runner.device.type == "cpu":
            torch.set_num_threads(self.config.cpu_threads)

    @property
    def context_limit(self) -> int:
        """Most tokens one sequence may hold: soft-prompt rows, prompt and output together."""
        cache_tokens = self.blocks.num_blocks * self.blocks.block_size  # whole blocks, not the raw budget
        return min(cache_tokens, self.config.max_seq_len, self.max_positions)

    @property
    def has_work(self) -> bool:
        return self.scheduler.has_work

    def check_prompt(self, prompt_ids: list[int]) -> None:
        """Token ids must exist in the vocabulary: a bad id would fail the whole batch's step."""
        self._check_in_vocabulary(prompt_ids, "prompt token ids")

    def check_params(self, params: SamplingParams) -> None:
        """Token ids the parameters name (logit_bias, stop_token_ids) must exist in the vocabulary."""
        self._check_in_vocabulary([i for i, _ in params.logit_bias], "logit_bias: token ids", "logit_bias")
        self._check_in_vocabulary(params.stop_token_ids, "stop_token_ids: token ids", "stop_token_ids")
        if params.constraint is not None and self.tokenizer is None:
            raise InvalidRequest(
                "structured output needs a model with a tokenizer", param=params.constraint.field
            )

    def _check_in_vocabulary(self, token_ids: Iterable[int], what: str, param: str | None = None) -> None:
        bad = [i for i in token_ids if not 0 <= i < self.vocab_size]
        if bad:
            raise InvalidRequest(
                f"{what} {bad[:5]} are outside the vocabulary (0..{self.vocab_size - 1})", param=param
            )

    def check_fits(
        self, num_prompt_tokens: int, params: SamplingParams, adapter: LoadedAdapter | None
    ) -> None:
        """Refuse a request that could never fit the KV cache, the positions or the adapter limits."""
        virtual = adapter.num_virtual_tokens if adapter else 0
        needed = virtual + num_prompt_tokens + params.max_new_tokens
        limit = self.context_limit
        if num_prompt_tokens == 0:
            raise InvalidRequest("the prompt is empty")
        if needed > limit:
            raise InvalidRequest(
                f"prompt ({num_prompt_tokens} tokens{f' + {virtual} virtual' if virtual else ''}) plus "
                f"max_new_tokens ({params.max_new_tokens}) is {needed} tokens; the limit is {limit}"
            )
        if adapter and adapter.num_virtual_tokens > self.config.max_virtual_tokens:
            raise InvalidRequest(
                f"adapter has more than {self.config.max_virtual_tokens} virtual tokens (max_virtual_tokens)"
            )

    def add_request(
        self,
        request_id: str,
        prompt_ids: list[int],
        params: SamplingParams,
        adapter: LoadedAdapter | None,
        sink: EventSink,
    ) -> Sequence:
        """`admit` for a caller on the engine thread that wants each event passed to `sink`."""
        return self.admit(AddRequest(request_id, tuple(prompt_ids), params, adapter, SinkOutbox(sink)))

    def admit(self, message: AddRequest) -> Sequence:
        """Queue a request for the next step; raises InvalidRequest (and queues nothing) if it cannot run."""
        if message.request_id in self.sequences:
            raise InvalidRequest(f"request id {message.request_id!r} is already running")
        prompt_ids = list(message.prompt_ids)
        self.check_prompt(prompt_ids)
        self.check_params(message.params)
        self.check_fits(len(prompt_ids), message.params, message.adapter)
        if message.params.constraint is not None and message.grammar is None:
            raise InvalidRequest("a constrained request must come with its grammar matcher (LLM.prepare)")
        generator, seed = self._generator(message.params)
        seq = Sequence(
            request_id=message.request_id,
            prompt_ids=prompt_ids,
            params=message.params,
            outbox=message.outbox,
            detokenizer=Detokenizer(self.tokenizer, prompt_ids, message.params.stop),
            adapter=message.adapter,
            grammar=message.grammar,
            generator=generator,
            seed=seed,
        )
        self.scheduler.add(seq)
        self.sequences[seq.request_id] = seq
        return seq

    def cancel(self, seq: Sequence) -> None:
        """Stop a sequence between steps and free its cache and adapter slot."""
        if seq.status.name != "FINISHED":
            self._finish(seq, "cancelled")
        self.deliver_outputs()

    def cancel_request(self, request_id: str) -> None:
        """`cancel` by request id; a request that already finished is left alone."""
        seq = self.sequences.get(request_id)
        if seq is not None:
            self.cancel(seq)

    def step(self) -> None:
        seqs, is_prefill = self.scheduler.schedule()
        if not seqs:
            return
        logits = self.runner.run(seqs, is_prefill)
        for seq in seqs:
            self.blocks.commit(seq)
        ready = [row for row, seq in enumerate(seqs) if not seq.is_prefilling]  # whole prompt in: sample
        ready = self._fail_non_finite(logits, seqs, ready)
        if len(ready) < len(seqs):
            logits, seqs = logits[ready], [seqs[row] for row in ready]
        if seqs:
            self.postprocess(seqs, self.choose(logits, seqs))
        self.deliver_outputs()

    def _fail_non_finite(self, logits: torch.Tensor, seqs: list[Sequence], rows: list[int]) -> list[int]:
        """The rows of `rows` whose logits are all finite; each other one (its adapter overflowed the
        model's dtype, say) finishes with an error of its own, and its neighbours in the batch go on."""
        if not rows:
            return rows
        finite = torch.isfinite(logits[rows]).all(dim=-1).tolist()
        if all(finite):
            return rows
        for row, ok in zip(rows, finite, strict=True):
            if not ok:
                seq = seqs[row]
                adapter = f" with adapter {seq.adapter.adapter_id!r}" if seq.adapter else ""
                self._finish(seq, "error", f"the model's output{adapter} is not finite (NaN or Inf logits)")
        return [row for row, ok in zip(rows, finite, strict=True) if ok]

    def deliver_outputs(self) -> None:
        """Hand each outbox, in one call, the events its requests produced since the last delivery."""
        by_outbox: dict[Outbox, list[RequestOutput]] = {}
        for seq, events in self._outputs.items():
            by_outbox.setdefault(seq.outbox, []).append(RequestOutput(seq.request_id, tuple(events)))
        self._outputs = {}
        for outbox, outputs in by_outbox.items():
            outbox.deliver(outputs)

    def _emit(self, seq: Sequence, event: Event) -> None:
        self._outputs.setdefault(seq, []).append(event)

    def _finish(self, seq: Sequence, reason: FinishReason, error: str | None = None) -> None:
        self.scheduler.finish(seq)
        self.sequences.pop(seq.request_id, None)
        self._emit(seq, seq.finish(reason, error))

    def choose(self, logits: torch.Tensor, seqs: list[Sequence]) -> list[TokenLogprob]:
        """Sample each row's next token and score it, with the alternatives the rows asked for."""
        token_ids = sample(logits, seqs, self.eos_ids)
        k = max(seq.params.top_logprobs for seq in seqs)
        return token_logprobs(logits, torch.tensor(token_ids, device=logits.device), k)

    def postprocess(self, seqs: list[Sequence], scores: list[TokenLogprob]) -> None:
        """Append each row's new token (with its log-probability) and stream it; finish rows that are done."""
        for seq, score in zip(seqs, scores, strict=True):
            if seq.params.max_new_tokens == 0:  # scoring the prompt only: the sampled token is dropped
                self._finish(seq, "length")
                continue
            token_id, top = score.token_id, score.top[: seq.params.top_logprobs]
            assert score.logprob is not None
            seq.output_ids.append(token_id)
            seq.logprobs.append(TokenLogprob(token_id, score.logprob, top))
            self.num_generated_tokens += 1
            if seq.grammar is not None:
                seq.grammar.accept(token_id)
            text = seq.detokenizer.add(token_id)
            reason = self._finish_reason(seq, token_id)
            if reason:
                text += seq.detokenizer.flush()
            self._emit(seq, TokenEvent(token_id, text, reason is not None, score.logprob, top))
            if reason:
                self._finish(seq, reason)

    def _finish_reason(self, seq: Sequence, token_id: int) -> FinishReason | None:
        params = seq.params
        if seq.detokenizer.stopped_at is not None or token_id in params.stop_token_ids:
            return "stop"
        if token_id in self.eos_ids and not params.ignore_eos:
            return "stop" if seq.grammar is not None else "eos"
        if seq.grammar is not None and seq.grammar.is_finished:
            return "stop"
        if len(seq.output_ids) >= seq.params.max_new_tokens:
            return "length"
        return None

    def _generator(self, params: SamplingParams) -> tuple[torch.Generator | None, int | None]:
        """A sampling request's generator and its seed (drawn when the request gave none)."""
        if params.is_greedy:
            return None, None
        generator = torch.Generator(device=self.runner.device)
        if params.seed is None:
            return generator, generator.seed()
        generator.manual_seed(params.seed)
        return generator, params.seed

    def fail_running(self, message: str, waiting_too: bool = False) -> None:
        """Finish the running sequences (and with `waiting_too` the queued ones) with an error."""
        queued = list(self.scheduler.waiting) if waiting_too else []
        for seq in [*self.scheduler.running, *queued]:
            self._finish(seq, "error", message)
        self.deliver_outputs()
