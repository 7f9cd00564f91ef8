"""What the engine did since the last look: per-step batch sizes and phase times, routed tokens per
(layer, expert), preemptions and prefix-cache lookups. The engine loop sends a snapshot with every batch of
updates; metrics read it."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from workers.runtime.timing import StepTimings


@dataclass(frozen=True)
class StatsSnapshot:
    num_running: int
    num_waiting: int
    kv_cache_usage: float
    batch_sizes: tuple[int, ...]
    batch_tokens: tuple[int, ...]
    phase_seconds: tuple[dict[str, float], ...]
    routed_tokens_LE: tuple[tuple[int, ...], ...]  # since the previous snapshot
    preemptions: int = 0  # since the previous snapshot
    prefix_cache_queries: int = 0  # tokens of admitted sequences looked up in the prefix cache, since the previous
    prefix_cache_hits: int = 0  # of those, tokens whose cached K/V were reused, since the previous snapshot


@dataclass
class EngineStats:
    num_layers: int
    num_experts: int
    device: torch.device  # where the rank counts routed tokens (its model's device)
    batch_sizes: list[int] = field(default_factory=list)
    batch_tokens: list[int] = field(default_factory=list)
    phase_seconds: list[dict[str, float]] = field(default_factory=list)
    preemptions: int = 0
    prefix_cache_queries: int = 0
    prefix_cache_hits: int = 0
    routed_tokens_LE: torch.Tensor = field(init=False)

    def __post_init__(self) -> None:
        self.routed_tokens_LE = torch.zeros(self.num_layers, self.num_experts, dtype=torch.int64, device=self.device)

    def record_step(self, num_sequences: int, num_tokens: int, timings: StepTimings) -> None:
        self.batch_sizes.append(num_sequences)
        self.batch_tokens.append(num_tokens)
        self.phase_seconds.append(dict(timings.seconds))

    def take(self, *, num_running: int, num_waiting: int, kv_cache_usage: float) -> StatsSnapshot:
        """A snapshot of everything since the last take; the per-step lists and counters restart."""
        snapshot = StatsSnapshot(
            num_running=num_running, num_waiting=num_waiting, kv_cache_usage=kv_cache_usage,
            batch_sizes=tuple(self.batch_sizes), batch_tokens=tuple(self.batch_tokens),
            phase_seconds=tuple(self.phase_seconds),
            routed_tokens_LE=tuple(tuple(row) for row in self.routed_tokens_LE.tolist()),
            preemptions=self.preemptions, prefix_cache_queries=self.prefix_cache_queries,
            prefix_cache_hits=self.prefix_cache_hits,
        )
        self.preemptions = self.prefix_cache_queries = self.prefix_cache_hits = 0
        self.batch_sizes.clear()
        self.batch_tokens.clear()
        self.phase_seconds.clear()
        self.routed_tokens_LE.zero_()
        return snapshot


def merge_snapshots(snapshots: list[StatsSnapshot]) -> StatsSnapshot | None:
    """One snapshot covering several: per-step lists concatenated, counters summed, gauges from the last."""
    if len(snapshots) <= 1:
        return snapshots[0] if snapshots else None
    last = snapshots[-1]
    routed = [list(row) for row in snapshots[0].routed_tokens_LE]
    for snap in snapshots[1:]:
        for layer, row in enumerate(snap.routed_tokens_LE):
            for expert, count in enumerate(row):
                routed[layer][expert] += count
    return StatsSnapshot(
        num_running=last.num_running, num_waiting=last.num_waiting, kv_cache_usage=last.kv_cache_usage,
        batch_sizes=tuple(b for s in snapshots for b in s.batch_sizes),
        batch_tokens=tuple(b for s in snapshots for b in s.batch_tokens),
        phase_seconds=tuple(p for s in snapshots for p in s.phase_seconds),
        routed_tokens_LE=tuple(tuple(row) for row in routed),
        preemptions=sum(s.preemptions for s in snapshots),
        prefix_cache_queries=sum(s.prefix_cache_queries for s in snapshots),
        prefix_cache_hits=sum(s.prefix_cache_hits for s in snapshots),
    )
