"""What one (engine, sweep point) measured, pooled over rounds: client traces, wall seconds, server phases
from /metrics, expert workers' own seconds, each process's CPU seconds and the load around each round;
and the ServePoint from it."""

from __future__ import annotations

from dataclasses import dataclass, field

from cluster.bench.latency import RequestTrace, summarize
from cluster.bench.serve_types import ServePoint, SweepPoint


def _add_into(total: dict[str, float], more: dict[str, float]) -> None:
    for key, value in more.items():
        total[key] = total.get(key, 0.0) + value


@dataclass
class PointSamples:
    label: str
    engine: str
    workers: int | None
    point: SweepPoint
    traces: list[RequestTrace] = field(default_factory=list)
    seconds: float = 0.0
    rounds: int = 0
    server_phases: dict[str, float] = field(default_factory=dict)
    worker_phases: list[dict[str, float]] = field(default_factory=list)
    loads: list[float] = field(default_factory=list)
    cpu: dict[str, float] = field(default_factory=dict)

    def add(self, traces: list[RequestTrace], seconds: float, *, server_phases: dict[str, float],
            worker_phases: list[dict[str, float]], loads: tuple[float, float], cpu: dict[str, float]) -> None:
        self.traces += traces
        self.seconds += seconds
        self.rounds += 1
        _add_into(self.server_phases, server_phases)
        _add_into(self.cpu, cpu)
        if not self.worker_phases:
            self.worker_phases = [{} for _ in worker_phases]
        for total, more in zip(self.worker_phases, worker_phases, strict=True):
            _add_into(total, more)
        self.loads += loads

    def to_point(self, output_len: int) -> ServePoint:
        """Counts and seconds per round (means); rates and latency percentiles over every round's requests."""
        ok = [t for t in self.traces if t.error is None]
        tokens, n = sum(t.tokens for t in ok), self.rounds
        return ServePoint(
            label=self.label, engine=self.engine, workers=self.workers, point=self.point.key,
            concurrency=self.point.concurrency, request_rate=self.point.request_rate, requests=len(ok) // n,
            output_tokens=tokens // n, seconds=self.seconds / n, output_tokens_per_s=tokens / self.seconds,
            requests_per_s=len(ok) / self.seconds, latency=summarize(self.traces),
            server_phase_seconds={k: v / n for k, v in self.server_phases.items()},
            worker_phase_seconds=tuple({k: v / n for k, v in w.items()} for w in self.worker_phases),
            exact_output_len=len(ok) == len(self.traces) and all(t.tokens == output_len for t in ok),
            errors=len(self.traces) - len(ok), load_1m=(min(self.loads), max(self.loads)), rounds=n,
            cpu_seconds={k: v / n for k, v in self.cpu.items()},
        )


class Collected:
    """PointSamples by (engine label, point key), in the order first measured."""

    def __init__(self) -> None:
        self.samples: dict[tuple[str, str], PointSamples] = {}

    def at(self, label: str, engine: str, workers: int | None, point: SweepPoint) -> PointSamples:
        key = (label, point.key)
        if key not in self.samples:
            self.samples[key] = PointSamples(label=label, engine=engine, workers=workers, point=point)
        return self.samples[key]

    def points(self, output_len: int) -> list[ServePoint]:
        return [s.to_point(output_len) for s in self.samples.values()]
