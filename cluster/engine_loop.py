"""Runs the engine on the rank's torch thread; other threads submit, abort and drain updates.

Only the loop (on the `TorchThread` that also loaded the weights) touches the engine (and so the
collectives). When idle it sends a keepalive so expert ranks blocked on the next step header stay inside
the collective timeout. A failed step (a dead worker, a timed-out collective) ends every in-flight request
with an error update and fails later submissions with WorkerUnavailable: never a hang, never a silent
wrong answer.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from concurrent.futures import Future, wait

from cluster.engine import LLMEngine
from cluster.engine_stats import StatsSnapshot, merge_snapshots
from cluster.errors import Overloaded, WorkerUnavailable
from cluster.requests import GenerationRequest, SequenceUpdate
from cluster.torch_thread import TorchThread

log = logging.getLogger(__name__)


class EngineLoop:
    def __init__(
        self, engine: LLMEngine, *, keepalive: Callable[[], None] | None = None, keepalive_interval_s: float = 2.0
    ) -> None:
        self.engine = engine
        self.max_waiting = engine.scheduler.config.max_waiting
        self._stats: list[StatsSnapshot] = []
        self.keepalive = keepalive
        self.keepalive_interval_s = keepalive_interval_s
        self._cond = threading.Condition()
        self._inbox: list[GenerationRequest] = []
        self._aborts: list[str] = []
        self._outbox: list[SequenceUpdate] = []
        self._stopping = False
        self.failure: str | None = None
        self._future: Future | None = None

    def start(self, torch_thread: TorchThread) -> None:
        """Runs the loop on torch_thread, the thread that loaded the weights (see cluster.torch_thread)."""
        self._future = torch_thread.start(self._run)
        self._future.add_done_callback(_log_crash)

    def submit(self, request: GenerationRequest) -> None:
        if self.failure:
            raise WorkerUnavailable(self.failure)
        self.engine.validate(request)  # config-only checks; raises InvalidRequest naming the field
        with self._cond:
            waiting = len(self._inbox) + len(self.engine.scheduler.waiting)
            if waiting >= self.max_waiting:
                raise Overloaded(f"the waiting queue is full ({waiting} requests); retry later")
            self._inbox.append(request)
            self._cond.notify_all()

    def abort(self, request_id: str) -> None:
        with self._cond:
            self._aborts.append(request_id)
            self._cond.notify_all()

    def drain(self, timeout_s: float) -> tuple[list[SequenceUpdate], StatsSnapshot | None]:
        """All updates since the last drain, and the engine's stats over that time; waits up to timeout_s
        for at least one update."""
        with self._cond:
            self._cond.wait_for(lambda: self._outbox or self._stopping or self.failure, timeout=timeout_s)
            out, self._outbox = self._outbox, []
            stats, self._stats = self._stats, []
            return out, merge_snapshots(stats)

    @property
    def running(self) -> bool:
        return self._future is not None and not self._future.done()

    def stop(self, timeout_s: float = 30.0) -> None:
        with self._cond:
            self._stopping = True
            self._cond.notify_all()
        if self._future is not None:
            wait([self._future], timeout=timeout_s)

    def _run(self) -> None:
        last_collective = time.monotonic()
        while True:
            with self._cond:
                self._cond.wait_for(self._has_input, timeout=self.keepalive_interval_s)
                if self._stopping:
                    return
                inbox, self._inbox = self._inbox, []
                aborts, self._aborts = self._aborts, []
            updates = self._admit(inbox) + [u for rid in aborts if (u := self.engine.abort(rid))]
            try:
                if self.engine.has_work():
                    updates += self.engine.step()
                    last_collective = time.monotonic()
                elif self.keepalive and time.monotonic() - last_collective >= self.keepalive_interval_s:
                    self.keepalive()
                    last_collective = time.monotonic()
            except Exception as exc:  # a worker died or a collective timed out
                self._fail(updates, f"expert-parallel step failed: {exc}")
                return
            self._publish(updates)

    def _has_input(self) -> bool:
        return bool(self._inbox or self._aborts or self._stopping or self.engine.has_work())

    def _admit(self, inbox: list[GenerationRequest]) -> list[SequenceUpdate]:
        rejected = []
        for request in inbox:
            try:
                self.engine.add_request(request)
            except ValueError as exc:  # raced with another request of the same id
                rejected.append(SequenceUpdate(request.request_id, (), (), "error", str(exc)))
        return rejected

    def _publish(self, updates: list[SequenceUpdate]) -> None:
        engine = self.engine
        snapshot = engine.stats.take(
            num_running=len(engine.scheduler.running), num_waiting=len(engine.scheduler.waiting),
            kv_cache_usage=engine.rank.pool.usage,
        )
        with self._cond:
            merged = merge_snapshots([*self._stats, snapshot])
            self._stats = [merged] if merged else []
            if updates:
                self._outbox.extend(updates)
                self._cond.notify_all()

    def _fail(self, updates: list[SequenceUpdate], message: str) -> None:
        log.error("%s; failing %d in-flight requests", message, len(self.engine.sequences))
        lost = [SequenceUpdate(rid, (), (), "error", message) for rid in list(self.engine.sequences)]
        with self._cond:
            self.failure = message
            lost += [SequenceUpdate(r.request_id, (), (), "error", message) for r in self._inbox]
            self._outbox.extend(updates + lost)
            self._inbox.clear()
            self._cond.notify_all()


def _log_crash(future: Future) -> None:
    if not future.cancelled() and future.exception() is not None:
        log.error("the engine loop crashed", exc_info=future.exception())
