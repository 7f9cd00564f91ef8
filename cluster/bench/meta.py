"""Where and when a benchmark ran: date, machine, library versions, load, and the code's git commit."""

from __future__ import annotations

import datetime as dt
import os
import platform
import subprocess
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path

import torch


@dataclass(frozen=True, kw_only=True)
class RunMeta:
    date_utc: str
    cpu: str
    logical_cpus: int
    memory_gib: float
    gpu: str | None
    platform: str
    python: str
    versions: dict[str, str]
    git_commit: str | None  # when the run started (Ray actors import the code from disk when they start)
    git_commit_end: str | None  # differs when the code changed during the run
    load_average_start: tuple[float, float, float]
    load_average_end: tuple[float, float, float]


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _memory_gib() -> float:
    try:
        return round(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30, 1)
    except (ValueError, OSError, AttributeError):
        return 0.0


def _versions() -> dict[str, str]:
    out = {}
    for name in ("mixserve", "torch", "transformers", "ray", "grpcio"):
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            continue
    return out


def git_commit() -> str | None:
    root = Path(__file__).resolve().parents[2]
    try:
        head = subprocess.run(["git", "-C", str(root), "rev-parse", "--short", "HEAD"], capture_output=True,
                              text=True, timeout=5, check=True).stdout.strip()
        dirty = subprocess.run(["git", "-C", str(root), "status", "--porcelain", "--untracked-files=no"],
                               capture_output=True, text=True, timeout=5, check=True).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return None
    return f"{head}{'+dirty' if dirty else ''}"


def load_average() -> tuple[float, float, float]:
    try:
        return os.getloadavg()
    except OSError:
        return (0.0, 0.0, 0.0)


def load_warning(meta: RunMeta) -> str:
    """A line for the report when the machine was busy before the benchmark started ('' otherwise); later
    samples include the benchmark's own processes."""
    before = meta.load_average_start[0]
    changed = "" if meta.git_commit == meta.git_commit_end else (
        f"\nWARNING: the code changed during the run ({meta.git_commit} → {meta.git_commit_end})")
    if before <= 0.5 * meta.logical_cpus:
        return changed
    return changed + (f"\nWARNING: the 1-minute load average was {before:.1f} on {meta.logical_cpus} logical CPUs when "
                      f"the run started: other processes may have shared the machine, so timings may be pessimistic "
                      f"and noisy")


@dataclass(frozen=True)
class RunStart:
    load_average: tuple[float, float, float]
    git_commit: str | None


def run_start() -> RunStart:
    return RunStart(load_average(), git_commit())


def run_meta(start: RunStart) -> RunMeta:
    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else None
    return RunMeta(
        date_utc=dt.datetime.now(dt.UTC).strftime("%Y-%m-%dT%H:%M:%SZ"), cpu=_cpu_model(),
        logical_cpus=os.cpu_count() or 1, memory_gib=_memory_gib(), gpu=gpu, platform=platform.platform(),
        python=platform.python_version(), versions=_versions(), git_commit=start.git_commit,
        git_commit_end=git_commit(), load_average_start=start.load_average, load_average_end=load_average(),
    )


def compiled_note(settings: dict[str, str]) -> str:
    """Marks runs whose in-process experts ran compiled small steps (`--compile`)."""
    return ", small steps compiled" if settings.get("compile_small_steps") == "on" else ""
