"""The gateway's asyncio view of the engine: submit and abort over Ray, and one poller that reads the
updates the coordinator pushes over its update channel and hands each request its own queue. Also
watches health."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from dataclasses import dataclass, field

import ray

from cluster.errors import InvalidRequest, MixServeError
from cluster.gateway.metrics import GatewayMetrics
from cluster.ray_engine import RayExpertParallelEngine
from cluster.requests import GenerationRequest, SequenceUpdate
from cluster.update_receiver import coordinator_error

log = logging.getLogger(__name__)


@dataclass
class RequestStream:
    request_id: str  # the engine's id for the call
    client_id: str  # the id the client chose (unique among calls in flight)
    updates: asyncio.Queue[SequenceUpdate] = field(default_factory=asyncio.Queue)


class EngineClient:
    def __init__(
        self, engine: RayExpertParallelEngine, metrics: GatewayMetrics, *, poll_timeout_s: float = 0.5,
        auto_recover: bool = True,
    ) -> None:
        self.engine = engine
        self.metrics = metrics
        self.poll_timeout_s = poll_timeout_s
        self.streams: dict[str, RequestStream] = {}  # by engine request id
        self.client_ids: set[str] = set()
        self.healthy = False
        self._tasks: list[asyncio.Task] = []
        self.on_health_change = None
        self.auto_recover = auto_recover

    async def start(self) -> None:
        self.healthy = await asyncio.to_thread(self.engine.healthy)
        self._tasks = [asyncio.create_task(self._poll(), name="updates"),
                       asyncio.create_task(self._watch_health(), name="health")]

    async def stop(self) -> None:
        for task in self._tasks:
            task.cancel()
        for task in self._tasks:
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task

    def open(self, client_id: str, request_id: str) -> RequestStream:
        """Registers the stream that will receive a request's updates; client ids must be unique in flight."""
        if client_id in self.client_ids:
            raise InvalidRequest("request_id", f"{client_id!r} is already in flight")
        stream = RequestStream(request_id, client_id)
        self.streams[request_id] = stream
        self.client_ids.add(client_id)
        return stream

    async def send(self, request: GenerationRequest) -> None:
        """Submits to the coordinator; raises its typed error (InvalidRequest, Overloaded, WorkerUnavailable)."""
        await _call(self.engine.submit_ref(request))

    def release(self, stream: RequestStream) -> None:
        """Forgets a stream whose request the engine has finished (or never took)."""
        if self.streams.get(stream.request_id) is stream:
            del self.streams[stream.request_id]
            self.client_ids.discard(stream.client_id)

    async def abort(self, stream: RequestStream) -> None:
        """Forgets a stream and aborts its request in the engine, freeing its cache."""
        self.release(stream)
        with contextlib.suppress(MixServeError):
            await _call(self.engine.abort_ref(stream.request_id))

    async def _poll(self) -> None:
        while True:
            try:
                updates, stats = await asyncio.to_thread(self.engine.drain, self.poll_timeout_s)
            except Exception as exc:  # the coordinator died or is being replaced: in-flight requests are lost
                log.warning("reading updates failed (%s: %s); failing %d in-flight requests", type(exc).__name__, exc,
                            len(self.streams))
                self._fail_all(f"the engine is unavailable: {exc}")
                await asyncio.sleep(0.5)
                continue
            if stats is not None:
                self.metrics.observe_stats(stats)
            for update in updates:
                stream = self.streams.get(update.request_id)
                if stream is not None:
                    stream.updates.put_nowait(update)

    def _fail_all(self, message: str) -> None:
        for rid, stream in list(self.streams.items()):
            stream.updates.put_nowait(SequenceUpdate(rid, (), (), "error", message))

    async def _watch_health(self) -> None:
        while True:
            healthy = await asyncio.to_thread(self.engine.healthy)
            self.metrics.set_workers_up(await asyncio.to_thread(self.engine.workers_up))
            await self._set_healthy(healthy)
            if not healthy and self.auto_recover:
                await self._recover()
            await asyncio.sleep(1.0)

    async def _set_healthy(self, healthy: bool) -> None:
        if healthy != self.healthy:
            log.warning("engine health changed: %s", "SERVING" if healthy else "NOT_SERVING")
            if not healthy:
                self.metrics.worker_failures.inc()
        self.healthy = healthy
        if self.on_health_change is not None:
            await self.on_health_change(healthy)

    async def _recover(self) -> None:
        """Replace the lost actors and re-form the group; the gateway keeps running throughout."""
        started = time.monotonic()
        try:
            await asyncio.to_thread(self.engine.restart)
        except Exception as exc:
            log.error("recovery failed after %.1fs (%s); retrying", time.monotonic() - started, exc)
            await asyncio.sleep(2.0)
            return
        self.metrics.worker_recoveries.inc()
        log.warning("recovered in %.1fs", time.monotonic() - started)
        # the gauges say the new workers are up before health says SERVING (not a poll later)
        self.metrics.set_workers_up(await asyncio.to_thread(self.engine.workers_up))
        await self._set_healthy(await asyncio.to_thread(self.engine.healthy))


async def _call(ref):
    """Awaits a Ray call, re-raising the coordinator's own typed error."""
    try:
        return await ref
    except (ray.exceptions.RayTaskError, ray.exceptions.RayActorError) as exc:
        raise coordinator_error(exc) from None
