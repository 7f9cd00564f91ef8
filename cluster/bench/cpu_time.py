"""CPU seconds each process of a measurement used (user + system, all of its threads): this bench process
(in `bench serve` the gateway and the load generator, or the transformers baseline) and each Ray rank,
read inside its own process over Ray.

CPU seconds over wall seconds is how many cores a process kept busy; on a host of C cores, C minus the
sum over its processes is what sat idle (hand-offs between ranks, wake-ups), and a process's share says
what a faster engine would still have to pay (the gateway's streaming, for one)."""

from __future__ import annotations

import time
from typing import TYPE_CHECKING

from cluster.bench.table import fmt

if TYPE_CHECKING:
    from cluster.ray_engine import RayExpertParallelEngine

BENCH_PROCESS = "bench process"
COORDINATOR = "coordinator"  # RayExpertParallelEngine's name for rank 0


def cpu_seconds(engine: RayExpertParallelEngine | None = None) -> dict[str, float]:
    """Cumulative CPU seconds by process: this one, then (given an engine) its ranks, named as the engine
    names them ("coordinator", "worker 0", ...)."""
    now = {BENCH_PROCESS: time.process_time()}
    return now | engine.rank_cpu_seconds() if engine is not None else now


def cpu_delta(before: dict[str, float], after: dict[str, float]) -> dict[str, float]:
    return {process: after[process] - before[process] for process in after}


CPU_HEADERS = [BENCH_PROCESS, COORDINATOR, "expert workers", "total", "wall", "busy cores", "CPU ms per output token"]


def cpu_cells(cpu: dict[str, float], wall_s: float, output_tokens: int) -> list[str]:
    """The CPU_HEADERS columns: each process's seconds (the workers summed), their total, the wall seconds,
    the cores kept busy (total / wall) and the CPU milliseconds per output token."""
    workers = [v for k, v in cpu.items() if k not in (BENCH_PROCESS, COORDINATOR)]
    total = sum(cpu.values())
    return [fmt(cpu.get(BENCH_PROCESS)), fmt(cpu.get(COORDINATOR)), fmt(sum(workers)) if workers else "–",
            fmt(total), fmt(wall_s), fmt(total / wall_s) if wall_s else "–",
            fmt(1e3 * total / output_tokens, 3) if output_tokens else "–"]
