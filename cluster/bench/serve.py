"""`mixserve bench serve`: online serving over gRPC. For each worker count it starts a Ray engine and a
gateway on loopback in this process (or measures `--target`), drives a concurrency or request-rate sweep
from an asyncio client, and measures the transformers baseline (batched generate, batch = concurrency)
on the same prompts in the same run. Every engine goes through the whole sweep once per round, the
engines interleaved; a point's rounds are pooled.
"""

from __future__ import annotations

import asyncio
import gc
import math
import threading
from contextlib import nullcontext
from dataclasses import dataclass, field

import torch

from cluster.bench import load, machine
from cluster.bench.load import ClientTrace
from cluster.bench.report import RAY, TRANSFORMERS, ModelSummary, PointRatios, ServePoint, ServeReport, compute_ratios
from cluster.bench.runners import (
    cpu_seconds,
    generate_batch,
    ray_label,
    start_ray_engine,
    token_bar,
    worker_delta,
    worker_seconds,
)
from cluster.bench.workload import EngineSetup, Workload, load_transformers, make_prompts
from cluster.gateway.server import Gateway, GatewayOptions
from cluster.ray_engine import RayExpertParallelEngine
from cluster.ray_session import ray_session
from workers.config import ModelConfig

EXTERNAL_LABEL = "mixserve (external server)"
HF_SERVE_LABEL = "transformers (batched generate, batch = concurrency)"


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

    def prompts(self, cfg: ModelConfig, point: SweepPoint) -> list[tuple[int, ...]]:
        workload = Workload(num_prompts=point.num_prompts, input_len=self.input_len, output_len=self.output_len,
                            seed=self.seed)
        return make_prompts(workload, cfg.vocab_size)


@dataclass
class PointSamples:
    """What one (engine, sweep point) measured, pooled over rounds: client traces, wall seconds, server phases
    from /metrics, expert workers' own seconds, each process's CPU seconds and the load around each round."""

    label: str
    engine: str
    workers: int | None
    point: SweepPoint
    traces: list[ClientTrace] = field(default_factory=list)
    seconds: float = 0.0
    rounds: int = 0
    server_phases: dict[str, float] = field(default_factory=dict)
    worker_phases: list[dict[str, float]] = field(default_factory=list)
    loads: list[float] = field(default_factory=list)
    cpu: dict[str, float] = field(default_factory=dict)

    def add(self, traces: list[ClientTrace], seconds: float, *, server_phases: dict[str, float],
            worker_phases: list[dict[str, float]], loads: tuple[float, float], cpu: dict[str, float]) -> None:
        self.traces += traces
        self.seconds += seconds
        self.rounds += 1
        machine.add_into(self.server_phases, server_phases)
        machine.add_into(self.cpu, cpu)
        if not self.worker_phases:
            self.worker_phases = [{} for _ in worker_phases]
        for total, more in zip(self.worker_phases, worker_phases, strict=True):
            machine.add_into(total, more)
        self.loads += loads

    def to_point(self, output_len: int) -> ServePoint:
        """Counts and seconds per round (means); rates and latency percentiles over every round's requests."""
        ok = [t for t in self.traces if t.error is None]
        tokens, n = sum(t.tokens for t in ok), self.rounds
        return ServePoint(
            label=self.label, engine=self.engine, workers=self.workers, point=self.point.key,
            concurrency=self.point.concurrency, request_rate=self.point.request_rate, requests=len(ok) // n,
            output_tokens=tokens // n, seconds=self.seconds / n, output_tokens_per_s=tokens / self.seconds,
            requests_per_s=len(ok) / self.seconds, latency=load.summarize(self.traces),
            server_phase_seconds={k: v / n for k, v in self.server_phases.items()},
            worker_phase_seconds=tuple({k: v / n for k, v in w.items()} for w in self.worker_phases),
            exact_output_len=len(ok) == len(self.traces) and all(t.tokens == output_len for t in ok),
            errors=len(self.traces) - len(ok), load_1m=(min(self.loads), max(self.loads)), rounds=n,
            cpu_seconds={k: v / n for k, v in self.cpu.items()},
        )


class Collected(dict[tuple[str, str], PointSamples]):
    """PointSamples by (engine label, point key), in the order first measured."""

    def at(self, label: str, engine: str, workers: int | None, point: SweepPoint) -> PointSamples:
        return self.setdefault((label, point.key), PointSamples(label=label, engine=engine, workers=workers,
                                                                point=point))


@dataclass(frozen=True, kw_only=True)
class Server:
    """Where a mixserve engine serves, and (when we started it) the engine itself."""

    label: str
    workers: int | None
    target: str
    metrics_url: str | None
    engine: RayExpertParallelEngine | None = None


class BackgroundGateway:
    """A gateway (over a started Ray engine) serving on loopback from a background event-loop thread."""

    def __init__(self, engine: RayExpertParallelEngine) -> None:
        self.engine = engine
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, name="bench-gateway", daemon=True)
        self.gateway: Gateway | None = None

    def _run(self, coro, timeout_s: float = 60.0):
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout_s)

    async def _start(self) -> Gateway:
        gateway = Gateway(self.engine, GatewayOptions(port=0, metrics_port=0, grace_s=5))
        await gateway.start()
        return gateway

    def __enter__(self) -> Server:
        self.thread.start()
        self.gateway = self._run(self._start())
        workers = self.engine.options.num_workers
        return Server(label=ray_label(workers), workers=workers, target=f"127.0.0.1:{self.gateway.port}",
                      metrics_url=f"http://127.0.0.1:{self.gateway.metrics_port}/metrics", engine=self.engine)

    def __exit__(self, *exc_info) -> None:
        try:
            if self.gateway is not None:
                self._run(self.gateway.stop())
        finally:
            self.loop.call_soon_threadsafe(self.loop.stop)
            self.thread.join(10)


def _drive(opts: ServeOptions, server: Server, point: SweepPoint, prompts: list[tuple[int, ...]],
           output_len: int, progress: bool) -> tuple[list[ClientTrace], float]:
    with token_bar(len(prompts) * output_len, f"{server.label} {point.key}", enabled=progress) as bar:
        if point.concurrency is not None:
            run = load.closed_loop(server.target, prompts, output_len, point.concurrency, bar.update, opts.timeout_s)
        else:
            run = load.open_loop(server.target, prompts, output_len, point.request_rate, opts.seed, bar.update,
                                 opts.timeout_s)
        return asyncio.run(run)


def measure_server(opts: ServeOptions, cfg: ModelConfig, server: Server, collected: Collected) -> None:
    """Warms the server up with one wave of short requests, then measures every sweep point once."""
    warm = SweepPoint(concurrency=opts.max_in_flight, request_rate=None, num_prompts=opts.max_in_flight)
    _drive(opts, server, warm, opts.prompts(cfg, warm), opts.setup.warmup_tokens, False)
    for point in opts.sweep():
        prompts = opts.prompts(cfg, point)
        before = load.scrape(server.metrics_url) if server.metrics_url else {}
        workers_before = worker_seconds(server.engine)
        load_before = machine.load_average()[0]
        cpu_before = cpu_seconds(server.engine)
        traces, seconds = _drive(opts, server, point, prompts, opts.output_len, opts.setup.progress)
        cpu = machine.delta(cpu_before, cpu_seconds(server.engine))
        expected = sum(t.tokens for t in traces)
        after = load.scrape_settled(server.metrics_url, before, expected) if server.metrics_url else {}
        collected.at(server.label, RAY, server.workers, point).add(
            traces, seconds, server_phases=load.phase_delta(before, after),
            worker_phases=worker_delta(workers_before, worker_seconds(server.engine)),
            loads=(load_before, machine.load_average()[0]), cpu=cpu)


def _hf_point(model, cfg: ModelConfig, opts: ServeOptions, point: SweepPoint, collected: Collected) -> None:
    """Batches of `concurrency` prompts through generate; each request's trace from the batch's step times."""
    prompts = opts.prompts(cfg, point)
    traces: list[ClientTrace] = []
    seconds = 0.0
    batch = point.concurrency or len(prompts)
    load_before = machine.load_average()[0]
    cpu_before = cpu_seconds()
    with token_bar(len(prompts) * opts.output_len, f"transformers {point.key}", enabled=opts.setup.progress) as bar:
        for first in range(0, len(prompts), batch):
            out = generate_batch(model, cfg, prompts[first:first + batch], opts.output_len, bar.update)
            seconds += out.end - out.start
            traces += [ClientTrace(sent=out.start, chunk_times=out.step_times, chunk_tokens=(1,) * len(ids),
                                   done=out.end, finish_reason="length") for ids in out.token_ids]
    collected.at(HF_SERVE_LABEL, TRANSFORMERS, None, point).add(
        traces, seconds, server_phases={}, worker_phases=[], loads=(load_before, machine.load_average()[0]),
        cpu=machine.delta(cpu_before, cpu_seconds()))


def measure_transformers(opts: ServeOptions, cfg: ModelConfig, collected: Collected) -> None:
    """Concurrency points only: a request-rate sweep has no batched-generate equivalent."""
    sweep = [p for p in opts.sweep() if p.concurrency is not None]
    if not sweep:
        return
    model = load_transformers(opts.setup.model_dir, opts.setup.dtype, opts.setup.device)
    warm = opts.prompts(cfg, sweep[-1])[: max(p.concurrency or 1 for p in sweep)]
    generate_batch(model, cfg, warm, opts.setup.warmup_tokens)
    for point in sweep:
        _hf_point(model, cfg, opts, point, collected)
    del model
    gc.collect()


def _one_round(opts: ServeOptions, cfg: ModelConfig, collected: Collected) -> None:
    if opts.transformers:
        measure_transformers(opts, cfg, collected)
    if opts.target is not None:
        server = Server(label=EXTERNAL_LABEL, workers=None, target=opts.target, metrics_url=opts.metrics_url)
        measure_server(opts, cfg, server, collected)
    for workers in opts.workers if opts.target is None else ():
        sizing = Workload(num_prompts=opts.max_in_flight, input_len=opts.input_len, output_len=opts.output_len)
        engine = start_ray_engine(cfg, opts.setup, sizing, workers)
        try:
            with BackgroundGateway(engine) as server:
                measure_server(opts, cfg, server, collected)
        finally:
            engine.shutdown()


def run_serve(opts: ServeOptions) -> ServeReport:
    start = machine.run_start()
    cfg = ModelConfig.from_model_dir(opts.setup.model_dir)
    torch.set_num_threads(opts.setup.threads_per_rank)
    collected = Collected()
    with ray_session(opts.ray_address, max(opts.workers)) if opts.target is None else nullcontext():
        for _ in range(opts.setup.rounds):
            _one_round(opts, cfg, collected)
    points = [s.to_point(opts.output_len) for s in collected.values()]
    reference = EXTERNAL_LABEL if opts.target else (ray_label(0) if 0 in opts.workers else None)
    ratios = [PointRatios(point=key, ratios=r) for key in dict.fromkeys(p.point for p in points)
              for r in compute_ratios([p for p in points if p.point == key], reference_label=reference)]
    return ServeReport(
        mode="serve", meta=machine.run_meta(start), model=ModelSummary.of(opts.setup.model_dir, cfg),
        input_len=opts.input_len, output_len=opts.output_len, settings=opts.setup.summary(),
        reference_label=reference, points=tuple(points), ratios=tuple(ratios),
    )
