"""The engine's boundary: typed messages in, one batch of outputs per outbox per step out."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

from adapterd.server.common.config import EngineConfig
from adapterd.server.common.errors import InvalidRequest
from adapterd.server.common.protocol import Completion, GenerateRequest, SamplingParams, TokenEvent
from adapterd.server.engine.messages import AddRequest, CancelRequest, RequestOutput
from adapterd.server.llm import LLM

TIMEOUT_S = 30
PROMPTS = [(5, 6, 7), (8, 9, 10, 11), (12, 13), (14, 15, 16, 17, 18), (19, 23), (20, 21, 22)]


class RecordingOutbox:
    """Every `deliver` call the engine made, in order, and a way to wait until N requests ended."""

    def __init__(self) -> None:
        self.deliveries: list[list[RequestOutput]] = []
        self.ended: set[str] = set()
        self.changed = threading.Condition()

    def deliver(self, outputs: list[RequestOutput]) -> None:  # on the engine thread
        with self.changed:
            self.deliveries.append(outputs)
            for output in outputs:
                if output.refused is not None or any(isinstance(e, Completion) for e in output.events):
                    self.ended.add(output.request_id)
            self.changed.notify_all()

    def wait_ended(self, count: int) -> None:
        with self.changed:
            assert self.changed.wait_for(lambda: len(self.ended) >= count, TIMEOUT_S), "requests never ended"

    def events(self, request_id: str) -> list[TokenEvent | Completion]:
        return [e for d in self.deliveries for o in d if o.request_id == request_id for e in o.events]


def add(request_id: str, prompt: tuple[int, ...], outbox: RecordingOutbox, new_tokens: int = 4) -> AddRequest:
    params = SamplingParams(max_new_tokens=new_tokens, ignore_eos=True)
    return AddRequest(request_id, prompt, params, None, outbox)


@pytest.fixture(scope="module")
def llm(tiny_llama: Path) -> Iterator[LLM]:
    with LLM(model=str(tiny_llama), quantize="none", device="cpu", engine=EngineConfig(cpu_threads=1)) as llm:
        yield llm


def test_requests_sent_together_join_one_step_and_come_back_in_one_delivery_per_step(llm: LLM) -> None:
    outbox = RecordingOutbox()
    llm.loop.send(add(str(i), prompt, outbox) for i, prompt in enumerate(PROMPTS))
    outbox.wait_ended(len(PROMPTS))
    # 4 steps (one prefill, three decodes), each one call carrying every request's output of that step
    assert len(outbox.deliveries) == 4
    for delivery in outbox.deliveries:
        assert sorted(o.request_id for o in delivery) == [str(i) for i in range(len(PROMPTS))]
    for i, prompt in enumerate(PROMPTS):
        events = outbox.events(str(i))
        completion = events[-1]
        assert isinstance(completion, Completion) and completion.finish_reason == "length"
        [alone] = llm.generate([GenerateRequest(prompt_ids=prompt, params=SamplingParams(max_new_tokens=4))])
        assert [e.token_id for e in events if isinstance(e, TokenEvent)] == list(alone.token_ids)


def test_a_refused_request_is_answered_in_its_outbox_and_queues_nothing(llm: LLM) -> None:
    outbox = RecordingOutbox()
    too_long = tuple(range(1, 10)) * 1000
    llm.loop.send(
        [add("fits", (5, 6, 7), outbox), add("too-long", too_long, outbox), add("fits", (8,), outbox)]
    )
    outbox.wait_ended(2)
    refusals = {o.request_id: o.refused for d in outbox.deliveries for o in d if o.refused is not None}
    assert set(refusals) == {"too-long", "fits"}  # the second "fits": that id is running already
    assert isinstance(refusals["too-long"], InvalidRequest) and "limit" in str(refusals["too-long"])
    assert isinstance(refusals["fits"], InvalidRequest) and "already running" in str(refusals["fits"])
    outbox.wait_ended(2)
    with outbox.changed:
        outbox.changed.wait_for(
            lambda: isinstance((outbox.events("fits") or [None])[-1], Completion), TIMEOUT_S
        )
    assert [type(e) for e in outbox.events("fits")] == [TokenEvent] * 4 + [Completion]
    assert llm.loop.call(lambda engine: (engine.sequences, engine.has_work)).result() == ({}, False)


def test_cancel_by_id_ends_the_request_and_cancelling_an_ended_one_changes_nothing(llm: LLM) -> None:
    outbox = RecordingOutbox()
    llm.loop.send([add("long", (5, 6, 7), outbox, new_tokens=500), CancelRequest("long")])
    outbox.wait_ended(1)
    completion = outbox.events("long")[-1]
    assert isinstance(completion, Completion) and completion.finish_reason == "cancelled"
    assert len(completion.token_ids) < 500
    llm.loop.send([CancelRequest("long"), CancelRequest("never-sent")])
    assert llm.loop.call(lambda engine: (engine.sequences, engine.blocks.num_free_blocks)).result() == (
        {},
        llm.engine.blocks.num_blocks,
    )


def test_the_engine_thread_runs_with_the_configured_cpu_threads(llm: LLM) -> None:
    assert llm.loop.call(lambda engine: torch.get_num_threads()).result() == 1
