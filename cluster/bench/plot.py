"""Latency against throughput as a PNG (matplotlib, Agg backend): one series per engine, one point per
concurrency, request rate or offline run."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class PlotPoint:
    series: str  # the engine
    x: float  # output tokens/s
    y: float  # latency, seconds
    note: str = ""  # e.g. "c=8"


@dataclass(frozen=True)
class Panel:
    ylabel: str
    points: tuple[PlotPoint, ...]


def plot_panels(panels: list[Panel], path: Path, title: str) -> Path:
    try:
        import matplotlib
    except ImportError as exc:
        raise ValueError("--plot needs matplotlib (pip install matplotlib)") from exc
    matplotlib.use("Agg")
    from matplotlib import pyplot as plt

    fig, axes = plt.subplots(1, len(panels), figsize=(6.5 * len(panels), 4.8), squeeze=False)
    for ax, panel in zip(axes[0], panels, strict=True):
        for series in dict.fromkeys(p.series for p in panel.points):
            pts = sorted((p for p in panel.points if p.series == series), key=lambda p: p.x)
            ax.plot([p.x for p in pts], [p.y for p in pts], marker="o", label=series)
            for p in pts:
                if p.note:
                    ax.annotate(p.note, (p.x, p.y), textcoords="offset points", xytext=(4, 4), fontsize=8)
        ax.set_xlabel("output tokens/s")
        ax.set_ylabel(panel.ylabel)
        ax.grid(True, alpha=0.3)
        ax.legend(fontsize=8)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
