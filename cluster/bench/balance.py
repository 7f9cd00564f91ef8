"""`mixserve bench balance`: what the expert balancer buys and what a move costs, on the served path. Starts a
Ray engine with redundant experts and a gateway on loopback in this process and drives three phases of the same
closed-loop gRPC load (greedy, exactly output_len tokens each):

- before: the start placement (contiguous, or `--routing-profile`);
- move: the same load again, and once a quarter of its tokens have streamed the balancer runs once on the rows
  routed in `before` (cluster.gateway.balancer.ExpertBalancer.balance_once, which moves the copies while serving);
- after: the same load on the new placement.

Per phase: the busiest expert worker's share of the rows (the workers' own counts), each layer's busiest/mean
rows, the busiest worker's expert seconds, tokens/s, TTFT and ITL; for the move: copies moved, the seconds the
workers read their experts beside serving and the switch, the longest token gap that spanned the move, and
whether every stream of every phase finished with the same tokens (greedy: the placement must not change them).
"""

from __future__ import annotations

import asyncio
import itertools
import threading
import time
from dataclasses import dataclass

import torch

from cluster.bench import load, machine
from cluster.bench.load import ClientTrace, LatencySummary
from cluster.bench.machine import RunMeta
from cluster.bench.report import ModelSummary, fmt, join_tables, machine_line, render
from cluster.bench.serve import BackgroundGateway
from cluster.bench.workload import EngineSetup, Workload, engine_settings, make_prompts, scheduler_config
from cluster.cpu_tuning import CpuPolicy
from cluster.expert_balance import RoutingProfile
from cluster.gateway.balancer import BalancerSettings, ExpertBalancer
from cluster.ray_engine import ClusterOptions, MoveReport, RayExpertParallelEngine
from cluster.ray_session import ray_session
from workers.config import ModelConfig


@dataclass(frozen=True, kw_only=True)
class BalanceOptions:
    setup: EngineSetup
    workload: Workload  # one phase's requests
    concurrency: int
    workers: int = 2
    coordinators: int = 1
    redundant_experts: int = 2
    threshold: float = 0.05
    routing_profile: RoutingProfile | None = None
    move_after_share: float = 0.25  # the move starts once this share of the move phase's tokens has streamed
    ray_address: str | None = None


@dataclass(frozen=True)
class PhaseResult:
    name: str
    placement: tuple[tuple[int, ...], ...]  # [worker] the experts it held
    seconds: float
    output_tokens_per_s: float
    latency: LatencySummary
    rows_per_worker: tuple[int, ...]  # rows the workers' experts ran in the phase
    busiest_share: float  # the busiest worker's share of all rows
    layer_imbalance: tuple[float, ...]  # per layer: busiest worker's rows / mean worker's
    expert_seconds: tuple[float, ...]  # per worker: seconds computing experts in the phase
    failed: int  # streams that ended with an error


@dataclass(frozen=True)
class MoveResult:
    moved_copies: int
    stage_s: float  # the workers read their new experts beside serving (slowest worker)
    switch_s: float  # the coordinators staged the placement until every rank ran it
    read_s: tuple[float, ...]  # per worker
    predicted_before: float
    predicted_after: float
    longest_gap_during_s: float  # the longest gap between two chunks of one stream that overlapped the move
    itl_p99_before_s: float | None


@dataclass(frozen=True)
class BalanceReport:
    mode: str
    meta: RunMeta
    model: ModelSummary
    workload: Workload
    concurrency: int
    workers: int
    coordinators: int
    redundant_experts: int
    settings: dict[str, str]
    phases: tuple[PhaseResult, ...]
    move: MoveResult | None  # None: the balancer found nothing worth moving
    same_tokens: bool  # every phase's streams produced the before phase's tokens


def _worker_rows(engine: RayExpertParallelEngine) -> list[list[list[int]]]:
    return [r["rows_per_expert"] for r in engine.worker_readings()]


def _worker_expert_seconds(engine: RayExpertParallelEngine) -> list[float]:
    return [r["seconds"].get("experts", 0.0) for r in engine.worker_readings()]


def _phase(name: str, engine: RayExpertParallelEngine, server_target: str, prompts, opts: BalanceOptions,
           during=None) -> tuple[PhaseResult, list[ClientTrace]]:
    """One closed-loop pass over the prompts; `during(streamed_tokens)` is called with each token count."""
    placement = tuple(engine.placement.experts_of_worker(w) for w in range(engine.placement.num_workers))
    rows_before, seconds_before = _worker_rows(engine), _worker_expert_seconds(engine)
    streamed = [0]

    def on_tokens(count: int) -> None:
        streamed[0] += count
        if during is not None:
            during(streamed[0])

    traces, seconds = asyncio.run(load.closed_loop(server_target, prompts, opts.workload.output_len,
                                                   opts.concurrency, on_tokens, opts.setup.timeout_s))
    rows_after, seconds_after = _worker_rows(engine), _worker_expert_seconds(engine)
    # [worker][layer]: rows the phase added (every worker's counts only grow while the group lives)
    added_WL = [[sum(a) - sum(b) for a, b in zip(after, before, strict=True)]
                for after, before in zip(rows_after, rows_before, strict=True)]
    per_worker = tuple(sum(layers) for layers in added_WL)
    layers = len(added_WL[0])
    imbalance = []
    for layer in range(layers):
        rows = [w[layer] for w in added_WL]
        imbalance.append(max(rows) * len(rows) / sum(rows) if sum(rows) else 1.0)
    ok = [t for t in traces if t.error is None]
    return PhaseResult(
        name=name, placement=placement, seconds=seconds,
        output_tokens_per_s=sum(t.tokens for t in ok) / seconds, latency=load.summarize(traces),
        rows_per_worker=per_worker, busiest_share=max(per_worker) / max(sum(per_worker), 1),
        layer_imbalance=tuple(imbalance),
        expert_seconds=tuple(a - b for a, b in zip(seconds_after, seconds_before, strict=True)),
        failed=len(traces) - len(ok),
    ), traces


def _longest_gap_over(traces: list[ClientTrace], start: float, end: float) -> float:
    """The longest gap between consecutive chunks (or send and first chunk) of one stream that overlaps
    [start, end]."""
    longest = 0.0
    for trace in traces:
        times = (trace.sent, *trace.chunk_times)
        for prev, now in itertools.pairwise(times):
            if now >= start and prev <= end:
                longest = max(longest, now - prev)
    return longest


def run_balance(opts: BalanceOptions) -> BalanceReport:
    begun = machine.run_start()
    cfg = ModelConfig.from_model_dir(opts.setup.model_dir)
    torch.set_num_threads(opts.setup.threads_per_rank)
    prompts = make_prompts(opts.workload, cfg.vocab_size)
    warmup = make_prompts(Workload(num_prompts=opts.concurrency, input_len=opts.workload.input_len,
                                   output_len=opts.setup.warmup_tokens, seed=opts.workload.seed + 1), cfg.vocab_size)
    options = ClusterOptions(
        num_workers=opts.workers, num_coordinators=opts.coordinators, redundant_experts=opts.redundant_experts,
        routing_profile=opts.routing_profile,
        cpu=CpuPolicy(threads_per_rank=opts.setup.threads_per_rank, reserved_cpus=opts.setup.reserved_cpus))
    settings = engine_settings(cfg, opts.setup, opts.workload, opts.workers)
    move: MoveResult | None = None
    with ray_session(opts.ray_address, opts.workers + opts.coordinators):
        engine = RayExpertParallelEngine(settings, options, scheduler_config(opts.setup))
        engine.start()
        try:
            background = BackgroundGateway(engine)
            with background as server:
                asyncio.run(load.closed_loop(server.target, warmup, opts.setup.warmup_tokens, opts.concurrency,
                                             lambda _: None, opts.setup.timeout_s))
                metrics = background.gateway.metrics
                balancer = ExpertBalancer(engine, metrics, BalancerSettings(
                    interval_s=0.0, window_s=1e9, threshold=opts.threshold))
                balancer.window.add(time.monotonic(), metrics.routed_rows_LE())
                before, before_traces = _phase("before", engine, server.target, prompts, opts)
                balancer.window.add(time.monotonic(), metrics.routed_rows_LE())  # the window: the before phase
                moving = _MoveOnce(balancer, opts.workload.num_prompts * opts.workload.output_len
                                   * opts.move_after_share)
                during, during_traces = _phase("move", engine, server.target, prompts, opts, during=moving.maybe_start)
                moving.join()
                after, after_traces = _phase("after", engine, server.target, prompts, opts)
                report = moving.report
                if report is not None:
                    assert moving.proposal is not None and moving.window is not None
                    move = MoveResult(
                        moved_copies=report.moved_copies, stage_s=report.stage_s, switch_s=report.switch_s,
                        read_s=report.read_s, predicted_before=moving.proposal.cost_before,
                        predicted_after=moving.proposal.cost_after,
                        longest_gap_during_s=_longest_gap_over(during_traces, *moving.window),
                        itl_p99_before_s=before.latency.itl.p99)
        finally:
            engine.shutdown()
    reference = [t.token_ids for t in before_traces]
    same = all([t.token_ids for t in traces] == reference for traces in (during_traces, after_traces))
    return BalanceReport(
        mode="balance", meta=machine.run_meta(begun), model=ModelSummary.of(opts.setup.model_dir, cfg),
        workload=opts.workload, concurrency=opts.concurrency, workers=opts.workers, coordinators=opts.coordinators,
        redundant_experts=opts.redundant_experts, settings=opts.setup.summary(), phases=(before, during, after),
        move=move, same_tokens=same)


class _MoveOnce:
    """Runs the balancer once, on its own thread, when the streamed tokens first reach `after_tokens`."""

    def __init__(self, balancer: ExpertBalancer, after_tokens: float) -> None:
        self.balancer = balancer
        self.after_tokens = after_tokens
        self.thread: threading.Thread | None = None
        self.report: MoveReport | None = None
        self.proposal = None
        self.window: tuple[float, float] | None = None  # perf_counter at the move's start and end

    def maybe_start(self, streamed: int) -> None:
        if self.thread is None and streamed >= self.after_tokens:
            self.thread = threading.Thread(target=self._run, name="balancer move")
            self.thread.start()

    def _run(self) -> None:
        started = time.perf_counter()
        self.proposal = asyncio.run(self.balancer.balance_once())
        self.window = (started, time.perf_counter())
        self.report = self.balancer.moves[-1] if self.proposal is not None else None

    def join(self) -> None:
        if self.thread is not None:
            self.thread.join()


def _ms(seconds: float | None, digits: int = 1) -> str:
    return fmt(None if seconds is None else seconds * 1e3, digits)


def _placement_text(placement: tuple[tuple[int, ...], ...]) -> str:
    return " | ".join(",".join(map(str, experts)) for experts in placement)


def format_balance(report: BalanceReport, *, markdown: bool = False) -> str:
    w = report.workload
    head = (f"mixserve bench balance · {report.model.path} · {report.coordinators} coordinator(s), {report.workers} "
            f"expert workers, {report.redundant_experts} redundant experts · {w.num_prompts} greedy streams × "
            f"{w.input_len} in / {w.output_len} out, concurrency {report.concurrency} · {report.settings['dtype']} on "
            f"{report.settings['device']}\n{machine_line(report.meta)}")
    rows = [[p.name, _placement_text(p.placement), fmt(p.busiest_share), fmt(max(p.layer_imbalance)),
             " / ".join(fmt(s) for s in p.expert_seconds), fmt(p.output_tokens_per_s, 1),
             _ms(p.latency.ttft.p50, 0), _ms(p.latency.itl.p50), _ms(p.latency.itl.p99),
             str(p.failed)] for p in report.phases]
    headers = ["phase", "experts per worker", "busiest share", "max layer busiest/mean", "expert s per worker",
               "out tok/s", "TTFT p50 ms", "ITL p50 ms", "ITL p99 ms", "failed"]
    parts = [("", head), ("phases (the same prompts each):", render(headers, rows, markdown=markdown,
                                                                    text_columns=2))]
    m = report.move
    if m is None:
        parts.append(("", "the balancer planned no move (predicted gain under the threshold)"))
    else:
        before, after = report.phases[0], report.phases[2]
        move_rows = [[str(m.moved_copies), fmt(m.stage_s, 3), " / ".join(fmt(s, 3) for s in m.read_s),
                      fmt(m.switch_s, 3), _ms(m.longest_gap_during_s, 0), _ms(m.itl_p99_before_s, 0),
                      f"{fmt(m.predicted_before)} -> {fmt(m.predicted_after)}",
                      fmt(after.output_tokens_per_s / before.output_tokens_per_s)]]
        move_headers = ["copies moved", "stage s", "read s per worker", "switch s", "longest gap over move ms",
                        "ITL p99 before ms", "predicted imbalance", "tok/s after / before"]
        parts.append(("the move (stage: read beside serving; switch: one header exchange):",
                      render(move_headers, move_rows, markdown=markdown)))
    parts.append(("", f"greedy tokens identical in every phase: {fmt(report.same_tokens)}"))
    return join_tables(parts)
