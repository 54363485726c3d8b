"""The engine's boundary: typed messages in, one batch of outputs per step out.

Front ends send `AddRequest` and `CancelRequest` through the loop's inbox. After each step (and after each
inbox drain that produced events, such as a cancel's Completion) the engine hands every outbox the outputs
of its requests in one `deliver` call, so a front end serving many streams crosses threads once per step,
not once per token per request. Nothing here holds the model: the engine could move to its own process
behind the same messages.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Protocol

from adapterd.server.common.protocol import Completion, SamplingParams, TokenEvent

if TYPE_CHECKING:
    from adapterd.server.engine.adapter_slots import LoadedAdapter
    from adapterd.server.engine.grammar import GrammarMatcher

Event = TokenEvent | Completion
EventSink = Callable[[Event], None]


@dataclass(frozen=True)
class RequestOutput:
    """What one request produced in one step: its new token events, and its Completion when it ended.
    `refused` is set instead when the engine would not take the request (nothing was queued)."""

    request_id: str
    events: tuple[Event, ...] = ()
    refused: Exception | None = None


class Outbox(Protocol):
    def deliver(self, outputs: list[RequestOutput]) -> None:
        """Called on the engine thread, at most once per step, with this outbox's requests' outputs."""


@dataclass(frozen=True)
class AddRequest:
    """A prepared request: tokenized, its adapter version resolved, its constraint (if any) compiled into a
    fresh matcher. `request_id` is unique in the engine."""

    request_id: str
    prompt_ids: tuple[int, ...]
    params: SamplingParams
    adapter: LoadedAdapter | None
    outbox: Outbox
    grammar: GrammarMatcher | None = None


@dataclass(frozen=True)
class CancelRequest:
    """Stop a request between steps (a no-op once it finished); its Completion says `cancelled`."""

    request_id: str


Message = AddRequest | CancelRequest


class SinkOutbox:
    """One request's outputs passed to a callback, event by event (on the engine thread)."""

    def __init__(self, sink: EventSink) -> None:
        self.sink = sink

    def deliver(self, outputs: list[RequestOutput]) -> None:
        for output in outputs:
            if output.refused is not None:
                self.sink(_refusal(output))
            for event in output.events:
                self.sink(event)


def _refusal(output: RequestOutput) -> Completion:
    return Completion(output.request_id, "", (), "error", 0, error=str(output.refused))
