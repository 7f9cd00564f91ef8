"""Runs the engine on the rank's torch thread; other threads submit, abort and subscribe to updates.

Only the loop (on the `TorchThread` that also loaded the weights) touches the engine (and so the
collectives). After every step the loop itself sends the step's updates to the subscriber over its
update channel (cluster.update_channel); updates made while no one subscribes wait for the next
subscriber. A lost subscriber aborts every request in flight: no one is left to read them.

When idle the loop sends a keepalive so expert ranks blocked on the next step header stay inside the
collective timeout. With several coordinators every coordinator must join every header exchange, and an
idle one does not poll for its peers' work: a loop that enters an exchange from idle (its own work, or the
keepalive interval) first wakes its peers (`wake_peers`, with the exchange's number), a woken loop joins
that exchange (`join_exchange`), and after an exchange that ran a step every loop exchanges again at once
(its own step, or a keepalive joining a peer's). Exchanges are counted alike on every coordinator, since all
join each one, so a wake for an exchange already joined is recognised and dropped (docs/SCALING.md, "Several
coordinators"). A failed step (a dead worker, a timed-out collective) ends every in-flight request with an
error update and fails later submissions with WorkerUnavailable: never a hang, never a silent wrong
answer.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from concurrent.futures import Future, wait
from typing import Protocol

from cluster.engine import LLMEngine
from cluster.engine_stats import StatsSnapshot, merge_snapshots
from cluster.errors import Overloaded, WorkerUnavailable
from cluster.requests import GenerationRequest, SequenceUpdate
from cluster.torch_thread import TorchThread
from cluster.update_channel import ChannelAddress, ChannelClosed, UpdateBatch, UpdatePublisher

log = logging.getLogger(__name__)


class StepHeaders(Protocol):
    """The coordinator's side of the step-header exchange (workers.runtime.distributed_experts)."""

    exchanges: int  # header exchanges joined so far

    def keepalive(self) -> bool:
        """One exchange with nothing to step; runs any peer's step with nothing to send and says whether."""
        ...


class EngineLoop:
    def __init__(
        self, engine: LLMEngine, *, headers: StepHeaders | None = None, keepalive_interval_s: float = 2.0,
        wake_peers: Callable[[int], None] | None = None,
    ) -> None:
        """headers: with expert workers, the exchange the loop keeps alive; wake_peers(exchange): with several
        coordinators, asks every peer to join that header exchange (the one this loop enters next)."""
        self.engine = engine
        self.max_waiting = engine.scheduler.config.max_waiting
        self._stats: list[StatsSnapshot] = []
        self.headers = headers
        self.keepalive_interval_s = keepalive_interval_s
        self.wake_peers = wake_peers
        self._wake_for = 0  # the latest exchange a peer asked this loop to join
        self._exchange_requested = False  # enter an exchange soon even when idle (a staged placement move)
        self._cond = threading.Condition()
        self._inbox: list[GenerationRequest] = []
        self._aborts: list[str] = []
        self._outbox: list[SequenceUpdate] = []  # updates (and stats, in _stats) not yet sent
        self._publisher: UpdatePublisher | None = None
        self._flush = False  # a new subscriber waits for what is in the outbox
        self._stopping = False
        self.failure: str | None = None
        self._future: Future | None = None

    def start(self, torch_thread: TorchThread) -> None:
        """Runs the loop on torch_thread, the thread that loaded the weights (see cluster.torch_thread)."""
        self._future = torch_thread.start(self._run)
        self._future.add_done_callback(_log_crash)

    def submit(self, request: GenerationRequest) -> None:
        self._check_serving()
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

    def join_exchange(self, exchange: int) -> None:
        """A peer coordinator enters header exchange number `exchange` and needs this loop there too."""
        with self._cond:
            self._wake_for = max(self._wake_for, exchange)
            self._cond.notify_all()

    def request_exchange(self) -> None:
        """Enter a header exchange soon even when idle (a staged placement switches at an exchange)."""
        with self._cond:
            self._exchange_requested = True
            self._cond.notify_all()

    def subscribe(self, address: ChannelAddress) -> None:
        """Connects to a subscriber (on the caller's thread) and makes it the one the loop sends to; a
        previous subscriber is closed. Raises ChannelClosed if the subscriber cannot be reached."""
        self._check_serving()
        publisher = UpdatePublisher(address)
        with self._cond:
            previous, self._publisher = self._publisher, publisher
            self._flush = True
            self._cond.notify_all()
        if previous is not None:
            previous.close()

    def _check_serving(self) -> None:
        """Raises WorkerUnavailable once the loop failed or was told to stop (halted for a restart): what it
        accepted then would never be stepped or published."""
        if self.failure:
            raise WorkerUnavailable(self.failure)
        if self._stopping:
            raise WorkerUnavailable("the engine loop is stopped (the engine is restarting)")

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
        last_exchange = time.monotonic()
        lockstep = False  # the last exchange ran a step: with several coordinators all exchange again at once
        while True:
            with self._cond:
                self._cond.wait_for(self._has_input, timeout=0.0 if lockstep else self.keepalive_interval_s)
                if self._stopping:
                    self.close_publisher()
                    return
                inbox, self._inbox = self._inbox, []
                aborts, self._aborts = self._aborts, []
                requested, self._exchange_requested = self._exchange_requested, False
            updates = self._admit(inbox) + [u for rid in aborts if (u := self.engine.abort(rid))]
            try:
                if self.engine.has_work():
                    if not lockstep:
                        self._wake()
                    updates += self.engine.step()
                    last_exchange, lockstep = time.monotonic(), self.wake_peers is not None
                elif self.headers is not None and (
                        (joining := lockstep or self._owes_exchange()) or requested
                        or time.monotonic() - last_exchange >= self.keepalive_interval_s):
                    if not joining:
                        self._wake()  # the keepalive interval or a requested exchange, from idle
                    lockstep = self.headers.keepalive()
                    last_exchange = time.monotonic()
            except Exception as exc:  # a worker died or a collective timed out
                self._fail(updates, f"expert-parallel step failed: {exc}")
                return
            self._publish(updates)

    def _wake(self) -> None:
        """Entering an exchange from idle: every peer coordinator must join it."""
        if self.wake_peers is not None and self.headers is not None:
            self.wake_peers(self.headers.exchanges + 1)

    def _owes_exchange(self) -> bool:
        """A peer waits in an exchange this loop has not joined yet."""
        return self.headers is not None and self._wake_for > self.headers.exchanges

    def _has_input(self) -> bool:
        return bool(self._inbox or self._aborts or self._stopping or self._flush or self.engine.has_work()
                    or self._owes_exchange() or self._exchange_requested)

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
            self._outbox.extend(updates)
            self._stats = [merged] if (merged := merge_snapshots([*self._stats, snapshot])) else []
            publisher, self._flush = self._publisher, False
            if publisher is None or not (self._outbox or self._stats[0].batch_sizes):
                return
            batch = UpdateBatch(self._outbox, self._stats[0])
            self._outbox, self._stats = [], []
        try:
            publisher.send(batch)
        except ChannelClosed as exc:
            self._lose_subscriber(publisher, exc)

    def close_publisher(self) -> None:
        """Closes the channel to the subscriber (at stop, or when a halted loop is replaced)."""
        with self._cond:
            publisher, self._publisher = self._publisher, None
        if publisher is not None:
            publisher.close()

    def _lose_subscriber(self, publisher: UpdatePublisher, exc: ChannelClosed) -> None:
        """The subscriber is gone with the updates of every request in flight: abort them all (unless a
        new subscriber had already replaced it)."""
        with self._cond:
            current = self._publisher is publisher
            if current:
                self._publisher = None
        publisher.close()
        if not current:
            return
        lost = list(self.engine.sequences)
        if lost:
            log.warning("%s; aborting %d requests in flight", exc, len(lost))
        for request_id in lost:
            self.engine.abort(request_id)

    def _fail(self, updates: list[SequenceUpdate], message: str) -> None:
        log.error("%s; failing %d in-flight requests", message, len(self.engine.sequences))
        lost = [SequenceUpdate(rid, (), (), "error", message) for rid in list(self.engine.sequences)]
        with self._cond:
            self.failure = message
            lost += [SequenceUpdate(r.request_id, (), (), "error", message) for r in self._inbox]
            self._outbox.extend(updates + lost)
            self._inbox.clear()
        self._publish([])  # the subscriber hears of every request the failure ended


def _log_crash(future: Future) -> None:
    if not future.cancelled() and future.exception() is not None:
        log.error("the engine loop crashed", exc_info=future.exception())
