"""`mixserve bench serve`: online serving over gRPC. For each worker count it starts a Ray engine and a
gateway on loopback in this process (or measures `--target`), drives a concurrency or request-rate sweep
from an asyncio client, and measures the transformers baseline (batched generate, batch = concurrency)
on the same prompts in the same run. Every engine goes through the whole sweep once per round, the
engines interleaved; a point's rounds are pooled.

Prompts may start with one shared prefix, and each worker count may run with prefix caching off and on side by
side (cluster.bench.prefix_cache pairs them). So that a cache never serves what the measurement should compute,
every (round, sweep point) draws its own prompts (and with them its own shared prefix), the warm-up draws yet
others, and every engine is started afresh each round.
"""

from __future__ import annotations

import asyncio
import gc
import math
import threading
from contextlib import nullcontext
from dataclasses import dataclass, field, replace

import torch

from cluster.bench import load, machine, prefix_cache
from cluster.bench.load import ClientTrace
from cluster.bench.prefix_cache import CachedRun, caching_suffix, switch_label
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
    coordinators: tuple[int, ...] = (1,)  # engines with expert workers run once per count (0 workers: 1 only)
    transformers: bool = True  # batched generate with batch = concurrency (concurrency sweeps only)
    target: str | None = None  # an external server instead of starting one
    metrics_url: str | None = None  # its /metrics (for the server-side phase breakdown)
    ray_address: str | None = None
    timeout_s: float = 600.0
    shared_prefix_len: int = 0  # every prompt of a (round, point) starts with the same this many tokens
    prefix_caching: tuple[bool, ...] = (False,)  # each worker count runs once per value (off and on side by side)

    def __post_init__(self) -> None:
        if not self.prefix_caching or len(set(self.prefix_caching)) != len(self.prefix_caching):
            raise ValueError(f"prefix_caching needs one or both of off and on, each once, got {self.prefix_caching}")
        if self.target is not None and len(self.prefix_caching) > 1:
            raise ValueError("prefix caching is the --target server's own setting: give one value with --target")
        if not self.coordinators or any(c < 1 for c in self.coordinators):
            raise ValueError(f"coordinators must be >= 1, got {self.coordinators}")
        if self.shared_prefix_len < 0:
            raise ValueError(f"shared_prefix_len must be >= 0, got {self.shared_prefix_len}")
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

    def prompt_seed(self, round_index: int, point: SweepPoint | None) -> int:
        """Every (round, sweep point) its own seed, the round's warm-up (point None) another: no prompt, and no
        shared prefix, is ever sent twice to one engine, so a prefix cache starts cold for each measurement."""
        sweep = self.sweep()
        return self.seed + round_index * (len(sweep) + 1) + (len(sweep) if point is None else sweep.index(point))

    def prompts(self, cfg: ModelConfig, point: SweepPoint, round_index: int = 0, *,
                warmup: bool = False) -> list[tuple[int, ...]]:
        workload = Workload(num_prompts=point.num_prompts, input_len=self.input_len, output_len=self.output_len,
                            seed=self.prompt_seed(round_index, None if warmup else point),
                            shared_prefix_len=self.shared_prefix_len)
        return make_prompts(workload, cfg.vocab_size)

    def engine_label(self, workers: int, caching: bool, coordinators: int = 1) -> str:
        return ray_label(workers, coordinators) + (caching_suffix(caching) if len(self.prefix_caching) > 1 else "")

    def ray_engines(self) -> list[tuple[int, int]]:
        """(workers, coordinators) of every Ray engine, in run order."""
        return [(w, c) for w in self.workers for c in (self.coordinators if w else (1,))]


@dataclass
class PointSamples:
    """What one (engine, sweep point) measured, pooled over rounds: client traces, wall seconds, server phases
    from /metrics, expert workers' own seconds, each process's CPU seconds and the load around each round."""

    label: str
    engine: str
    workers: int | None
    point: SweepPoint
    prefix_caching: bool | None = None  # None: not a mixserve engine we started (transformers, --target)
    coordinators: int = 1
    traces: list[ClientTrace] = field(default_factory=list)
    seconds: float = 0.0
    rounds: int = 0
    server_phases: dict[str, float] = field(default_factory=dict)
    worker_phases: list[dict[str, float]] = field(default_factory=list)
    loads: list[float] = field(default_factory=list)
    cpu: dict[str, float] = field(default_factory=dict)
    prefix_cache_tokens: dict[str, float] = field(default_factory=dict)  # looked up / reused (from /metrics)

    def add(self, traces: list[ClientTrace], seconds: float, *, server_phases: dict[str, float],
            worker_phases: list[dict[str, float]], loads: tuple[float, float], cpu: dict[str, float],
            prefix_tokens: dict[str, float] | None = None) -> None:
        self.traces += traces
        self.seconds += seconds
        self.rounds += 1
        machine.add_into(self.server_phases, server_phases)
        machine.add_into(self.prefix_cache_tokens, prefix_tokens or {})
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
            cpu_seconds={k: v / n for k, v in self.cpu.items()}, prefix_caching=self.prefix_caching,
            prefix_cache_tokens={k: v / n for k, v in self.prefix_cache_tokens.items()},
        )

    def cached_run(self) -> CachedRun:
        """What the prefix-caching comparison reads (a mixserve engine we started only)."""
        assert self.prefix_caching is not None, f"{self.label} is not a mixserve engine started by the bench"
        ok = [t for t in self.traces if t.error is None]
        return CachedRun(label=self.label, workers=self.workers, point=self.point.key,
                         prefix_caching=self.prefix_caching, coordinators=self.coordinators,
                         ttft_p50=load.summarize(ok).ttft.p50,
                         token_ids=tuple(t.token_ids for t in self.traces))


class Collected(dict[tuple[str, str], PointSamples]):
    """PointSamples by (engine label, point key), in the order first measured."""

    def at(self, label: str, engine: str, workers: int | None, point: SweepPoint,
           prefix_caching: bool | None = None, coordinators: int = 1) -> PointSamples:
        return self.setdefault((label, point.key), PointSamples(
            label=label, engine=engine, workers=workers, point=point, prefix_caching=prefix_caching,
            coordinators=coordinators))


@dataclass(frozen=True, kw_only=True)
class Server:
    """Where a mixserve engine serves, and (when we started it) the engine itself."""

    label: str
    workers: int | None
    target: str
    metrics_url: str | None
    engine: RayExpertParallelEngine | None = None
    prefix_caching: bool | None = None  # None: an external server's own setting


class BackgroundGateway:
    """A gateway (over a started Ray engine) serving on loopback from a background event-loop thread; label names
    it in the report (default: by its worker count), prefix_caching is the engine's setting, kept with its samples."""

    def __init__(self, engine: RayExpertParallelEngine, label: str | None = None,
                 prefix_caching: bool | None = None) -> None:
        self.engine = engine
        self.label = label
        self.prefix_caching = prefix_caching
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
        workers, coordinators = self.engine.options.num_workers, self.engine.options.num_coordinators
        return Server(label=self.label or ray_label(workers, coordinators), workers=workers,
                      target=f"127.0.0.1:{self.gateway.port}",
                      metrics_url=f"http://127.0.0.1:{self.gateway.metrics_port}/metrics", engine=self.engine,
                      prefix_caching=self.prefix_caching)

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


def measure_server(opts: ServeOptions, cfg: ModelConfig, server: Server, collected: Collected,
                   round_index: int = 0) -> None:
    """Warms the server up with one wave of short requests on prompts of its own (another shared prefix), then
    measures every sweep point once."""
    warm = SweepPoint(concurrency=opts.max_in_flight, request_rate=None, num_prompts=opts.max_in_flight)
    _drive(opts, server, warm, opts.prompts(cfg, warm, round_index, warmup=True), opts.setup.warmup_tokens, False)
    for point in opts.sweep():
        prompts = opts.prompts(cfg, point, round_index)
        before = load.scrape(server.metrics_url) if server.metrics_url else {}
        workers_before = worker_seconds(server.engine)
        load_before = machine.load_average()[0]
        cpu_before = cpu_seconds(server.engine)
        traces, seconds = _drive(opts, server, point, prompts, opts.output_len, opts.setup.progress)
        cpu = machine.delta(cpu_before, cpu_seconds(server.engine))
        expected = sum(t.tokens for t in traces)
        after = load.scrape_settled(server.metrics_url, before, expected) if server.metrics_url else {}
        coordinators = server.engine.options.num_coordinators if server.engine else 1
        collected.at(server.label, RAY, server.workers, point, server.prefix_caching, coordinators).add(
            traces, seconds, server_phases=load.phase_delta(before, after),
            worker_phases=worker_delta(workers_before, worker_seconds(server.engine)),
            loads=(load_before, machine.load_average()[0]), cpu=cpu,
            prefix_tokens=load.prefix_cache_delta(before, after))


def _hf_point(model, cfg: ModelConfig, opts: ServeOptions, point: SweepPoint, collected: Collected,
              round_index: int) -> None:
    """Batches of `concurrency` prompts through generate; each request's trace from the batch's step times."""
    prompts = opts.prompts(cfg, point, round_index)
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


def measure_transformers(opts: ServeOptions, cfg: ModelConfig, collected: Collected, round_index: int = 0) -> None:
    """Concurrency points only: a request-rate sweep has no batched-generate equivalent."""
    sweep = [p for p in opts.sweep() if p.concurrency is not None]
    if not sweep:
        return
    model = load_transformers(opts.setup.model_dir, opts.setup.dtype, opts.setup.device)
    warm = opts.prompts(cfg, sweep[-1], round_index, warmup=True)[: max(p.concurrency or 1 for p in sweep)]
    generate_batch(model, cfg, warm, opts.setup.warmup_tokens)
    for point in sweep:
        _hf_point(model, cfg, opts, point, collected, round_index)
    del model
    gc.collect()


def _one_round(opts: ServeOptions, cfg: ModelConfig, collected: Collected, round_index: int) -> None:
    """transformers, then every engine, each mixserve engine started afresh (its prefix cache empty)."""
    if opts.transformers:
        measure_transformers(opts, cfg, collected, round_index)
    if opts.target is not None:
        server = Server(label=EXTERNAL_LABEL, workers=None, target=opts.target, metrics_url=opts.metrics_url)
        measure_server(opts, cfg, server, collected, round_index)
    sizing = Workload(num_prompts=opts.max_in_flight, input_len=opts.input_len, output_len=opts.output_len,
                      shared_prefix_len=opts.shared_prefix_len)
    for workers, coordinators in opts.ray_engines() if opts.target is None else ():
        for caching in opts.prefix_caching:
            engine = start_ray_engine(cfg, replace(opts.setup, prefix_caching=caching), sizing, workers, coordinators)
            try:
                with BackgroundGateway(engine, opts.engine_label(workers, caching, coordinators), caching) as server:
                    measure_server(opts, cfg, server, collected, round_index)
            finally:
                engine.shutdown()


def run_serve(opts: ServeOptions) -> ServeReport:
    start = machine.run_start()
    cfg = ModelConfig.from_model_dir(opts.setup.model_dir)
    torch.set_num_threads(opts.setup.threads_per_rank)
    collected = Collected()
    num_ranks = max((w + c for w, c in opts.ray_engines()), default=1)
    with ray_session(opts.ray_address, num_ranks) if opts.target is None else nullcontext():
        for round_index in range(opts.setup.rounds):
            _one_round(opts, cfg, collected, round_index)
    points = [s.to_point(opts.output_len) for s in collected.values()]
    reference = EXTERNAL_LABEL if opts.target else (
        opts.engine_label(0, opts.prefix_caching[0]) if 0 in opts.workers else None)
    ratios = [PointRatios(point=key, ratios=r) for key in dict.fromkeys(p.point for p in points)
              for r in compute_ratios([p for p in points if p.point == key], reference_label=reference)]
    return ServeReport(
        mode="serve", meta=machine.run_meta(start), model=ModelSummary.of(opts.setup.model_dir, cfg),
        input_len=opts.input_len, output_len=opts.output_len, reference_label=reference, points=tuple(points),
        settings=opts.setup.summary() | {"prefix_caching": ",".join(map(switch_label, opts.prefix_caching))},
        ratios=tuple(ratios), shared_prefix_len=opts.shared_prefix_len,
        prefix_cache=tuple(prefix_cache.compare([s.cached_run() for s in collected.values()
                                                 if s.prefix_caching is not None])),
    )
