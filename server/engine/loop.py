"""The one thread that touches the model. Everyone else talks to it through its inbox: typed messages
(`messages.AddRequest`, `CancelRequest`) or a function to run between two steps."""

from __future__ import annotations

import logging
import queue
import threading
from collections.abc import Callable, Iterable
from concurrent.futures import Future
from dataclasses import dataclass
from typing import TypeVar

from adapterd.server.common.config import MAX_FAILED_STEPS_IN_A_ROW
from adapterd.server.common.errors import EngineStopped
from adapterd.server.common.protocol import Health
from adapterd.server.engine.engine import LLMEngine
from adapterd.server.engine.messages import AddRequest, CancelRequest, Message, RequestOutput

T = TypeVar("T")
log = logging.getLogger(__name__)
IDLE_WAIT_S = 0.5


@dataclass(frozen=True)
class _Call:
    fn: Callable[[LLMEngine], object]
    future: Future[object]


class EngineLoop:
    def __init__(self, engine: LLMEngine) -> None:
        self.engine = engine
        self.failed_steps_in_a_row = 0
        self.last_failure = ""
        self.inbox: queue.SimpleQueue[tuple[Message, ...] | _Call | None] = queue.SimpleQueue()
        self.is_stopping = False
        self.thread = threading.Thread(target=self._run, name="adapterd-engine", daemon=True)

    def start(self) -> EngineLoop:
        self.thread.start()
        return self

    def stop(self) -> None:
        self.is_stopping = True
        self.inbox.put(None)
        self.thread.join(timeout=30)

    @property
    def health(self) -> Health:
        """Unhealthy once MAX_FAILED_STEPS_IN_A_ROW steps in a row failed or the thread is gone; a step that
        succeeds makes it healthy again."""
        if self.is_stopping:
            return Health(False, "the engine is stopping")
        if not self.thread.is_alive():
            return Health(False, "the engine thread is not running")
        if self.failed_steps_in_a_row >= MAX_FAILED_STEPS_IN_A_ROW:
            return Health(
                False, f"{self.failed_steps_in_a_row} engine steps in a row failed: {self.last_failure}"
            )
        return Health(True)

    def send(self, messages: Iterable[Message]) -> None:
        """Queue messages together: requests sent in one call join the same step. A request the engine
        refuses (or that arrives while it stops) gets a `RequestOutput` with `refused` in its outbox."""
        batch = tuple(messages)
        if self.is_stopping:
            for message in batch:
                if isinstance(message, AddRequest):
                    _refuse(message, EngineStopped("the engine is stopping"))
            return
        self.inbox.put(batch)

    def call(self, fn: Callable[[LLMEngine], T]) -> Future[T]:
        """Run `fn(engine)` on the engine thread between two steps."""
        future: Future[T] = Future()
        if self.is_stopping:
            future.set_exception(EngineStopped("the engine is shutting down"))
            return future
        self.inbox.put(_Call(fn, future))  # type: ignore[arg-type]
        return future

    def _run(self) -> None:
        self.engine.claim_thread()
        while not self.is_stopping:
            self._drain_inbox(block=not self.engine.has_work)
            if self.engine.has_work and not self.is_stopping:
                self._step()

    def _drain_inbox(self, block: bool) -> None:
        """Handle everything that arrived before the next step starts."""
        try:
            item = self.inbox.get(timeout=IDLE_WAIT_S) if block else self.inbox.get_nowait()
            while item is not None:
                if isinstance(item, _Call):
                    self._call(item)
                else:
                    for message in item:
                        self._handle(message)
                item = self.inbox.get_nowait()
        except queue.Empty:
            pass

    def _handle(self, message: Message) -> None:
        if isinstance(message, CancelRequest):
            self.engine.cancel_request(message.request_id)
            return
        try:
            self.engine.admit(message)
        except Exception as exc:  # InvalidRequest, or a bug: the caller hears of it, the loop goes on
            _refuse(message, exc)

    def _call(self, call: _Call) -> None:
        if call.future.set_running_or_notify_cancel():
            try:
                call.future.set_result(call.fn(self.engine))
            except Exception as exc:  # delivered to the caller, not fatal to the loop
                call.future.set_exception(exc)

    def _step(self) -> None:
        try:
            self.engine.step()
            self.failed_steps_in_a_row = 0
        except Exception as exc:  # a bug or out-of-memory must fail the batch, not kill the engine
            self.failed_steps_in_a_row += 1
            self.last_failure = f"{type(exc).__name__}: {exc}"[:500]
            log.exception("engine step failed; failing the running sequences")
            # Once unhealthy, the queued requests fail too: a step that fails before it schedules anyone
            # would otherwise keep them waiting forever.
            try:
                unhealthy = self.failed_steps_in_a_row >= MAX_FAILED_STEPS_IN_A_ROW
                self.engine.fail_running("internal error in the engine step", waiting_too=unhealthy)
            except Exception:
                log.exception("failing the running sequences failed too")


def _refuse(message: AddRequest, reason: Exception) -> None:
    """Answer a request the engine will not run, in its own outbox; nothing was queued."""
    message.outbox.deliver([RequestOutput(message.request_id, refused=reason)])
