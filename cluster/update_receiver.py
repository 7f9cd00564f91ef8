"""The driver's end of the results path: opens the coordinator's update channel to this process and drains
the batches the engine thread pushes after every step (cluster.update_channel is the socket itself).

Requests go in as Ray actor calls (`RayExpertParallelEngine.submit_ref`); their tokens come back here.
Knows nothing of placement or restarts: it is handed the coordinator to subscribe to, and a closed
channel raises WorkerUnavailable so that the next drain subscribes to the coordinator then current.
"""

from __future__ import annotations

import threading
import time

import ray

from cluster.engine_stats import StatsSnapshot, merge_snapshots
from cluster.errors import WorkerUnavailable
from cluster.requests import SequenceUpdate
from cluster.update_channel import ChannelClosed, UpdateBatch, UpdateSubscription


class UpdateReceiver:
    def __init__(self) -> None:
        self._subscription: UpdateSubscription | None = None
        self._lock = threading.Lock()

    def subscribe(self, coordinator: ray.actor.ActorHandle, timeout_s: float = 30.0) -> UpdateSubscription:
        """Opens the coordinator's update channel to this process (replacing any earlier one); raises
        WorkerUnavailable if it cannot."""
        subscription = UpdateSubscription(ray.util.get_node_ip_address())
        try:
            connected = coordinator.subscribe.remote(subscription.address)
            deadline = time.monotonic() + timeout_s
            while not subscription.connecting(0.05):  # the call fails first if the coordinator cannot connect
                if ray.wait([connected], timeout=0)[0]:
                    unwrap(connected)
                    raise ChannelClosed("the coordinator returned without connecting")
                if time.monotonic() > deadline:
                    raise ChannelClosed(f"the coordinator did not connect within {timeout_s}s")
            subscription.accept(timeout_s)
            unwrap(connected)
        except ChannelClosed as exc:
            subscription.close()
            raise WorkerUnavailable(f"the coordinator's update channel did not open: {exc}") from exc
        except BaseException:
            subscription.close()
            raise
        with self._lock:
            previous, self._subscription = self._subscription, subscription
        if previous is not None:
            previous.close()
        return subscription

    def drain(
        self, coordinator: ray.actor.ActorHandle, timeout_s: float
    ) -> tuple[list[SequenceUpdate], StatsSnapshot | None]:
        """Every update sent so far, and the engine's stats over them; waits up to timeout_s for the first.
        Subscribes to `coordinator` first when no channel is open. One caller at a time. Raises
        WorkerUnavailable once the channel closes (the coordinator is gone)."""
        subscription = self._subscription or self.subscribe(coordinator)
        batches: list[UpdateBatch] = []
        try:
            ready = subscription.poll(timeout_s)
            while ready:
                batches.append(subscription.recv())
                ready = subscription.poll(0)
        except ChannelClosed as exc:
            with self._lock:
                if self._subscription is subscription:
                    self._subscription = None
            subscription.close()
            raise WorkerUnavailable(f"the coordinator's update channel closed: {exc}") from exc
        updates = [u for b in batches for u in b.updates]
        return updates, merge_snapshots([b.stats for b in batches if b.stats is not None])

    def close(self) -> None:
        with self._lock:
            subscription, self._subscription = self._subscription, None
        if subscription is not None:
            subscription.close()


def unwrap(ref):
    """ray.get that raises what `coordinator_error` makes of a failed call."""
    try:
        return ray.get(ref)
    except (ray.exceptions.RayTaskError, ray.exceptions.RayActorError) as exc:
        raise coordinator_error(exc) from None


def coordinator_error(exc: ray.exceptions.RayError) -> Exception:
    """What a caller of the coordinator sees: the method's own typed error (InvalidRequest, Overloaded, ...),
    or WorkerUnavailable when the actor is gone."""
    if isinstance(exc, ray.exceptions.RayActorError):
        return WorkerUnavailable(f"the coordinator is gone: {exc}")
    return exc.cause if isinstance(exc, ray.exceptions.RayTaskError) and exc.cause else exc
