"""The serve report as text: throughput, client-side latency percentiles and ratios per sweep point,
then the server-side phase breakdown scraped from /metrics, the expert workers' own phases, and the CPU
seconds of each process."""

from __future__ import annotations

from cluster.bench.cpu_time import CPU_HEADERS, cpu_cells
from cluster.bench.latency import LatencyStats
from cluster.bench.meta import compiled_note, load_warning
from cluster.bench.serve_types import ServeReport
from cluster.bench.table import fmt, load, ratio, render
from cluster.settings import threads_after_reserve
from workers.runtime.timing import PHASES


def _ms(stats: LatencyStats) -> str:
    if stats.p50 is None:
        return "–"
    return f"{1e3 * stats.p50:.0f} / {1e3 * stats.p90:.0f} / {1e3 * stats.p99:.0f}"


def headline(report: ServeReport, *, markdown: bool = False) -> str:
    ratios = {(r.point, r.ratios.label): r.ratios for r in report.ratios}
    headers = ["point", "engine", "req", "total s", "out tok/s", "req/s", "TTFT ms p50/p90/p99",
               "ITL ms p50/p90/p99", "E2E ms p50/p90/p99", "vs transformers (tok/s)", "time vs reference",
               "exact len", "load 1m"]
    order = {key: i for i, key in enumerate(dict.fromkeys(p.point for p in report.points))}
    rows = []
    for p in sorted(report.points, key=lambda p: order[p.point]):
        r = ratios[(p.point, p.label)]
        rows.append([p.point, p.label, str(p.requests), fmt(p.seconds), fmt(p.output_tokens_per_s, 1),
                     fmt(p.requests_per_s, 3), _ms(p.latency.ttft), _ms(p.latency.itl), _ms(p.latency.e2e),
                     ratio(r.tok_s_vs_transformers), ratio(r.time_vs_reference),
                     fmt(p.exact_output_len) if not p.errors else f"{p.errors} errors", load(p.load_1m)])
    return render(headers, rows, markdown=markdown, text_columns=2)


def phases(report: ServeReport, *, markdown: bool = False) -> str:
    headers = ["point", "engine", *PHASES, "phases total", "wall"]
    rows = [
        [p.point, p.label, *(fmt(p.server_phase_seconds.get(ph, 0.0)) for ph in PHASES),
         fmt(sum(p.server_phase_seconds.values())), fmt(p.seconds)]
        for p in report.points if p.server_phase_seconds
    ]
    return render(headers, rows, markdown=markdown, text_columns=2) if rows else ""


def worker_phases(report: ServeReport, *, markdown: bool = False) -> str:
    headers = ["point", "engine", "worker", "dispatch (incl. waiting)", "experts", "combine"]
    rows = [
        [p.point, p.label, str(w), fmt(s.get("dispatch")), fmt(s.get("experts")), fmt(s.get("combine"))]
        for p in report.points for w, s in enumerate(p.worker_phase_seconds)
    ]
    return render(headers, rows, markdown=markdown, text_columns=2) if rows else ""


def cpu(report: ServeReport, *, markdown: bool = False) -> str:
    headers = ["point", "engine", *CPU_HEADERS]
    rows = [[p.point, p.label, *cpu_cells(p.cpu_seconds, p.seconds, p.output_tokens)]
            for p in report.points if p.cpu_seconds]
    return render(headers, rows, markdown=markdown, text_columns=2) if rows else ""


def _threads(settings: dict[str, str]) -> str:
    threads, reserved = int(settings["threads_per_rank"]), int(settings.get("reserved_cpus", "0"))
    if not reserved:
        return f"{threads} threads per rank"
    ranks = threads_after_reserve(threads, reserved)
    return f"{threads} threads (Ray ranks {ranks}: {reserved} CPU reserved for the gateway)"


def format_serve(report: ServeReport, *, markdown: bool = False) -> str:
    m, s = report.meta, report.settings
    head = (f"mixserve bench serve · {report.model.path} · {report.input_len} in / {report.output_len} out · "
            f"{s['dtype']} on {s['device']}, {_threads(s)}{compiled_note(s)} · {s['rounds']} round(s) pooled\n"
            f"{m.date_utc} · {m.cpu} ({m.logical_cpus} logical CPUs) · load {m.load_average_start[0]:.2f} → "
            f"{m.load_average_end[0]:.2f} · commit {m.git_commit}{load_warning(m)}")
    parts = [head, f"reference: {report.reference_label}", headline(report, markdown=markdown)]
    server = phases(report, markdown=markdown)
    if server:
        parts += ["server-side phase seconds per point (mixserve_step_phase_seconds_sum, after − before):", server]
    workers = worker_phases(report, markdown=markdown)
    if workers:
        parts += ["expert workers' own seconds per point:", workers]
    used = cpu(report, markdown=markdown)
    if used:
        parts += ["CPU seconds per point and round (process time, after − before; bench process: the load "
                  "generator and, unless --target, the gateway; or the transformers baseline):", used]
    return "\n\n".join(parts)


