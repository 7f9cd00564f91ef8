"""Typed errors a client or a peer can cause; the gateway maps them to gRPC status codes."""


class MixServeError(Exception):
    """Base class of mixserve's request-level errors."""


class InvalidRequest(MixServeError, ValueError):
    """A request field is invalid; the message names the field."""

    def __init__(self, field: str, message: str) -> None:
        super().__init__(f"{field}: {message}")
        self.field = field
        self.reason = message

    def __reduce__(self):  # picklable across Ray actor boundaries
        return (type(self), (self.field, self.reason))


class Overloaded(MixServeError):
    """The waiting queue is full."""


class WorkerUnavailable(MixServeError):
    """An expert worker died or a collective timed out; the requests it touched are lost."""


class WorkerStartError(RuntimeError):
    """An expert worker (or the coordinator) could not load its weights or join the group."""


class MoveFailed(RuntimeError):
    """A balancer move did not happen: a rank could not stage the new placement or the switch was not seen in
    time (cluster.ray_engine.RayExpertParallelEngine.move_replicas)."""
