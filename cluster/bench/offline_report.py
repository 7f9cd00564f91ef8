"""The offline report as text: the headline table (rates and ratios), then where the time went: phases,
the expert workers' own phases, and each process's CPU seconds."""

from __future__ import annotations

from cluster.bench.cpu_time import CPU_HEADERS, cpu_cells
from cluster.bench.meta import compiled_note, load_warning
from cluster.bench.offline import OfflineReport
from cluster.bench.table import fmt, load, percent, ratio, render
from workers.runtime.timing import PHASES


def headline(report: OfflineReport, *, markdown: bool = False) -> str:
    ratios = {r.label: r for r in report.ratios}
    headers = ["engine", "total s (median)", "best s", "out tok/s", "req/s", "vs transformers (tok/s)",
               "time vs reference (EP overhead)", "of compute floor", "of roofline floor", "exact len",
               "same tokens as transformers", "load 1m"]
    rows = []
    for run in report.runs:
        r = ratios[run.label]
        rows.append([run.label, fmt(run.seconds), fmt(run.best_seconds), fmt(run.output_tokens_per_s, 1),
                     fmt(run.requests_per_s, 3),
                     ratio(r.tok_s_vs_transformers), ratio(r.time_vs_reference), percent(r.floor_fraction),
                     percent(r.roofline_fraction),
                     fmt(run.exact_output_len), percent(run.agreement_with_transformers), load(run.load_1m)])
    return render(headers, rows, markdown=markdown)


def phases(report: OfflineReport, *, markdown: bool = False) -> str:
    headers = ["engine", "steps", "prefill steps", "decode steps", *PHASES, "unaccounted", "mean total"]
    rows = [
        [run.label, str(run.steps), fmt(run.prefill_seconds), fmt(run.decode_seconds),
         *(fmt(run.phase_seconds.get(p)) for p in PHASES), fmt(run.unaccounted_seconds),
         fmt(sum(run.run_seconds) / len(run.run_seconds))]
        for run in report.runs
    ]
    return render(headers, rows, markdown=markdown)


def worker_phases(report: OfflineReport, *, markdown: bool = False) -> str:
    headers = ["engine", "worker", "dispatch (incl. waiting)", "experts", "combine"]
    rows = [
        [run.label, str(w), fmt(s.get("dispatch")), fmt(s.get("experts")), fmt(s.get("combine"))]
        for run in report.runs for w, s in enumerate(run.worker_phase_seconds)
    ]
    return render(headers, rows, markdown=markdown, text_columns=2) if rows else ""


def cpu(report: OfflineReport, *, markdown: bool = False) -> str:
    headers = ["engine", *CPU_HEADERS]
    rows = [[run.label, *cpu_cells(run.cpu_seconds, sum(run.run_seconds) / len(run.run_seconds), run.output_tokens)]
            for run in report.runs if run.cpu_seconds]
    return render(headers, rows, markdown=markdown) if rows else ""


def summary(report: OfflineReport) -> str:
    w, m, floor, roof = report.workload, report.meta, report.compute_floor, report.roofline_floor
    s = report.settings
    return (
        f"mixserve bench offline · {report.model.path} · {w.num_prompts} prompts × {w.input_len} in / "
        f"{w.output_len} out · {s['dtype']} on {s['device']}, {s['threads_per_rank']} threads{compiled_note(s)} · "
        f"{s['rounds']} round(s), median reported\n"
        f"{m.date_utc} · {m.cpu} ({m.logical_cpus} logical CPUs) · load {m.load_average_start[0]:.2f} → "
        f"{m.load_average_end[0]:.2f} · commit {m.git_commit}{load_warning(m)}\n"
        f"compute floor: {floor.flops / 1e9:.1f} GFLOP / {floor.matmul.best / 1e9:.1f} GFLOP/s "
        f"(best {floor.matmul.size}² {floor.matmul.dtype} matmul of {len(floor.matmul.flops_per_s)}) = "
        f"{floor.floor_seconds:.2f} s\n  {floor.formula}\n"
        f"roofline floor: {roof.floor_seconds:.2f} s = prefill {roof.prefill_seconds:.2f} s + decode "
        f"{roof.decode_seconds:.2f} s ({roof.decode_memory_bound_steps} of {roof.decode_steps} decode steps "
        f"memory-bound, {roof.decode_bytes_per_step / 1e9:.3f} GB a step at {roof.bandwidth.best / 1e9:.1f} GB/s "
        f"copy bandwidth)\n"
        f"  {roof.formula}"
    )


def format_offline(report: OfflineReport, *, markdown: bool = False) -> str:
    parts = [summary(report), f"reference for the EP overhead: {report.reference_label}",
             headline(report, markdown=markdown),
             "seconds per run (means): prefill / decode steps, then the engine's (Ray: coordinator's) phases:",
             phases(report, markdown=markdown)]
    workers = worker_phases(report, markdown=markdown)
    if workers:
        parts += ["expert workers' own seconds per run:", workers]
    used = cpu(report, markdown=markdown)
    if used:
        parts += ["CPU seconds per run (means; process time of the bench process, which runs transformers and the "
                  "in-process engine, and of each Ray rank), against the mean wall seconds:", used]
    return "\n\n".join(parts)
