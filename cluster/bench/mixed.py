"""`mixserve bench mixed`: long prompts arriving while short streams decode, over gRPC, against the same two
groups served apart. For each worker count it starts a Ray engine and a gateway on loopback in this process
(or measures `--target`), warms it up, then serves on that one server, in this order:

  short alone   the short group (short prompts, long outputs), every stream sent at once
  long alone    the long group (long prompts, short outputs), one arrival every `long_interval_s`
  together      the short group at once; once every short stream has its first token (all are decoding),
                after `long_delay_s`, the long group at the same stagger

and reports each group's output tok/s and TTFT / ITL percentiles in each run, the wall seconds, and
`together / (short alone + long alone)`: continuous batching should make it at most 1. Rounds (a fresh
engine each) pool the latencies and average the seconds. Knows nothing of how the engine schedules.
"""

from __future__ import annotations

import asyncio
from contextlib import nullcontext
from dataclasses import dataclass, field, replace

import torch

from cluster.bench import load, machine
from cluster.bench.load import ClientTrace, GroupLoad, LatencySummary
from cluster.bench.machine import RunMeta
from cluster.bench.report import (
    ModelSummary,
    compiled_note,
    fmt,
    join_tables,
    load_range,
    machine_line,
    ms_percentiles,
    render,
    threads_summary,
)
from cluster.bench.runners import start_ray_engine, token_bar
from cluster.bench.serve import EXTERNAL_LABEL, BackgroundGateway, Server
from cluster.bench.workload import EngineSetup, Workload, make_prompts
from cluster.ray_session import ray_session
from workers.config import ModelConfig
from workers.runtime.timing import PHASES

SHORT, LONG = "short", "long"
SHORT_ALONE, LONG_ALONE, TOGETHER = "short alone", "long alone", "together"
Span = tuple[float, float]  # (first request sent, last request done), seconds from the run's origin


@dataclass(frozen=True, kw_only=True)
class MixedOptions:
    setup: EngineSetup
    short: Workload  # streams that decode: sent all at once
    long: Workload  # prompts that arrive while the short streams decode
    long_interval_s: float = 0.25  # between two long arrivals
    long_delay_s: float = 0.0  # together: first long arrival after every short stream has its first token
    workers: tuple[int, ...] = (1,)
    target: str | None = None  # an external server instead of starting one
    metrics_url: str | None = None
    ray_address: str | None = None
    timeout_s: float = 600.0

    def __post_init__(self) -> None:
        if self.long_interval_s < 0 or self.long_delay_s < 0:
            raise ValueError(f"long_interval_s ({self.long_interval_s}) and long_delay_s ({self.long_delay_s}) "
                             f"must be >= 0")
        if self.target is None and not self.workers:
            raise ValueError("give at least one worker count, or a target")

    def loads(self, cfg: ModelConfig) -> dict[str, tuple[GroupLoad, ...]]:
        """Each run's groups, by run name."""
        short = GroupLoad(name=SHORT, prompts=tuple(make_prompts(self.short, cfg.vocab_size)),
                          output_len=self.short.output_len, offsets=(0.0,) * self.short.num_prompts)
        long_prompts = tuple(make_prompts(self.long, cfg.vocab_size))
        long = GroupLoad(name=LONG, prompts=long_prompts, output_len=self.long.output_len,
                         offsets=load.staggered(len(long_prompts), self.long_interval_s))
        arriving = replace(long, offsets=load.staggered(len(long_prompts), self.long_interval_s, self.long_delay_s),
                           after=SHORT)
        return {SHORT_ALONE: (short,), LONG_ALONE: (long,), TOGETHER: (short, arriving)}

    def warmup(self, cfg: ModelConfig) -> tuple[GroupLoad, ...]:
        """Both groups at once, a few tokens each: every prompt length is seen before a timed run."""
        tokens = self.setup.warmup_tokens
        return tuple(replace(g, output_len=tokens, offsets=(0.0,) * len(g.prompts), after=None)
                     for g in self.loads(cfg)[TOGETHER])


@dataclass(frozen=True, kw_only=True)
class GroupResult:
    """One group in one run: counts and seconds per round (means); rates and latencies pool the rounds."""

    group: str  # short | long
    requests: int
    output_tokens: int
    seconds: float  # first request sent → last request done
    output_tokens_per_s: float
    latency: LatencySummary
    exact_output_len: bool  # every request produced exactly its group's output_len tokens
    errors: int
    spans: tuple[Span, ...]  # per round; apart runs share the short-alone run's origin


@dataclass(frozen=True, kw_only=True)
class RunResult:
    run: str  # short alone | long alone | together
    seconds: float  # mean wall seconds over rounds: the first send → the last request's end
    run_seconds: tuple[float, ...]
    output_tokens_per_s: float  # both groups' tokens over the wall seconds
    groups: tuple[GroupResult, ...]
    server_phase_seconds: dict[str, float]  # from /metrics, after − before, per round
    short_decoding_at_long_arrival: tuple[int, ...] = ()  # together: short streams mid-decode as each long one is sent


@dataclass(frozen=True, kw_only=True)
class MixedResult:
    label: str
    workers: int | None
    runs: tuple[RunResult, ...]  # short alone, long alone, together
    apart_seconds: float  # short alone + long alone
    together_seconds: float
    together_vs_apart: float  # together / (short alone + long alone): ≤ 1 when mixing costs nothing extra
    apart_overlap_seconds: float  # mean time both groups had requests in flight, apart (0: served one after the other)
    together_overlap_seconds: float
    load_1m: tuple[float, float]


@dataclass(frozen=True, kw_only=True)
class MixedReport:
    mode: str
    meta: RunMeta
    model: ModelSummary
    short: Workload
    long: Workload
    long_interval_s: float
    long_delay_s: float
    settings: dict[str, str]
    results: tuple[MixedResult, ...]


def overlap(a: Span, b: Span) -> float:
    return max(0.0, min(a[1], b[1]) - max(a[0], b[0]))


def mean_overlap(a: tuple[Span, ...], b: tuple[Span, ...]) -> float:
    """Mean over rounds of the time both groups had requests in flight."""
    return sum(overlap(x, y) for x, y in zip(a, b, strict=True)) / len(a)


def span(traces: list[ClientTrace], origin: float) -> Span:
    return min(t.sent for t in traces) - origin, max(t.done for t in traces) - origin


def decoding_at(short: list[ClientTrace], sent: float) -> int:
    """Short streams that had their first token and had not ended when a request was sent at `sent`."""
    return sum(1 for t in short if t.chunk_times and t.chunk_times[0] <= sent < t.done)


@dataclass
class RunSamples:
    """One run of one server, pooled over rounds."""

    run: str
    traces: dict[str, list[ClientTrace]] = field(default_factory=dict)
    spans: dict[str, list[Span]] = field(default_factory=dict)
    seconds: list[float] = field(default_factory=list)
    phases: dict[str, float] = field(default_factory=dict)
    decoding: list[int] = field(default_factory=list)

    def add(self, traces: dict[str, list[ClientTrace]], origin: float, seconds: float,
            phases: dict[str, float]) -> None:
        for name, group in traces.items():
            self.traces.setdefault(name, []).extend(group)
            self.spans.setdefault(name, []).append(span(group, origin))
        self.seconds.append(seconds)
        machine.add_into(self.phases, phases)
        if LONG in traces and SHORT in traces:
            self.decoding += [decoding_at(traces[SHORT], t.sent) for t in traces[LONG]]

    def group(self, name: str, output_len: int) -> GroupResult:
        traces, spans, n = self.traces[name], self.spans[name], len(self.seconds)
        ok = [t for t in traces if t.error is None]
        tokens = sum(t.tokens for t in ok)
        busy = sum(end - start for start, end in spans)
        return GroupResult(
            group=name, requests=len(ok) // n, output_tokens=tokens // n, seconds=busy / n,
            output_tokens_per_s=tokens / busy, latency=load.summarize(traces),
            exact_output_len=len(ok) == len(traces) and all(t.tokens == output_len for t in ok),
            errors=len(traces) - len(ok), spans=tuple(spans))

    def result(self, output_lens: dict[str, int]) -> RunResult:
        n = len(self.seconds)
        tokens = sum(t.tokens for group in self.traces.values() for t in group if t.error is None)
        return RunResult(
            run=self.run, seconds=sum(self.seconds) / n, run_seconds=tuple(self.seconds),
            output_tokens_per_s=tokens / sum(self.seconds),
            groups=tuple(self.group(name, output_lens[name]) for name in self.traces),
            server_phase_seconds={k: v / n for k, v in self.phases.items()},
            short_decoding_at_long_arrival=tuple(self.decoding))


@dataclass
class ServerSamples:
    label: str
    workers: int | None
    runs: dict[str, RunSamples] = field(default_factory=dict)
    loads: list[float] = field(default_factory=list)

    def result(self, output_lens: dict[str, int]) -> MixedResult:
        runs = {name: samples.result(output_lens) for name, samples in self.runs.items()}
        apart = runs[SHORT_ALONE].seconds + runs[LONG_ALONE].seconds
        together = runs[TOGETHER].seconds
        short_apart, long_apart = runs[SHORT_ALONE].groups[0].spans, runs[LONG_ALONE].groups[0].spans
        short_with, long_with = (g.spans for g in runs[TOGETHER].groups)
        return MixedResult(
            label=self.label, workers=self.workers, runs=tuple(runs.values()), apart_seconds=apart,
            together_seconds=together, together_vs_apart=together / apart,
            apart_overlap_seconds=mean_overlap(short_apart, long_apart),
            together_overlap_seconds=mean_overlap(short_with, long_with), load_1m=(min(self.loads), max(self.loads)))


def _drive(opts: MixedOptions, server: Server, groups: tuple[GroupLoad, ...], desc: str,
           progress: bool) -> tuple[dict[str, list[ClientTrace]], float, float]:
    total = sum(len(g.prompts) * g.output_len for g in groups)
    with token_bar(total, f"{server.label} {desc}", enabled=progress) as bar:
        return asyncio.run(load.grouped_load(server.target, groups, bar.update, opts.timeout_s))


def measure_server(opts: MixedOptions, cfg: ModelConfig, server: Server, samples: ServerSamples) -> None:
    """Warms the server up, then short alone, long alone (the apart runs share an origin) and together."""
    _drive(opts, server, opts.warmup(cfg), "warm-up", False)
    apart_origin: float | None = None
    samples.loads.append(machine.load_average()[0])
    for run, groups in opts.loads(cfg).items():
        before = load.scrape(server.metrics_url) if server.metrics_url else {}
        traces, start, seconds = _drive(opts, server, groups, run, opts.setup.progress)
        expected = sum(t.tokens for group in traces.values() for t in group)
        after = load.scrape_settled(server.metrics_url, before, expected) if server.metrics_url else {}
        if run != TOGETHER and apart_origin is None:
            apart_origin = start
        origin = start if run == TOGETHER else apart_origin
        samples.runs.setdefault(run, RunSamples(run)).add(traces, origin, seconds, load.phase_delta(before, after))
    samples.loads.append(machine.load_average()[0])


def run_mixed(opts: MixedOptions) -> MixedReport:
    start = machine.run_start()
    cfg = ModelConfig.from_model_dir(opts.setup.model_dir)
    torch.set_num_threads(opts.setup.threads_per_rank)
    collected: dict[str, ServerSamples] = {}
    longest = max(opts.short.input_len, opts.long.input_len)
    sizing = Workload(num_prompts=opts.short.num_prompts + opts.long.num_prompts, input_len=longest,
                      output_len=max(opts.short.output_len, opts.long.output_len))
    workers = () if opts.target is not None else opts.workers
    with ray_session(opts.ray_address, max(workers) + 1) if workers else nullcontext():  # + the coordinator
        for _ in range(opts.setup.rounds):
            if opts.target is not None:
                server = Server(label=EXTERNAL_LABEL, workers=None, target=opts.target, metrics_url=opts.metrics_url)
                measure_server(opts, cfg, server, collected.setdefault(server.label, ServerSamples(server.label, None)))
            for w in workers:
                engine = start_ray_engine(cfg, opts.setup, sizing, w)
                try:
                    with BackgroundGateway(engine) as server:
                        measure_server(opts, cfg, server, collected.setdefault(server.label,
                                                                               ServerSamples(server.label, w)))
                finally:
                    engine.shutdown()
    output_lens = {SHORT: opts.short.output_len, LONG: opts.long.output_len}
    return MixedReport(
        mode="mixed", meta=machine.run_meta(start), model=ModelSummary.of(opts.setup.model_dir, cfg),
        short=opts.short, long=opts.long, long_interval_s=opts.long_interval_s, long_delay_s=opts.long_delay_s,
        settings=opts.setup.summary(), results=tuple(s.result(output_lens) for s in collected.values()))


def format_mixed(report: MixedReport, *, markdown: bool = False) -> str:
    """The mixed-versus-apart headline, each group's rates and latencies per run, then server phases."""
    s, short, long = report.settings, report.short, report.long
    head = (f"mixserve bench mixed · {report.model.path} · short: {short.num_prompts} streams × {short.input_len} "
            f"in / {short.output_len} out, all at once · long: {long.num_prompts} prompts × {long.input_len} in / "
            f"{long.output_len} out, one every {1e3 * report.long_interval_s:.0f} ms (together: from "
            f"{1e3 * report.long_delay_s:.0f} ms after every short stream's first token) · {s['dtype']} on "
            f"{s['device']}, {threads_summary(s)}{compiled_note(s)} · max {s['max_batched_tokens']} tokens a step · "
            f"{s['rounds']} round(s)\n{machine_line(report.meta)}")
    headline, groups, phases, arrivals = [], [], [], []
    for r in report.results:
        runs = {run.run: run for run in r.runs}
        headline.append([r.label, fmt(runs[SHORT_ALONE].seconds), fmt(runs[LONG_ALONE].seconds), fmt(r.apart_seconds),
                         fmt(r.together_seconds), f"{r.together_vs_apart:.2f}×", fmt(r.apart_overlap_seconds),
                         fmt(r.together_overlap_seconds), load_range(r.load_1m)])
        for run in r.runs:
            groups += [[r.label, run.run, g.group, str(g.requests), fmt(g.seconds), fmt(g.output_tokens_per_s, 1),
                        ms_percentiles(g.latency.ttft), ms_percentiles(g.latency.itl), ms_percentiles(g.latency.e2e),
                        fmt(g.exact_output_len) if not g.errors else f"{g.errors} errors"] for g in run.groups]
            if run.server_phase_seconds:
                phases.append([r.label, run.run, *(fmt(run.server_phase_seconds.get(p, 0.0)) for p in PHASES),
                               fmt(sum(run.server_phase_seconds.values())), fmt(run.seconds)])
            if run.short_decoding_at_long_arrival:
                arrivals.append([r.label, ", ".join(map(str, run.short_decoding_at_long_arrival))])
    headers = ["engine", "short alone s", "long alone s", "apart s (sum)", "together s", "together / apart",
               "overlap apart s", "overlap together s", "load 1m"]
    return join_tables([
        ("", head),
        ("", render(headers, headline, markdown=markdown)),
        ("each group in each run (seconds: its first send → its last end; tok/s over those seconds):",
         render(["engine", "run", "group", "req", "s", "out tok/s", "TTFT ms p50/p90/p99", "ITL ms p50/p90/p99",
                 "E2E ms p50/p90/p99", "exact len"], groups, markdown=markdown, text_columns=3)),
        ("short streams decoding as each long prompt was sent (together):",
         render(["engine", "per long arrival"], arrivals, markdown=markdown)),
        ("server-side phase seconds per run (mixserve_step_phase_seconds_sum, after − before):",
         render(["engine", "run", *PHASES, "phases total", "wall"], phases, markdown=markdown, text_columns=2)),
    ])
