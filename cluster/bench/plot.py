"""Latency against throughput as a PNG (matplotlib, Agg backend): one series per engine, one point per
concurrency, request rate or offline run; one panel per latency."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from cluster.bench.report import OfflineReport, ServePoint, ServeReport


@dataclass(frozen=True)
class PlotPoint:
    series: str  # the engine
    x: float  # output tokens/s
    y: float  # latency, seconds
    note: str = ""  # e.g. "c=8"


Panel = tuple[str, list[PlotPoint]]  # (y label, points)


def plot_report(report: OfflineReport | ServeReport, path: Path) -> Path:
    if isinstance(report, OfflineReport):
        w = report.workload
        points = [PlotPoint(run.label, run.output_tokens_per_s, run.seconds, f"{run.seconds:.1f}s")
                  for run in report.runs]
        title = f"offline: {w.num_prompts} prompts × {w.input_len} in / {w.output_len} out"
        return _plot([("batch latency (total s)", points)], path, f"{title}, {report.model.path} "
                     f"({report.meta.date_utc})")

    def panel(ylabel: str, stat: Callable[[ServePoint], float | None]) -> Panel:
        return ylabel, [PlotPoint(p.label, p.output_tokens_per_s, stat(p), p.point) for p in report.points
                        if stat(p) is not None]

    panels = [panel("TTFT p50 (s)", lambda p: p.latency.ttft.p50),
              panel("inter-token latency p50 (s)", lambda p: p.latency.itl.p50),
              panel("end-to-end latency p50 (s)", lambda p: p.latency.e2e.p50)]
    title = f"serve: {report.input_len} in / {report.output_len} out, {report.model.path} ({report.meta.date_utc})"
    return _plot(panels, path, title)


def _plot(panels: list[Panel], path: Path, title: str) -> Path:
    try:
        import matplotlib
    except ImportError as exc:
        raise ValueError("--plot needs matplotlib (pip install 'mixserve[bench]')") from exc
    matplotlib.use("Agg")
    from matplotlib import pyplot as plt

    fig, axes = plt.subplots(1, len(panels), figsize=(6.5 * len(panels), 4.8), squeeze=False)
    for ax, (ylabel, points) in zip(axes[0], panels, strict=True):
        for series in dict.fromkeys(p.series for p in points):
            pts = sorted((p for p in points if p.series == series), key=lambda p: p.x)
            ax.plot([p.x for p in pts], [p.y for p in pts], marker="o", label=series)
            for p in pts:
                if p.note:
                    ax.annotate(p.note, (p.x, p.y), textcoords="offset points", xytext=(4, 4), fontsize=8)
        ax.set_xlabel("output tokens/s")
        ax.set_ylabel(ylabel)
        ax.grid(True, alpha=0.3)
        ax.legend(fontsize=8)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
