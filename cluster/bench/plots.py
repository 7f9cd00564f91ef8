"""Latency-against-throughput plots of the offline and serve reports."""

from __future__ import annotations

from pathlib import Path

from cluster.bench.offline import OfflineReport
from cluster.bench.plot import Panel, PlotPoint, plot_panels
from cluster.bench.serve_types import ServeReport


def plot_offline(report: OfflineReport, path: Path) -> Path:
    w = report.workload
    points = tuple(PlotPoint(run.label, run.output_tokens_per_s, run.seconds, f"{run.seconds:.1f}s")
                   for run in report.runs)
    title = (f"offline: {w.num_prompts} prompts × {w.input_len} in / {w.output_len} out, {report.model.path} "
             f"({report.meta.date_utc})")
    return plot_panels([Panel("batch latency (total s)", points)], path, title)


def plot_serve(report: ServeReport, path: Path) -> Path:
    def panel(ylabel: str, stat) -> Panel:
        pts = tuple(PlotPoint(p.label, p.output_tokens_per_s, stat(p), p.point) for p in report.points
                    if stat(p) is not None)
        return Panel(ylabel, pts)

    panels = [panel("TTFT p50 (s)", lambda p: p.latency.ttft.p50),
              panel("inter-token latency p50 (s)", lambda p: p.latency.itl.p50),
              panel("end-to-end latency p50 (s)", lambda p: p.latency.e2e.p50)]
    title = (f"serve: {report.input_len} in / {report.output_len} out, {report.model.path} "
             f"({report.meta.date_utc})")
    return plot_panels(panels, path, title)
