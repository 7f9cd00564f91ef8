"""What a benchmark reports: result records (frozen dataclasses), the ratios between them, JSON out, and
the reports as plain-text or Markdown tables (docs/PERFORMANCE.md pastes them).

Ratios are computed only from numbers measured in the same run: output tok/s against the transformers
baseline, wall time against the reference mixserve engine ("EP overhead"), and the floors over the wall
time (the fraction of the machine's matmul rate, or of its roofline, the engine reached).
"""

from __future__ import annotations

import dataclasses
import json
import math
import statistics
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from cluster.bench.load import LatencyStats, LatencySummary
from cluster.bench.machine import BENCH_PROCESS, COORDINATOR, ComputeFloor, RooflineFloor, RunMeta
from cluster.bench.prefix_cache import TABLE_HEADERS as PREFIX_CACHE_HEADERS
from cluster.bench.prefix_cache import PrefixCacheComparison, table_rows
from cluster.bench.workload import Workload
from cluster.cpu_tuning import threads_after_reserve
from workers.config import ModelConfig
from workers.runtime.timing import PHASES

TRANSFORMERS = "transformers"
IN_PROCESS = "in-process"
RAY = "ray"


@dataclass(frozen=True, kw_only=True)
class ModelSummary:
    path: str
    layers: int
    hidden_size: int
    intermediate_size: int
    experts: int
    top_k: int
    heads: int
    kv_heads: int
    vocab_size: int
    sliding_window: int | None

    @classmethod
    def of(cls, path: Path, cfg: ModelConfig) -> ModelSummary:
        return cls(path=str(path), layers=cfg.num_hidden_layers, hidden_size=cfg.hidden_size,
                   intermediate_size=cfg.intermediate_size, experts=cfg.num_local_experts,
                   top_k=cfg.num_experts_per_tok, heads=cfg.num_attention_heads, kv_heads=cfg.num_key_value_heads,
                   vocab_size=cfg.vocab_size, sliding_window=cfg.sliding_window)


@dataclass(frozen=True, kw_only=True)
class Ratios:
    label: str
    tok_s_vs_transformers: float | None  # output tok/s ÷ the transformers baseline's
    time_vs_reference: float | None  # wall time ÷ the reference mixserve engine's (EP overhead)
    floor_fraction: float | None  # compute-floor seconds ÷ wall time
    roofline_fraction: float | None = None  # roofline-floor seconds ÷ wall time


def compute_ratios(items: list[EngineRun] | list[ServePoint], *, reference_label: str | None,
                   floor_seconds: float | None = None, roofline_seconds: float | None = None) -> list[Ratios]:
    baseline = next((m for m in items if m.engine == TRANSFORMERS), None)
    reference = next((m for m in items if m.label == reference_label), None)
    return [
        Ratios(
            label=m.label,
            tok_s_vs_transformers=m.output_tokens_per_s / baseline.output_tokens_per_s if baseline else None,
            time_vs_reference=m.seconds / reference.seconds if reference else None,
            floor_fraction=floor_seconds / m.seconds if floor_seconds else None,
            roofline_fraction=roofline_seconds / m.seconds if roofline_seconds else None,
        )
        for m in items
    ]


@dataclass(frozen=True, kw_only=True)
class EngineRun:
    """One engine over the whole offline workload; times and phases are per timed run."""

    label: str
    engine: str  # transformers | in-process | ray
    workers: int | None  # Ray expert workers (0: experts in the coordinator actor)
    seconds: float  # median over the timed runs (one per round)
    coordinators: int = 1  # Ray coordinators; with several, steps and phases are summed over them
    run_seconds: tuple[float, ...]
    best_seconds: float  # the fastest run: least disturbed by other processes
    requests: int
    output_tokens: int
    output_tokens_per_s: float
    requests_per_s: float
    steps: int  # engine steps (transformers: generated positions)
    phase_seconds: dict[str, float] = field(default_factory=dict)  # engine StepTimings, summed over steps
    prefill_seconds: float | None = None  # steps holding prompt tokens (transformers: start → first token)
    decode_seconds: float | None = None  # one-token steps (transformers: first token → end)
    unaccounted_seconds: float | None = None  # mean wall time − phases (one coordinator only): scheduling, Ray calls
    worker_phase_seconds: tuple[dict[str, float], ...] = ()  # each expert worker's own timings
    cpu_seconds: dict[str, float] = field(default_factory=dict)  # per run, by process (cluster.bench.runners)
    exact_output_len: bool = True  # every request produced exactly output_len tokens
    agreement_with_transformers: float | None = None  # fraction of requests with the same tokens
    load_1m: tuple[float, float] = (0.0, 0.0)  # 1-minute load average before / after: other processes distort times
    notes: dict[str, str] = field(default_factory=dict)

    @property
    def mean_seconds(self) -> float:
        return sum(self.run_seconds) / len(self.run_seconds)


@dataclass(frozen=True, kw_only=True)
class OfflineReport:
    mode: str
    meta: RunMeta
    model: ModelSummary
    workload: Workload
    settings: dict[str, str]
    compute_floor: ComputeFloor
    roofline_floor: RooflineFloor
    reference_label: str | None  # the mixserve engine "EP overhead" is measured against
    runs: tuple[EngineRun, ...]
    ratios: tuple[Ratios, ...]


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
    # CPU seconds per round by process (cluster.bench.runners): the bench process (gateway + load generator,
    # or transformers), the coordinator, each expert worker
    cpu_seconds: dict[str, float]
    prefix_caching: bool | None = None  # a mixserve engine the bench started: its setting (else None)
    prefix_cache_tokens: dict[str, float] = field(default_factory=dict)  # per round: looked up / reused (/metrics)


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
    shared_prefix_len: int = 0  # tokens every prompt of a (round, point) shares, before its input_len own ones
    prefix_cache: tuple[PrefixCacheComparison, ...] = ()  # caching off against on, per (point, worker count)


def timing_fields(run_seconds: list[float], requests: int, output_tokens: int) -> dict[str, Any]:
    """The common timing fields of a result: median seconds and the rates from it."""
    seconds = statistics.median(run_seconds)
    return dict(seconds=seconds, run_seconds=tuple(run_seconds), best_seconds=min(run_seconds), requests=requests,
                output_tokens=output_tokens, output_tokens_per_s=output_tokens / seconds,
                requests_per_s=requests / seconds)


_JSON_PROPERTIES = ("per_forwarded_token", "best", "output_tokens", "forwarded_tokens")  # derived fields written too


def _jsonable(value: Any) -> Any:
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        out = {f.name: _jsonable(getattr(value, f.name)) for f in dataclasses.fields(value)}
        for name in _JSON_PROPERTIES:
            if isinstance(getattr(type(value), name, None), property):
                out[name] = getattr(value, name)
        return out
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_jsonable(v) for v in value]
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


def write_json(report: Any, path: Path) -> None:
    """Any report dataclass (offline, serve, mixed) as indented JSON; non-finite floats become null."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(_jsonable(report), indent=2, ensure_ascii=False) + "\n")


def fmt(value: float | int | str | bool | None, digits: int = 2) -> str:
    if value is None:
        return "–"
    if isinstance(value, bool):
        return "yes" if value else "NO"
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        return f"{value:.{digits}f}"
    return value


def _ratio(value: float | None) -> str:
    return "–" if value is None else f"{value:.2f}×"


def _percent(value: float | None) -> str:
    return "–" if value is None else f"{100 * value:.0f}%"


def load_range(before_after: tuple[float, float]) -> str:
    return f"{before_after[0]:.1f}→{before_after[1]:.1f}"


def ms_percentiles(stats: LatencyStats) -> str:
    return "–" if stats.p50 is None else f"{1e3 * stats.p50:.0f} / {1e3 * stats.p90:.0f} / {1e3 * stats.p99:.0f}"


def render(headers: list[str], rows: list[list[str]], *, markdown: bool = False, text_columns: int = 1) -> str:
    """The first `text_columns` columns are left-aligned, the rest (numbers) right-aligned; '' without rows."""
    if not rows:
        return ""
    widths = [max(len(h), *(len(r[i]) for r in rows)) for i, h in enumerate(headers)]
    if markdown:
        lines = ["| " + " | ".join(headers) + " |", "|" + "|".join("---" for _ in headers) + "|"]
        return "\n".join(lines + ["| " + " | ".join(row) + " |" for row in rows])

    def line(cells: list[str]) -> str:
        pairs = enumerate(zip(cells, widths, strict=True))
        return "  ".join(c.ljust(w) if i < text_columns else c.rjust(w) for i, (c, w) in pairs)

    return "\n".join([line(headers), line(["-" * w for w in widths])] + [line(r) for r in rows])


CPU_HEADERS = [BENCH_PROCESS, "coordinators", "expert workers", "total", "wall", "busy cores",
               "CPU ms per output token"]
WORKER_HEADERS = ["worker", "dispatch (incl. waiting)", "experts", "combine"]


def cpu_cells(cpu: dict[str, float], wall_s: float, output_tokens: int) -> list[str]:
    """The CPU_HEADERS columns: each process's seconds (the coordinators summed, the workers summed), their
    total, the wall seconds, the cores kept busy (total / wall) and the CPU milliseconds per output token."""
    coordinators = [v for k, v in cpu.items() if k.startswith(COORDINATOR)]
    workers = [v for k, v in cpu.items() if k != BENCH_PROCESS and not k.startswith(COORDINATOR)]
    total = sum(cpu.values())
    return [fmt(cpu.get(BENCH_PROCESS)), fmt(sum(coordinators)) if coordinators else "–",
            fmt(sum(workers)) if workers else "–",
            fmt(total), fmt(wall_s), fmt(total / wall_s) if wall_s else "–",
            fmt(1e3 * total / output_tokens, 3) if output_tokens else "–"]


def _worker_cells(per_worker: tuple[dict[str, float], ...]) -> list[list[str]]:
    return [[str(w), fmt(s.get("dispatch")), fmt(s.get("experts")), fmt(s.get("combine"))]
            for w, s in enumerate(per_worker)]


def machine_line(m: RunMeta) -> str:
    """Date, machine, load and commit; warnings when the machine was busy at the start or the code changed."""
    line = (f"{m.date_utc} · {m.cpu} ({m.logical_cpus} logical CPUs) · load {m.load_average_start[0]:.2f} → "
            f"{m.load_average_end[0]:.2f} · commit {m.git_commit}")
    if m.git_commit != m.git_commit_end:
        line += f"\nWARNING: the code changed during the run ({m.git_commit} → {m.git_commit_end})"
    if m.load_average_start[0] > 0.5 * m.logical_cpus:  # later samples include the benchmark's own processes
        line += (f"\nWARNING: the 1-minute load average was {m.load_average_start[0]:.1f} on {m.logical_cpus} "
                 f"logical CPUs when the run started: other processes may have shared the machine, so timings "
                 f"may be pessimistic and noisy")
    return line


def compiled_note(settings: dict[str, str]) -> str:
    """Marks runs whose in-process experts ran compiled small steps (`--compile`)."""
    return ", small steps compiled" if settings.get("compile_small_steps") == "on" else ""


def join_tables(parts: list[tuple[str, str]]) -> str:
    """Titled tables, the empty ones left out."""
    return "\n\n".join(f"{title}\n\n{table}" if title else table for title, table in parts if table)


def _offline_summary(report: OfflineReport) -> str:
    w, floor, roof, s = report.workload, report.compute_floor, report.roofline_floor, report.settings
    return (
        f"mixserve bench offline · {report.model.path} · {w.num_prompts} prompts × {w.input_len} in / "
        f"{w.output_len} out · {s['dtype']} on {s['device']}, {s['threads_per_rank']} threads{compiled_note(s)} · "
        f"{s['rounds']} round(s), median reported\n{machine_line(report.meta)}\n"
        f"compute floor: {floor.flops / 1e9:.1f} GFLOP / {floor.matmul.best / 1e9:.1f} GFLOP/s "
        f"(best {floor.matmul.size}² {floor.matmul.dtype} matmul of {len(floor.matmul.flops_per_s)}) = "
        f"{floor.floor_seconds:.2f} s\n  {floor.formula}\n"
        f"roofline floor: {roof.floor_seconds:.2f} s = prefill {roof.prefill_seconds:.2f} s + decode "
        f"{roof.decode_seconds:.2f} s ({roof.decode_memory_bound_steps} of {roof.decode_steps} decode steps "
        f"memory-bound, {roof.decode_bytes_per_step / 1e9:.3f} GB a step at {roof.bandwidth.best / 1e9:.1f} GB/s "
        f"copy bandwidth)\n  {roof.formula}"
    )


def format_offline(report: OfflineReport, *, markdown: bool = False) -> str:
    """The headline table (rates and ratios), then where the time went: phases, the expert workers' own
    phases, and each process's CPU seconds."""
    ratios = {r.label: r for r in report.ratios}
    headline = [[run.label, fmt(run.seconds), fmt(run.best_seconds), fmt(run.output_tokens_per_s, 1),
                 fmt(run.requests_per_s, 3), _ratio(ratios[run.label].tok_s_vs_transformers),
                 _ratio(ratios[run.label].time_vs_reference), _percent(ratios[run.label].floor_fraction),
                 _percent(ratios[run.label].roofline_fraction), fmt(run.exact_output_len),
                 _percent(run.agreement_with_transformers), load_range(run.load_1m)] for run in report.runs]
    phases = [[run.label, str(run.steps), fmt(run.prefill_seconds), fmt(run.decode_seconds),
               *(fmt(run.phase_seconds.get(p)) for p in PHASES), fmt(run.unaccounted_seconds), fmt(run.mean_seconds)]
              for run in report.runs]
    workers = [[run.label, *row] for run in report.runs for row in _worker_cells(run.worker_phase_seconds)]
    cpu = [[run.label, *cpu_cells(run.cpu_seconds, run.mean_seconds, run.output_tokens)]
           for run in report.runs if run.cpu_seconds]
    headers = ["engine", "total s (median)", "best s", "out tok/s", "req/s", "vs transformers (tok/s)",
               "time vs reference (EP overhead)", "of compute floor", "of roofline floor", "exact len",
               "same tokens as transformers", "load 1m"]
    return join_tables([
        ("", _offline_summary(report)), ("", f"reference for the EP overhead: {report.reference_label}"),
        ("", render(headers, headline, markdown=markdown)),
        ("seconds per run (means): prefill / decode steps, then the engine's (Ray: coordinator's) phases; with "
         "several coordinators, summed over them (their steps overlap, so no unaccounted time):",
         render(["engine", "steps", "prefill steps", "decode steps", *PHASES, "unaccounted", "mean total"], phases,
                markdown=markdown)),
        ("expert workers' own seconds per run:",
         render(["engine", *WORKER_HEADERS], workers, markdown=markdown, text_columns=2)),
        ("CPU seconds per run (means; process time of the bench process, which runs transformers and the "
         "in-process engine, and of each Ray rank), against the mean wall seconds:",
         render(["engine", *CPU_HEADERS], cpu, markdown=markdown)),
    ])


def threads_summary(settings: dict[str, str]) -> str:
    threads, reserved = int(settings["threads_per_rank"]), int(settings.get("reserved_cpus", "0"))
    if not reserved:
        return f"{threads} threads per rank"
    ranks = threads_after_reserve(threads, reserved)
    return f"{threads} threads (Ray ranks {ranks}: {reserved} CPU reserved for the gateway)"


def _serve_headline(report: ServeReport) -> list[list[str]]:
    ratios = {(r.point, r.ratios.label): r.ratios for r in report.ratios}
    order = {key: i for i, key in enumerate(dict.fromkeys(p.point for p in report.points))}
    rows = []
    for p in sorted(report.points, key=lambda p: order[p.point]):
        r = ratios[(p.point, p.label)]
        rows.append([p.point, p.label, str(p.requests), fmt(p.seconds), fmt(p.output_tokens_per_s, 1),
                     fmt(p.requests_per_s, 3), ms_percentiles(p.latency.ttft), ms_percentiles(p.latency.itl),
                     ms_percentiles(p.latency.e2e),
                     _ratio(r.tok_s_vs_transformers), _ratio(r.time_vs_reference),
                     fmt(p.exact_output_len) if not p.errors else f"{p.errors} errors", load_range(p.load_1m)])
    return rows


def _prefix_token_rows(report: ServeReport) -> list[list[str]]:
    return [[p.point, p.label, *(fmt(p.prefix_cache_tokens.get(k), 0) for k in ("looked up", "reused"))]
            for p in report.points if p.prefix_caching]


def format_serve(report: ServeReport, *, markdown: bool = False) -> str:
    """Throughput, client-side latency percentiles and ratios per sweep point, then the server-side phases
    scraped from /metrics, the expert workers' own phases, and the CPU seconds of each process."""
    s = report.settings
    shared = f"{report.shared_prefix_len} shared + " if report.shared_prefix_len else ""
    head = (f"mixserve bench serve · {report.model.path} · {shared}{report.input_len} in / {report.output_len} out · "
            f"{s['dtype']} on {s['device']}, {threads_summary(s)}{compiled_note(s)} · {s['rounds']} round(s) pooled\n"
            f"{machine_line(report.meta)}")
    phases = [[p.point, p.label, *(fmt(p.server_phase_seconds.get(ph, 0.0)) for ph in PHASES),
               fmt(sum(p.server_phase_seconds.values())), fmt(p.seconds)]
              for p in report.points if p.server_phase_seconds]
    workers = [[p.point, p.label, *row] for p in report.points for row in _worker_cells(p.worker_phase_seconds)]
    cpu = [[p.point, p.label, *cpu_cells(p.cpu_seconds, p.seconds, p.output_tokens)]
           for p in report.points if p.cpu_seconds]
    headers = ["point", "engine", "req", "total s", "out tok/s", "req/s", "TTFT ms p50/p90/p99",
               "ITL ms p50/p90/p99", "E2E ms p50/p90/p99", "vs transformers (tok/s)", "time vs reference",
               "exact len", "load 1m"]
    return join_tables([
        ("", head), ("", f"reference: {report.reference_label}"),
        ("", render(headers, _serve_headline(report), markdown=markdown, text_columns=2)),
        ("prefix caching off against on (same worker count, same prompts; every engine started with an empty cache, "
         "warmed up on other prompts):",
         render(PREFIX_CACHE_HEADERS, table_rows(report.prefix_cache), markdown=markdown, text_columns=2)),
        ("prompt tokens per round looked up in the prefix cache and reused from it (server /metrics):",
         render(["point", "engine", "looked up", "reused"], _prefix_token_rows(report), markdown=markdown,
                text_columns=2)),
        ("server-side phase seconds per point (mixserve_step_phase_seconds_sum, after − before):",
         render(["point", "engine", *PHASES, "phases total", "wall"], phases, markdown=markdown, text_columns=2)),
        ("expert workers' own seconds per point:",
         render(["point", "engine", *WORKER_HEADERS], workers, markdown=markdown, text_columns=2)),
        ("CPU seconds per point and round (process time, after − before; bench process: the load "
         "generator and, unless --target, the gateway; or the transformers baseline):",
         render(["point", "engine", *CPU_HEADERS], cpu, markdown=markdown, text_columns=2)),
    ])
