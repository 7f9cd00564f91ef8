"""The gateway's asyncio view of the engine: submit and abort over Ray, and one poller that drains the
coordinator's updates and hands each request its own queue. Also watches health."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from dataclasses import dataclass, field

import ray

from cluster.errors import InvalidRequest, MixServeError, WorkerUnavailable
from cluster.gateway.metrics import GatewayMetrics
from cluster.ray_engine import RayExpertParallelEngine
from cluster.requests import GenerationRequest, SequenceUpdate

log = logging.getLogger(__name__)


@dataclass
class RequestStream:
    request_id: str
    updates: asyncio.Queue[SequenceUpdate] = field(default_factory=asyncio.Queue)


class EngineClient:
    def __init__(self, engine: RayExpertParallelEngine, metrics: GatewayMetrics, *, poll_timeout_s: float = 0.5):
        self.engine = engine
        self.metrics = metrics
        self.poll_timeout_s = poll_timeout_s
        self.streams: dict[str, RequestStream] = {}
        self.healthy = False
        self._tasks: list[asyncio.Task] = []
        self.on_health_change = None

    async def start(self) -> None:
        self.healthy = await asyncio.to_thread(self.engine.healthy)
        self._tasks = [asyncio.create_task(self._poll(), name="drain"),
                       asyncio.create_task(self._watch_health(), name="health")]

    async def stop(self) -> None:
        for task in self._tasks:
            task.cancel()
        for task in self._tasks:
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task

    async def submit(self, request: GenerationRequest) -> RequestStream:
        if request.request_id in self.streams:
            raise InvalidRequest("request_id", f"{request.request_id!r} is already in flight")
        stream = RequestStream(request.request_id)
        self.streams[request.request_id] = stream
        try:
            await _call(self.engine.coordinator.submit.remote(request))
        except BaseException:
            self.streams.pop(request.request_id, None)
            raise
        return stream

    async def abort(self, request_id: str) -> None:
        self.streams.pop(request_id, None)
        with contextlib.suppress(MixServeError):
            await _call(self.engine.coordinator.abort.remote(request_id))

    def release(self, request_id: str) -> None:
        self.streams.pop(request_id, None)

    async def _poll(self) -> None:
        while True:
            try:
                updates, stats = await _call(self.engine.drain_ref(self.poll_timeout_s))
            except WorkerUnavailable as exc:
                self._fail_all(str(exc))
                await asyncio.sleep(1.0)
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
            if healthy != self.healthy:
                log.warning("engine health changed: %s", "SERVING" if healthy else "NOT_SERVING")
                if not healthy:
                    self.metrics.worker_failures.inc()
            self.healthy = healthy
            if self.on_health_change is not None:
                await self.on_health_change(healthy)
            await asyncio.sleep(1.0)


async def _call(ref):
    """Awaits a Ray call, re-raising the coordinator's own typed error."""
    try:
        return await ref
    except ray.exceptions.RayTaskError as exc:
        raise (exc.cause if exc.cause else exc) from None
    except ray.exceptions.RayActorError as exc:
        raise WorkerUnavailable(f"the coordinator is gone: {exc}") from exc
