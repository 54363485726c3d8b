"""KV blocks, adapter slots and a request's life in the engine: cancel, refuse, wait, preempt, fail, end."""

from __future__ import annotations

import shutil
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from adapterd.adapters.format import AdapterSpec
from adapterd.server.common.config import EngineConfig
from adapterd.server.common.errors import InvalidRequest
from adapterd.server.common.protocol import Completion, GenerateRequest, SamplingParams, TokenEvent
from adapterd.server.engine.adapter_slots import LoadedAdapter, SlotPool
from adapterd.server.engine.detokenizer import Detokenizer
from adapterd.server.engine.engine import LLMEngine
from adapterd.server.engine.kv_cache import BlockAllocator
from adapterd.server.engine.messages import SinkOutbox
from adapterd.server.engine.sequence import Sequence
from adapterd.server.llm import LLM
from adapterd.server.model.resolve import ResolvedModel
from tests.conftest import make_tiny_llama

BLOCK = 16
KV_TOKENS = 128  # 8 blocks
PROMPT = (5, 6, 7, 8, 9, 10, 11, 12, 13, 14)
TIMEOUT_S = 30


def greedy(max_new_tokens: int, **params: Any) -> SamplingParams:
    return SamplingParams(max_new_tokens=max_new_tokens, ignore_eos=True, **params)


def make_seq(prompt_len: int = 4) -> Sequence:
    outbox = SinkOutbox(lambda e: None)
    return Sequence("r", list(range(prompt_len)), SamplingParams(), outbox, Detokenizer(None, [], ()))


class Collector:
    """A request's event sink: every event it received, and a way to wait for the Completion."""

    def __init__(self) -> None:
        self.events: list[TokenEvent | Completion] = []
        self.finished = threading.Event()

    def __call__(self, event: TokenEvent | Completion) -> None:  # on the engine thread: must not raise
        self.events.append(event)
        if isinstance(event, Completion):
            self.finished.set()

    @property
    def token_ids(self) -> list[int]:
        return [e.token_id for e in self.events if isinstance(e, TokenEvent)]

    @property
    def text(self) -> str:
        return "".join(e.text for e in self.events if isinstance(e, TokenEvent))

    def wait(self) -> Completion:
        assert self.finished.wait(TIMEOUT_S), "the request never finished"
        completion = self.events[-1]
        assert isinstance(completion, Completion), "events after the Completion"
        assert sum(isinstance(e, Completion) for e in self.events) == 1
        return completion


def make_llm(model: Path, **config: Any) -> LLM:
    return LLM(model=str(model), quantize="none", device="cpu", engine=EngineConfig(**config))


def closed_engine(model: Path, **config: Any) -> LLMEngine:
    """An engine without its thread: the test is its only caller and steps it by hand."""
    llm = make_llm(model, **config)
    llm.close()
    return llm.engine


def run_until_idle(engine: LLMEngine, max_steps: int = 2000) -> None:
    for _ in range(max_steps):
        if not engine.has_work:
            return
        engine.step()
    pytest.fail(f"the engine still has work after {max_steps} steps")


def run_alone(engine: LLMEngine, prompt: tuple[int, ...], params: SamplingParams) -> list[int]:
    collector = Collector()
    engine.add_request("alone", list(prompt), params, None, collector)
    run_until_idle(engine)
    return list(collector.wait().token_ids)


def generate(llm: LLM, prompt: tuple[int, ...], params: SamplingParams) -> Completion:
    """`LLM.generate` for one request, with a timeout instead of a hang if the engine breaks."""
    collector = Collector()
    llm.submit(GenerateRequest(prompt_ids=prompt, params=params), collector)
    return collector.wait()


def engine_state(llm: LLM) -> tuple[bool, int, int]:
    """(has work, free KV blocks, all KV blocks), read on the engine thread between two steps."""
    state = llm.loop.call(lambda e: (e.has_work, e.blocks.num_free_blocks, e.blocks.num_blocks))
    return state.result(timeout=TIMEOUT_S)


# --- BlockAllocator -------------------------------------------------------------------------------------


@pytest.mark.parametrize(("num_tokens", "num_blocks"), [(1, 1), (16, 1), (17, 2), (32, 2), (33, 3), (128, 8)])
def test_allocation_takes_whole_blocks(num_tokens: int, num_blocks: int) -> None:
    blocks, seq = BlockAllocator(8, BLOCK), make_seq()
    blocks.allocate(seq, num_tokens)
    assert len(seq.block_table) == num_blocks
    assert blocks.num_free_blocks == 8 - num_blocks


def test_allocation_grows_one_block_at_a_block_boundary_and_never_shrinks() -> None:
    blocks, seq = BlockAllocator(8, BLOCK), make_seq()
    sizes = []
    for num_tokens in (10, 16, 17, 20, 32, 33, 5):
        blocks.allocate(seq, num_tokens)
        sizes.append(len(seq.block_table))
    assert sizes == [1, 1, 2, 2, 2, 3, 3]
    assert len(set(seq.block_table)) == 3


def test_sequences_own_disjoint_blocks_and_free_returns_them() -> None:
    blocks, first, second = BlockAllocator(8, BLOCK), make_seq(), make_seq()
    blocks.allocate(first, 40)
    blocks.allocate(second, 50)
    assert not set(first.block_table) & set(second.block_table)
    assert blocks.num_free_blocks == 8 - 3 - 4
    second.num_cached = 50
    blocks.free(second)
    assert (second.block_table, second.num_cached, blocks.num_free_blocks) == ([], 0, 5)
    blocks.free(first)
    assert blocks.num_free_blocks == 8
    assert sorted(blocks.free_blocks) == list(range(8))


def test_can_allocate_only_what_is_free() -> None:
    blocks, first, second = BlockAllocator(8, BLOCK), make_seq(), make_seq()
    blocks.allocate(first, 5 * BLOCK)
    assert blocks.can_allocate(second, 3 * BLOCK)
    assert not blocks.can_allocate(second, 3 * BLOCK + 1)
    assert blocks.can_allocate(first, 8 * BLOCK)  # counts only the blocks `first` does not have yet
    assert not blocks.can_allocate(first, 8 * BLOCK + 1)


# --- SlotPool ---------------------------------------------------------------------------------------------


def make_adapter(name: str) -> LoadedAdapter:
    spec = AdapterSpec(
        kind="lora",
        path=Path(name),
        rank=4,
        alpha=8,
        use_rslora=False,
        target_modules=("q_proj",),
        num_virtual_tokens=0,
        base_model_name_or_path=None,
        config={},
    )
    return LoadedAdapter(name, spec)


def test_slots_are_loaded_once_and_reused_while_resident() -> None:
    pool, a, b = SlotPool(2), make_adapter("a"), make_adapter("b")
    slot_a, fill_a = pool.acquire(a)
    slot_b, fill_b = pool.acquire(b)
    assert fill_a and fill_b and slot_a != slot_b
    pool.release(a)
    assert pool.acquire(a) == (slot_a, False)  # still resident: no copy
    assert (pool.num_loads, pool.num_evictions) == (2, 0)


def test_the_least_recently_used_unpinned_adapter_is_evicted() -> None:
    pool = SlotPool(2)
    a, b, c, d = (make_adapter(n) for n in "abcd")
    slots = {x: pool.acquire(x)[0] for x in (a, b)}
    pool.release(a)
    pool.release(b)
    pool.acquire(a)  # a is now more recent than b
    pool.release(a)
    slot_c, fill_c = pool.acquire(c)
    assert (slot_c, fill_c) == (slots[b], True)
    assert b not in pool.resident and a in pool.resident
    pool.release(c)
    assert pool.acquire(d)[0] == slots[a]  # then a, older than c
    assert (pool.num_loads, pool.num_evictions) == (4, 2)


def test_pinned_adapters_are_never_evicted() -> None:
    pool = SlotPool(2)
    a, b, c = (make_adapter(n) for n in "abc")
    slot_a, _ = pool.acquire(a)  # pinned: a sequence uses it
    slot_b, _ = pool.acquire(b)
    pool.release(b)
    assert pool.acquire(c) == (slot_b, True)
    assert pool.slot_of(a) == slot_a


def test_cannot_acquire_when_every_slot_is_pinned() -> None:
    pool = SlotPool(2)
    a, b, c = (make_adapter(n) for n in "abc")
    pool.acquire(a)
    pool.acquire(b)
    pool.acquire(b)  # two sequences use b
    assert not pool.can_acquire(c)
    assert pool.can_acquire(a)  # already resident: no slot needed
    pool.release(b)
    assert not pool.can_acquire(c)  # b is still pinned by its second user
    pool.release(b)
    assert pool.can_acquire(c)
    assert pool.acquire(c)[1]
    assert pool.num_evictions == 1


# --- the engine -------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def llm(tiny_llama: Path) -> Iterator[LLM]:
    engine = make_llm(tiny_llama, kv_block_size=BLOCK, kv_cache_tokens=KV_TOKENS)
    yield engine
    engine.close()


@pytest.fixture(scope="module")
def baseline(llm: LLM) -> list[int]:
    """The greedy tokens of PROMPT, alone in the engine."""
    out = generate(llm, PROMPT, greedy(KV_TOKENS - len(PROMPT)))
    assert len(set(out.token_ids)) > 10, "the tiny model should not repeat one token"
    return list(out.token_ids)


def test_cancelled_request_stops_at_once_and_frees_its_cache(llm: LLM, baseline: list[int]) -> None:
    collector, third_token, cancel_sent = Collector(), threading.Event(), threading.Event()

    def sink(event: TokenEvent | Completion) -> None:
        collector(event)
        if isinstance(event, TokenEvent) and len(collector.token_ids) == 3:
            third_token.set()
            cancel_sent.wait(TIMEOUT_S)  # hold the engine thread until the cancel is queued

    handle = llm.submit(GenerateRequest(prompt_ids=PROMPT, params=greedy(100)), sink)
    assert third_token.wait(TIMEOUT_S)
    handle.cancel()
    cancel_sent.set()
    completion = collector.wait()
    assert completion.finish_reason == "cancelled"
    assert list(completion.token_ids) == collector.token_ids == baseline[:3]  # nothing after the cancel
    has_work, free, total = engine_state(llm)
    assert not has_work and free == total


def test_leaving_a_stream_early_cancels_the_request(llm: LLM, baseline: list[int]) -> None:
    events = llm.stream(GenerateRequest(prompt_ids=PROMPT, params=greedy(100)))
    first = [next(events) for _ in range(3)]
    events.close()
    assert [e.token_id for e in first if isinstance(e, TokenEvent)] == baseline[:3]
    has_work, free, total = engine_state(llm)
    assert not has_work and free == total
    assert list(generate(llm, PROMPT, greedy(20)).token_ids) == baseline[:20]


def test_cancelling_a_waiting_request_leaves_the_running_one(tiny_llama: Path) -> None:
    engine = closed_engine(tiny_llama, max_batch=1, kv_cache_tokens=KV_TOKENS)
    expected = run_alone(engine, PROMPT, greedy(30))
    running, waiting = Collector(), Collector()
    engine.add_request("running", list(PROMPT), greedy(30), None, running)
    queued = engine.add_request("waiting", [20, 21, 22], greedy(30), None, waiting)
    for _ in range(3):
        engine.step()
    engine.cancel(queued)
    cancelled = waiting.wait()
    assert (cancelled.finish_reason, cancelled.token_ids) == ("cancelled", ())
    run_until_idle(engine)
    assert waiting.events == [cancelled]  # it never ran
    assert list(running.wait().token_ids) == expected
    assert engine.blocks.num_free_blocks == engine.blocks.num_blocks


@pytest.mark.parametrize("prompt", [PROMPT, (7,)])
def test_request_over_the_kv_budget_is_refused_and_the_engine_keeps_serving(
    llm: LLM, baseline: list[int], prompt: tuple[int, ...]
) -> None:
    with pytest.raises(InvalidRequest, match="limit is 128"):
        generate(llm, prompt, greedy(KV_TOKENS - len(prompt) + 1))
    at_the_limit = generate(llm, prompt, greedy(KV_TOKENS - len(prompt)))
    assert (len(at_the_limit.token_ids), at_the_limit.finish_reason) == (KV_TOKENS - len(prompt), "length")
    assert list(generate(llm, PROMPT, greedy(10)).token_ids) == baseline[:10]


def test_empty_prompt_is_refused(llm: LLM) -> None:
    with pytest.raises(InvalidRequest, match="empty"):
        generate(llm, (), greedy(4))


@pytest.mark.parametrize("bad_id", [256, -1])
def test_prompt_id_outside_the_vocabulary_is_refused(llm: LLM, baseline: list[int], bad_id: int) -> None:
    other = Collector()
    llm.submit(GenerateRequest(prompt_ids=PROMPT, params=greedy(60)), other)
    try:
        with pytest.raises(InvalidRequest):
            generate(llm, (5, bad_id, 6), greedy(4))
    finally:
        completion = other.wait()  # not failed by the other request's bad id
    assert (completion.finish_reason, list(completion.token_ids)) == ("length", baseline[:60])


@pytest.mark.parametrize(
    "params", [greedy(50), greedy(50, temperature=1.0, seed=7)], ids=["greedy", "seeded"]
)
def test_requests_that_do_not_fit_at_once_wait_or_are_preempted_and_finish_the_same(
    tiny_llama: Path, params: SamplingParams
) -> None:
    """8 blocks of 16 tokens; each request needs up to 4 of them: 4 requests cannot all run at once."""
    engine = closed_engine(tiny_llama, kv_block_size=BLOCK, kv_cache_tokens=KV_TOKENS)
    prompts = [tuple(range(20 + 9 * i, 30 + 9 * i)) for i in range(4)]
    alone = [run_alone(engine, prompt, params) for prompt in prompts]
    assert engine.scheduler.num_preemptions == 0
    collectors = [Collector() for _ in prompts]
    for i, (prompt, collector) in enumerate(zip(prompts, collectors, strict=True)):
        engine.add_request(str(i), list(prompt), params, None, collector)
    run_until_idle(engine)
    assert engine.scheduler.num_preemptions > 0
    for collector, expected in zip(collectors, alone, strict=True):
        completion = collector.wait()
        assert completion.finish_reason == "length"
        assert list(completion.token_ids) == collector.token_ids == expected  # no token lost or repeated
    assert engine.blocks.num_free_blocks == engine.blocks.num_blocks


def test_a_request_too_big_to_join_waits_for_room(tiny_llama: Path) -> None:
    engine = closed_engine(tiny_llama, kv_block_size=BLOCK, kv_cache_tokens=KV_TOKENS)
    long_prompt = tuple(range(30, 30 + 5 * BLOCK))  # 5 blocks
    expected = run_alone(engine, long_prompt, greedy(8))
    first, second = Collector(), Collector()
    engine.add_request("first", list(range(100, 100 + 4 * BLOCK)), greedy(40), None, first)  # 4 to 7 blocks
    engine.step()
    engine.add_request("second", list(long_prompt), greedy(8), None, second)
    engine.step()
    assert len(engine.scheduler.waiting) == 1 and second.token_ids == []
    run_until_idle(engine)
    assert list(second.wait().token_ids) == expected
    assert first.wait().finish_reason == "length"
    assert engine.scheduler.num_preemptions == 0


def test_a_request_the_engine_accepts_always_finishes(tiny_llama: Path) -> None:
    engine = closed_engine(tiny_llama, kv_block_size=BLOCK, kv_cache_tokens=KV_TOKENS + 2)
    collector = Collector()
    try:
        engine.add_request("r", list(PROMPT), greedy(KV_TOKENS + 2 - len(PROMPT)), None, collector)
    except InvalidRequest:
        return  # refusing it is a correct answer too
    for _ in range(4 * KV_TOKENS):
        if not engine.has_work:
            break
        engine.step()
    assert collector.finished.is_set(), f"stuck after {len(collector.token_ids)} tokens"


def test_an_error_in_a_model_step_fails_the_running_requests_and_the_next_one_works(
    llm: LLM, baseline: list[int], monkeypatch: pytest.MonkeyPatch
) -> None:
    run, num_calls = llm.engine.runner.run, [0]

    def run_failing_on_third_call(*args: Any) -> Any:
        num_calls[0] += 1
        if num_calls[0] == 3:
            raise RuntimeError("simulated CUDA out of memory")
        return run(*args)

    monkeypatch.setattr(llm.engine.runner, "run", run_failing_on_third_call)
    first, second = Collector(), Collector()

    def add_both(engine: LLMEngine) -> None:  # in one call, so that both are in the failing batch
        engine.add_request("first", list(PROMPT), greedy(50), None, first)
        engine.add_request("second", [9, 8, 7], greedy(50), None, second)

    llm.loop.call(add_both).result(timeout=TIMEOUT_S)
    for collector in (first, second):
        completion = collector.wait()
        assert completion.finish_reason == "error"
        assert completion.error
        assert list(completion.token_ids) == collector.token_ids and len(completion.token_ids) == 2
    assert first.token_ids == baseline[:2]
    has_work, free, total = engine_state(llm)
    assert not has_work and free == total
    assert list(generate(llm, PROMPT, greedy(20)).token_ids) == baseline[:20]


def test_max_new_tokens_ends_with_length(llm: LLM, baseline: list[int]) -> None:
    out = generate(llm, PROMPT, greedy(7))
    assert (list(out.token_ids), out.finish_reason, out.prompt_tokens) == (
        baseline[:7],
        "length",
        len(PROMPT),
    )


def test_eos_ends_the_request_unless_ignored(tmp_path: Path, baseline: list[int]) -> None:
    index = next(i for i in range(3, 40) if baseline[i] not in baseline[:i])
    eos = baseline[index]  # the same weights, with a token it will generate as its eos
    model = make_tiny_llama(tmp_path, eos_token_id=eos)
    with make_llm(model, kv_cache_tokens=KV_TOKENS) as eos_llm:
        stopped = generate(eos_llm, PROMPT, SamplingParams(max_new_tokens=60))
        ignored = generate(eos_llm, PROMPT, greedy(60))
    assert (list(stopped.token_ids), stopped.finish_reason) == (baseline[: index + 1], "eos")
    assert (list(ignored.token_ids), ignored.finish_reason) == (baseline[:60], "length")


@pytest.fixture(scope="module")
def text_llm(tmp_path_factory: pytest.TempPathFactory, default_model: ResolvedModel) -> Iterator[LLM]:
    """A tiny random Llama with the default model's tokenizer (and vocabulary): its output has text."""
    path = make_tiny_llama(tmp_path_factory.mktemp("tiny-llama-text"), vocab_size=49152)
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(default_model.path / name, path / name)
    with make_llm(path, kv_cache_tokens=512) as engine:
        yield engine


def test_stream_yields_token_events_then_one_matching_completion(text_llm: LLM) -> None:
    events = list(text_llm.stream(GenerateRequest(prompt="Once upon a time", params=greedy(20))))
    *tokens, completion = events
    assert all(isinstance(e, TokenEvent) for e in tokens) and isinstance(completion, Completion)
    assert list(completion.token_ids) == [e.token_id for e in tokens if isinstance(e, TokenEvent)]
    assert (len(tokens), completion.finish_reason) == (20, "length")
    assert completion.text == "".join(e.text for e in tokens if isinstance(e, TokenEvent))
    assert completion.text == text_llm.tokenizer.decode(completion.token_ids, skip_special_tokens=True)


def test_stop_sequence_ends_the_text_right_before_it(text_llm: LLM) -> None:
    request = GenerateRequest(prompt="Once upon a time", params=greedy(30))
    full = text_llm.generate([request])[0]
    decode = text_llm.tokenizer.decode
    words = full.text.split(" ")
    stop = f"{words[3][-2:]} {words[4][:2]}"  # spans two tokens, well inside the text
    assert not any(stop in decode([token_id]) for token_id in full.token_ids), "the stop must span tokens"
    collector = Collector()
    stopped_request = GenerateRequest(prompt="Once upon a time", params=greedy(30, stop=(stop, "never seen")))
    text_llm.submit(stopped_request, collector)
    completion = collector.wait()
    assert completion.finish_reason == "stop"
    assert completion.text == full.text[: full.text.index(stop)]
    assert collector.text == completion.text  # no part of the stop sequence was streamed
    ids = list(completion.token_ids)
    assert ids == list(full.token_ids[: len(ids)])
    assert stop in decode(ids) and stop not in decode(ids[:-1])  # ended on the token that completed it
