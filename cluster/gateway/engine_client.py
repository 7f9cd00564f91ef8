"""The gateway's asyncio view of the engine: submit and abort over Ray, one poller per coordinator that
reads the updates it pushes over its update channel and hands each request its own queue, placement (with
several coordinators each request goes to the least loaded: cluster.gateway.placement), and recovery.

Recovery (issue "zero lost requests"): the first sign of a failed step (an update that says the engine lost
a request, the update channel closing, a failed health check, a submit refused) flips health to NOT_SERVING
before anything else happens. The engine then replaces the ranks that died (`RayExpertParallelEngine.restart`)
and every request in flight is replayed (placed afresh): resubmitted under a fresh engine id as its prompt
plus the tokens the gateway already received, asking for the tokens still owed, with the same seed.
Sampling draws depend on (seed, position) only (workers.model.sampler), so the replay yields the tokens an
uninterrupted run would have, and the client, which has seen only the received tokens, sees one stream. A
probe request per coordinator then runs one step through every rank of the new group; only after they
succeed is health SERVING again. A request waits at most `replay_timeout_s` from the failure for its
replay; then it fails with UNAVAILABLE.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import time
from dataclasses import dataclass, field

import ray

from cluster.errors import InvalidRequest, MixServeError, WorkerUnavailable
from cluster.gateway.metrics import GatewayMetrics
from cluster.gateway.placement import footprint, least_loaded
from cluster.ray_engine import RayExpertParallelEngine, RestartReport
from cluster.requests import GenerationRequest, SequenceUpdate
from cluster.update_receiver import coordinator_error
from workers.model.sampler import draw_seed

log = logging.getLogger(__name__)
PROBE_TIMEOUT_S = 60.0


@dataclass(eq=False)
class RequestStream:
    request_id: str  # the engine's id for the current attempt (a replay gets a fresh one)
    client_id: str  # the id the client chose (unique among calls in flight)
    updates: asyncio.Queue[SequenceUpdate] = field(default_factory=asyncio.Queue)
    request: GenerationRequest | None = None  # as first submitted, with its seed fixed
    received: list[int] = field(default_factory=list)  # tokens handed to `updates` so far, every attempt
    live: bool = False  # the current engine holds this attempt (False: unsent, or lost to a failure)
    finished: bool = False  # its last update arrived (the servicer has yet to release it)
    attempts: int = 0
    coordinator: int | None = None  # the coordinator of the current attempt (None: not placed yet)

    def continuation(self) -> GenerationRequest:
        """The request that continues this stream from what it has received, under a fresh engine id."""
        assert self.request is not None
        self.attempts += 1
        return dataclasses.replace(
            self.request, request_id=f"{self.request.request_id}~{self.attempts}",
            prompt_token_ids=self.request.prompt_token_ids + tuple(self.received),
            max_new_tokens=self.request.max_new_tokens - len(self.received),
        )


@dataclass
class RecoveryTimeline:
    """One recovery, in time.monotonic() seconds: for the log, the metrics and `mixserve bench failover`."""

    failed_at: float  # the failure was detected (health went NOT_SERVING); planned: the rejoin began
    planned: bool = False  # a rejoin of standby replacements after a failover onto copies, not a failure
    attempts: int = 0  # restarts tried
    restart: RestartReport | None = None  # the restart that worked
    restarted_at: float | None = None
    replayed: int = 0  # requests resubmitted
    replayed_at: float | None = None  # every replay submitted
    serving_at: float | None = None  # the probe step succeeded: SERVING
    first_token_at: float | None = None  # the first token a replayed request received

    def describe(self) -> str:
        def since(t: float | None) -> str:
            return "-" if t is None else f"{t - self.failed_at:.2f}s"

        r = self.restart
        parts = "" if r is None else (f" (halt {r.halt_s:.2f}s, replace {', '.join(r.replaced) or 'none'} "
                                      f"{r.replace_s:.2f}s, re-form {r.join_s:.2f}s)")
        if r is not None and r.left_out:
            parts += f", left out {', '.join(r.left_out)}: their experts' copies serve"
        if r is not None and r.rejoined:
            parts += f", rejoined {', '.join(r.rejoined)}"
        what = "after the rejoin began" if self.planned else "after the failure"
        return (f"{what}: restarted {since(self.restarted_at)}{parts}, {self.replayed} requests replayed "
                f"{since(self.replayed_at)}, SERVING {since(self.serving_at)}, first replayed token "
                f"{since(self.first_token_at)}; {self.attempts} restart attempts")


class EngineClient:
    def __init__(
        self, engine: RayExpertParallelEngine, metrics: GatewayMetrics, *, poll_timeout_s: float = 0.5,
        auto_recover: bool = True, replay_timeout_s: float = 60.0, rejoin_delay_s: float = 0.0,
    ) -> None:
        self.engine = engine
        self.metrics = metrics
        self.poll_timeout_s = poll_timeout_s
        self.replay_timeout_s = replay_timeout_s
        self.rejoin_delay_s = rejoin_delay_s
        self.streams: dict[str, RequestStream] = {}  # by engine request id
        self.client_ids: set[str] = set()
        self.healthy = False
        self.failures = 0  # failures detected so far
        self.on_health_change = None
        self.auto_recover = auto_recover
        self._tasks: list[asyncio.Task] = []
        self._recovery: asyncio.Task | None = None
        self._restore: asyncio.Task | None = None  # loads left-out workers' replacements, then rejoins them
        self._restarting = False  # the engine is being restarted: its calls fail, and that is no news
        self._failed_at: float | None = None  # when the failure being recovered from was detected
        self._probes: list[RequestStream] = []  # one per coordinator while a recovery probes the new group
        self.recoveries: list[RecoveryTimeline] = []  # the latest last
        # a replay waits for the sends in flight and holds new ones back, so it sees each stream once
        self._sends_open = asyncio.Event()
        self._no_sends = asyncio.Event()
        self._sends_in_flight = 0
        self._sends_open.set()
        self._no_sends.set()

    async def start(self) -> None:
        self.healthy = await asyncio.to_thread(self.engine.healthy)
        self._tasks = [asyncio.create_task(self._poll(c), name=f"updates {c}")
                       for c in range(self.engine.num_coordinators)]
        self._tasks.append(asyncio.create_task(self._watch_health(), name="health"))

    async def stop(self) -> None:
        tasks = self._tasks + [t for t in (self._recovery, self._restore) if t is not None]
        for task in tasks:
            task.cancel()
        for task in tasks:
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task

    # requests ----------------------------------------------------------------------------------
    def open(self, client_id: str, request_id: str) -> RequestStream:
        """Registers the stream that will receive a request's updates; client ids must be unique in flight."""
        if client_id in self.client_ids:
            raise InvalidRequest("request_id", f"{client_id!r} is already in flight")
        stream = RequestStream(request_id, client_id)
        self.streams[request_id] = stream
        self.client_ids.add(client_id)
        return stream

    async def send(self, stream: RequestStream, request: GenerationRequest) -> None:
        """Submits to the coordinator. Raises its typed error (InvalidRequest, Overloaded); an engine that is
        down or fails meanwhile does not fail the request: it is sent with the replays after recovery."""
        if not request.sampling.greedy and request.sampling.seed is None:  # a replay must draw the same tokens
            request = dataclasses.replace(request, sampling=dataclasses.replace(request.sampling, seed=draw_seed()))
        stream.request = request
        while not self._sends_open.is_set():  # recovery holds sends back: then this goes to the new group
            if self.streams.get(stream.request_id) is not stream:
                return  # expired (--replay-timeout) while waiting
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._sends_open.wait(), 1.0)
        if stream.attempts or self.streams.get(stream.request_id) is not stream:
            return  # a replay sent it while it waited, or it expired or was cancelled
        self._sends_in_flight += 1
        self._no_sends.clear()
        failures, generation = self.failures, self.engine.generation
        coordinator = stream.coordinator = self._place(stream)
        try:
            await _call(self.engine.submit_ref(request, coordinator))
        except WorkerUnavailable as exc:
            await self._engine_failed(f"submit refused: {exc}", generation)
            return
        finally:
            self._sends_in_flight -= 1
            if not self._sends_in_flight:
                self._no_sends.set()
        # a failure detected while the call was in flight lost it (or will): the replay sends it again
        stream.live = failures == self.failures and generation == self.engine.generation
        if generation != self.engine.generation:  # a restart ran meanwhile: whichever group took it, drop it
            with contextlib.suppress(MixServeError):
                await _call(self.engine.abort_ref(request.request_id, coordinator))

    def _place(self, stream: RequestStream) -> int:
        """The coordinator for `stream`'s next attempt: the least loaded by the streams already placed."""
        placed = ((s.coordinator, footprint(s.request)) for s in self.streams.values()
                  if s is not stream and s.coordinator is not None and s.request is not None and not s.finished)
        coordinator = least_loaded(self.engine.num_coordinators, placed)
        self.metrics.placed_requests.labels(coordinator=str(coordinator)).inc()
        return coordinator

    def release(self, stream: RequestStream) -> None:
        """Forgets a stream whose request the engine has finished (or never took)."""
        if self.streams.get(stream.request_id) is stream:
            del self.streams[stream.request_id]
            self.client_ids.discard(stream.client_id)

    async def abort(self, stream: RequestStream) -> None:
        """Forgets a stream and aborts its request in the engine, freeing its cache."""
        self.release(stream)
        if stream.coordinator is None:
            return  # never sent
        with contextlib.suppress(MixServeError):
            await _call(self.engine.abort_ref(stream.request_id, stream.coordinator))

    # updates -----------------------------------------------------------------------------------
    async def _poll(self, coordinator: int) -> None:
        while True:
            generation = self.engine.generation
            try:
                updates, stats = await asyncio.to_thread(self.engine.drain, self.poll_timeout_s, coordinator)
            except Exception as exc:  # the coordinator died or is being replaced
                await self._engine_failed(f"reading updates failed ({type(exc).__name__}: {exc})", generation)
                await asyncio.sleep(0.2)
                continue
            if stats is not None:
                self.metrics.observe_stats(stats, coordinator=coordinator)
            lost = None
            for update in updates:
                stream = self.streams.get(update.request_id)
                if stream is None:
                    continue
                if update.finish_reason == "error":  # the engine lost the request: replay it
                    lost = lost or update.error or "a step failed"
                    continue
                if update.token_ids and stream.attempts:
                    self._first_replayed_token()
                stream.received.extend(update.token_ids)
                stream.finished = update.finish_reason is not None
                stream.updates.put_nowait(update)
            if lost is not None:
                await self._engine_failed(lost, generation)

    # failure and recovery ----------------------------------------------------------------------
    @property
    def recovering(self) -> bool:
        return self._recovery is not None and not self._recovery.done()

    async def _engine_failed(self, reason: str, generation: int | None = None) -> None:
        """Health goes NOT_SERVING first; every attempt in flight is lost; recovery starts (or, if the new
        group failed while replaying, starts over). `generation`: the engine's generation when the call that
        failed began; a call begun before (or during) a restart failed with the old group, which is no news."""
        if self._restarting or (generation is not None and generation != self.engine.generation):
            return
        self.failures += 1
        for stream in self.streams.values():
            stream.live = False
        for probe in self._probes:
            probe.updates.put_nowait(SequenceUpdate(probe.request_id, (), (), "error", reason))
        if self.recovering:
            return
        self._failed_at = time.monotonic()
        self._sends_open.clear()  # new requests wait for the replays (see _replay)
        self.recoveries = [*self.recoveries[-15:], RecoveryTimeline(self._failed_at)]
        log.warning("engine failure detected (%s); %d requests in flight will be replayed", reason,
                    len(self.streams))
        self.metrics.worker_failures.inc()
        await self._set_healthy(False)
        if self.auto_recover:
            self._recovery = asyncio.create_task(self._recover(), name="recovery")

    async def _recover(self, *, planned: bool = False) -> None:
        """Restart what died (planned: rejoin the standby replacements), replay every stream, probe the new
        group; retried until it works. A failover onto surviving copies then restores the left-out workers
        in the background (_restore_workers)."""
        assert self._failed_at is not None
        timeline = self.recoveries[-1]
        while True:
            started = time.monotonic()
            timeline.attempts += 1
            try:
                self._restarting = True
                try:
                    action = self.engine.rejoin if planned else self.engine.restart
                    timeline.restart = await asyncio.to_thread(action)
                finally:
                    self._restarting = False
                timeline.restarted_at = time.monotonic()
                await self._start_probes()  # ahead of the replays: a full batch must not delay SERVING
                try:
                    timeline.replayed = await self._replay()
                    timeline.replayed_at = time.monotonic()
                    for probe in self._probes:
                        await self._finish_probe(probe)
                finally:
                    for probe in self._probes:
                        self.streams.pop(probe.request_id, None)
                    self._probes = []
                break
            except Exception as exc:
                log.error("recovery attempt failed after %.1fs (%s: %s); retrying", time.monotonic() - started,
                          type(exc).__name__, exc)
                for stream in self.streams.values():
                    stream.live = False
                self._expire_replays()
                await asyncio.sleep(1.0)
        timeline.serving_at = time.monotonic()
        if timeline.restart is not None and timeline.restart.left_out:
            self.metrics.copy_failovers.inc()
        if planned:
            self.metrics.worker_rejoins.inc()
            log.warning("rejoined: %s", timeline.describe())
        else:
            self.metrics.worker_recoveries.inc()
            self.metrics.recovery_seconds.observe(timeline.serving_at - timeline.failed_at)
            log.warning("recovered: %s", timeline.describe())
        # the gauges say the new ranks are up before health says SERVING (not a poll later)
        await self._update_rank_gauges()
        await self._set_healthy(True)
        if self.engine.degraded and (self._restore is None or self._restore.done()):
            self._restore = asyncio.create_task(self._restore_workers(), name="restore workers")

    async def _restore_workers(self) -> None:
        """After a failover onto surviving copies: loads the left-out workers' replacements in their bundles
        beside serving (retried every 5 s while that fails), then re-forms the group with them. The re-form is
        a planned pause: sends are held, the streams in flight are replayed from what they received (as after
        a failure), health stays SERVING and no stream fails."""
        while self.engine.degraded:
            try:
                standby = await asyncio.to_thread(self.engine.prepare_standby)
            except Exception as exc:
                log.error("loading a replacement failed (%s: %s); the group runs on the copies, retrying in 5 s",
                          type(exc).__name__, exc)
                await asyncio.sleep(5.0)
                continue
            await asyncio.sleep(self.rejoin_delay_s)
            while self.recovering:  # a failure meanwhile: its restart may fill the slots itself
                await asyncio.sleep(0.1)
            if not self.engine.degraded:
                return
            log.warning("%s loaded beside serving; re-forming the group with them", ", ".join(standby))
            self._sends_open.clear()  # the rejoin sees each stream once: none is in flight to the old group
            await self._no_sends.wait()
            if self.recovering:  # a failure while the sends drained: its recovery owns them now
                continue
            for stream in self.streams.values():
                stream.live = False
            self._failed_at = time.monotonic()
            self.recoveries = [*self.recoveries[-15:], RecoveryTimeline(self._failed_at, planned=True)]
            self._recovery = asyncio.create_task(self._recover(planned=True), name="rejoin")
            await asyncio.shield(self._recovery)

    async def _replay(self) -> int:
        """Resubmits every stream whose attempt was lost, continuing from the tokens it received; returns how
        many. Sends stay held back from the failure until the replays are in (then they go to the new group);
        the replay waits for those already in flight, so it sees each stream once."""
        self._sends_open.clear()
        await self._no_sends.wait()
        self._expire_replays()
        failures = self.failures
        lost = [s for s in self.streams.values() if not (s.live or s.finished) and s.request is not None]
        for stream in lost:
            stream.coordinator = None
        for stream in lost:
            request = stream.continuation()
            del self.streams[stream.request_id]
            stream.request_id = request.request_id
            self.streams[request.request_id] = stream
            stream.coordinator = self._place(stream)
            # raises WorkerUnavailable if the new group fails
            await _call(self.engine.submit_ref(request, stream.coordinator))
            if failures != self.failures:
                raise WorkerUnavailable("the new group failed during the replay")
            stream.live = True
            self.metrics.request_replays.inc()
        self._sends_open.set()
        return len(lost)

    def _first_replayed_token(self) -> None:
        latest = self.recoveries[-1] if self.recoveries else None
        if latest is not None and latest.restarted_at is not None and latest.first_token_at is None:
            latest.first_token_at = time.monotonic()

    def _expire_replays(self) -> None:
        """Fails (UNAVAILABLE) the streams that have waited replay_timeout_s since the failure."""
        if self._failed_at is None or time.monotonic() - self._failed_at < self.replay_timeout_s:
            return
        for stream in [s for s in self.streams.values() if not (s.live or s.finished)]:
            stream.updates.put_nowait(SequenceUpdate(
                stream.request_id, (), (), "error",
                f"the engine did not recover within --replay-timeout {self.replay_timeout_s:g}s"))
            self.release(stream)

    async def _start_probes(self) -> None:
        """Submits to each coordinator a one-token request that must pass through every rank of the new group;
        on an error the caller forgets them (self._probes)."""
        for coordinator in range(self.engine.num_coordinators):
            request_id = f"health-probe-{self.failures}-{coordinator}-{time.monotonic_ns()}"
            stream = RequestStream(request_id, request_id, live=True, coordinator=coordinator)
            self._probes.append(stream)
            self.streams[request_id] = stream
            await _call(self.engine.submit_ref(GenerationRequest(
                request_id=request_id, prompt_token_ids=(self.engine.cfg.bos_token_id or 0,), max_new_tokens=1,
                ignore_eos=True), coordinator))

    @staticmethod
    async def _finish_probe(stream: RequestStream) -> None:
        """Waits for the probe's token; raises if its step failed."""
        try:
            while True:
                update = await asyncio.wait_for(stream.updates.get(), PROBE_TIMEOUT_S)
                if update.error:
                    raise WorkerUnavailable(f"the probe step failed: {update.error}")
                if update.finish_reason is not None:
                    return
        except TimeoutError:
            raise WorkerUnavailable(f"the probe step did not finish within {PROBE_TIMEOUT_S:g}s") from None

    # health ------------------------------------------------------------------------------------
    async def _watch_health(self) -> None:
        while True:
            if not self.recovering:
                healthy = await self._update_rank_gauges()
                if not healthy and not self.recovering:
                    await self._engine_failed("the health check failed")
            await asyncio.sleep(1.0)

    async def _update_rank_gauges(self) -> bool:
        """Sets the up gauges of every coordinator and worker, the workers' phase seconds and rows per expert
        copy; returns whether every rank is up."""
        coordinators = await asyncio.to_thread(self.engine.coordinators_up)
        workers = await asyncio.to_thread(self.engine.workers_up)
        self.metrics.set_ranks_up(coordinators=coordinators, workers=workers)
        left_out = self.engine.options.num_workers - len(self.engine.in_group)
        self.metrics.workers_left_out.set(left_out)
        with contextlib.suppress(ray.exceptions.RayError, WorkerUnavailable):
            readings = await asyncio.to_thread(self.engine.worker_readings)
            self.metrics.set_worker_phase_seconds([dict(r["seconds"]) for r in readings])
            self.metrics.set_worker_rows([r["rows_per_expert"] for r in readings])
        return self.engine.group_up(coordinators, workers)

    async def _set_healthy(self, healthy: bool) -> None:
        if healthy != self.healthy:
            log.warning("engine health changed: %s", "SERVING" if healthy else "NOT_SERVING")
        self.healthy = healthy
        if self.on_health_change is not None:
            await self.on_health_change(healthy)


async def _call(ref):
    """Awaits a Ray call, re-raising the coordinator's own typed error."""
    try:
        return await ref
    except (ray.exceptions.RayTaskError, ray.exceptions.RayActorError) as exc:
        raise coordinator_error(exc) from None
