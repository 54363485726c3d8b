"""The one thread that touches the model. Everyone else talks to it through its inbox."""

from __future__ import annotations

import logging
import queue
import threading
from collections.abc import Callable
from concurrent.futures import Future
from typing import TypeVar

from adapterd.server.engine.engine import LLMEngine
from adapterd.server.errors import EngineStopped

T = TypeVar("T")
log = logging.getLogger(__name__)
IDLE_WAIT_S = 0.5


class EngineLoop:
    def __init__(self, engine: LLMEngine) -> None:
        self.engine = engine
        self.inbox: queue.SimpleQueue[tuple[Callable[[LLMEngine], object], Future[object]] | None] = (
            queue.SimpleQueue()
        )
        self.is_stopping = False
        self.thread = threading.Thread(target=self._run, name="adapterd-engine", daemon=True)

    def start(self) -> EngineLoop:
        self.thread.start()
        return self

    def stop(self) -> None:
        self.is_stopping = True
        self.inbox.put(None)
        self.thread.join(timeout=30)

    def call(self, fn: Callable[[LLMEngine], T]) -> Future[T]:
        """Run `fn(engine)` on the engine thread between two steps."""
        future: Future[T] = Future()
        if self.is_stopping:
            future.set_exception(EngineStopped("the engine is shutting down"))
            return future
        self.inbox.put((fn, future))  # type: ignore[arg-type]
        return future

    def _run(self) -> None:
        while not self.is_stopping:
            self._drain_inbox(block=not self.engine.has_work)
            if self.engine.has_work and not self.is_stopping:
                self._step()

    def _drain_inbox(self, block: bool) -> None:
        try:
            item = self.inbox.get(timeout=IDLE_WAIT_S) if block else self.inbox.get_nowait()
            while item is not None:
                fn, future = item
                if future.set_running_or_notify_cancel():
                    try:
                        future.set_result(fn(self.engine))
                    except Exception as exc:  # delivered to the caller, not fatal to the loop
                        future.set_exception(exc)
                item = self.inbox.get_nowait()
        except queue.Empty:
            pass

    def _step(self) -> None:
        try:
            self.engine.step()
        except Exception:  # a bug or out-of-memory must fail the batch, not kill the engine
            log.exception("engine step failed; failing the running sequences")
            try:
                self.engine.fail_running("internal error in the engine step")
            except Exception:
                log.exception("failing the running sequences failed too")
