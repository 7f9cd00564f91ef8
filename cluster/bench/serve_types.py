"""Options and results of `mixserve bench serve`: the sweep, one measured point per (engine, sweep value)."""

from __future__ import annotations

import math
from dataclasses import dataclass

from cluster.bench.engines import EngineSetup
from cluster.bench.latency import LatencySummary
from cluster.bench.meta import RunMeta
from cluster.bench.results import ModelSummary, Ratios


@dataclass(frozen=True, kw_only=True)
class SweepPoint:
    concurrency: int | None  # closed loop: this many streams at all times
    request_rate: float | None  # open loop: Poisson arrivals per second (inf: all at once)
    num_prompts: int

    @property
    def key(self) -> str:
        if self.concurrency is not None:
            return f"c={self.concurrency}"
        return "rate=inf" if math.isinf(self.request_rate or 0.0) else f"rate={self.request_rate:g}/s"


@dataclass(frozen=True, kw_only=True)
class ServeOptions:
    setup: EngineSetup
    input_len: int
    output_len: int
    num_prompts: int = 0  # per sweep point; 0 = the concurrency (one wave of streams)
    seed: int = 0
    concurrency: tuple[int, ...] = ()
    request_rates: tuple[float, ...] = ()
    workers: tuple[int, ...] = (0,)
    transformers: bool = True  # batched generate with batch = concurrency (concurrency sweeps only)
    target: str | None = None  # an external server instead of starting one
    metrics_url: str | None = None  # its /metrics (for the server-side phase breakdown)
    ray_address: str | None = None
    timeout_s: float = 600.0

    def __post_init__(self) -> None:
        if bool(self.concurrency) == bool(self.request_rates):
            raise ValueError("give exactly one of concurrency and request_rates")
        if any(c < 1 for c in self.concurrency):
            raise ValueError(f"concurrency values must be >= 1, got {self.concurrency}")
        if any(not r > 0 for r in self.request_rates):
            raise ValueError(f"request rates must be > 0, got {self.request_rates}")
        if self.request_rates and self.num_prompts < 1:
            raise ValueError("a request-rate sweep needs num_prompts >= 1")

    def sweep(self) -> list[SweepPoint]:
        if self.concurrency:
            return [SweepPoint(concurrency=c, request_rate=None, num_prompts=self.num_prompts or c)
                    for c in self.concurrency]
        return [SweepPoint(concurrency=None, request_rate=r, num_prompts=self.num_prompts) for r in self.request_rates]

    @property
    def max_in_flight(self) -> int:
        return max(self.concurrency) if self.concurrency else self.num_prompts


@dataclass(frozen=True, kw_only=True)
class ServePoint:
    label: str
    engine: str
    workers: int | None
    point: str
    concurrency: int | None
    request_rate: float | None
    requests: int
    output_tokens: int
    seconds: float
    output_tokens_per_s: float
    requests_per_s: float
    latency: LatencySummary
    server_phase_seconds: dict[str, float]  # from /metrics, after − before
    worker_phase_seconds: tuple[dict[str, float], ...]
    exact_output_len: bool
    errors: int
    load_1m: tuple[float, float]  # lowest / highest 1-minute load average around the point's rounds
    rounds: int  # requests, tokens, seconds and phases are per round; rates and latencies pool the rounds
    # CPU seconds per round by process (cluster.bench.cpu_time): the bench process (gateway + load generator,
    # or transformers), the coordinator, each expert worker
    cpu_seconds: dict[str, float]


@dataclass(frozen=True, kw_only=True)
class PointRatios:
    point: str
    ratios: Ratios


@dataclass(frozen=True, kw_only=True)
class ServeReport:
    mode: str
    meta: RunMeta
    model: ModelSummary
    input_len: int
    output_len: int
    settings: dict[str, str]
    reference_label: str | None
    points: tuple[ServePoint, ...]
    ratios: tuple[PointRatios, ...]
