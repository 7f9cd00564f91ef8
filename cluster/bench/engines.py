"""The mixserve engines' shared setup, and the offline workload through the in-process `LLMEngine` (no Ray).

Each engine is warmed up on the same prompts (a few tokens each) before the timed runs; per-step phase
seconds come from the engine's own stats, and expert workers report their own timings.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch

from cluster.bench.cpu_time import cpu_delta, cpu_seconds
from cluster.bench.meta import load_average
from cluster.bench.progress import token_bar
from cluster.bench.results import TRANSFORMERS, EngineRun, run_stats
from cluster.bench.workload import Workload, engine_requests
from cluster.engine import LLMEngine
from cluster.engine_factory import build_local_engine
from cluster.engine_stats import StatsSnapshot
from cluster.requests import GenerationRequest
from cluster.scheduler import SchedulerConfig
from cluster.settings import EngineSettings
from workers.config import ModelConfig
from workers.runtime.local_build import kv_cache_spec
from workers.runtime.timing import PHASES

OnTokens = Callable[[int], object]
IN_PROCESS_LABEL = "mixserve in-process (no Ray)"


@dataclass(frozen=True, kw_only=True)
class EngineSetup:
    """What every mixserve engine of one benchmark shares."""

    model_dir: Path
    device: torch.device
    dtype: torch.dtype
    threads_per_rank: int
    max_batched_tokens: int
    max_num_seqs: int
    block_size: int = 16
    warmup_tokens: int = 4
    rounds: int = 1  # each engine runs once per round; rounds interleave the engines
    progress: bool = True
    timeout_s: float = 3600.0
    ray_worker_niceness: str = "Ray's default"  # recorded here; the entry point applies it before Ray starts
    reserved_cpus: int = 0  # Ray ranks run threads_per_rank minus this (the gateway's share in serve)
    compile_small_steps: bool = False  # EngineSettings.compile_small_steps for every mixserve engine

    def __post_init__(self) -> None:
        for name in ("threads_per_rank", "max_batched_tokens", "max_num_seqs", "block_size", "warmup_tokens",
                     "rounds"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be at least 1, got {getattr(self, name)}")
        if not self.timeout_s > 0:
            raise ValueError(f"timeout_s must be positive, got {self.timeout_s}")


def kv_cache_bytes(cfg: ModelConfig, setup: EngineSetup, workload: Workload) -> int:
    """Room for every running sequence at full length, plus one spare block each: no preemption."""
    spec = kv_cache_spec(cfg, num_blocks=1, block_size=setup.block_size, dtype=setup.dtype, device=setup.device)
    per_sequence = spec.max_blocks_per_sequence(workload.input_len + workload.output_len) + 1
    return per_sequence * min(setup.max_num_seqs, workload.num_prompts) * spec.bytes_per_block


def engine_settings(cfg: ModelConfig, setup: EngineSetup, workload: Workload, workers: int = 0) -> EngineSettings:
    return EngineSettings(model_dir=setup.model_dir, device=setup.device, dtype=setup.dtype,
                          kv_cache_bytes=kv_cache_bytes(cfg, setup, workload), block_size=setup.block_size,
                          num_workers=workers, compile_small_steps=setup.compile_small_steps)


def scheduler_config(setup: EngineSetup) -> SchedulerConfig:
    return SchedulerConfig(max_num_seqs=setup.max_num_seqs, max_batched_tokens=setup.max_batched_tokens,
                           max_waiting=max(256, setup.max_num_seqs))


@dataclass(frozen=True)
class Steps:
    """Engine steps of one run: phase seconds of each, and whether it held prompt tokens (prefill)."""

    phases: tuple[dict[str, float], ...] = ()
    prefill: tuple[bool, ...] = ()

    @classmethod
    def of(cls, snapshot: StatsSnapshot) -> Steps:
        flags = tuple(t > s for s, t in zip(snapshot.batch_sizes, snapshot.batch_tokens, strict=True))
        return cls(snapshot.phase_seconds, flags)

    def __add__(self, other: Steps) -> Steps:
        return Steps(self.phases + other.phases, self.prefill + other.prefill)


@dataclass
class TimedRuns:
    """The timed runs of one engine (one per round): wall seconds, and phases / steps / expert workers' own
    phases summed over the runs; the 1-minute load average is sampled around every run."""

    seconds: list[float] = field(default_factory=list)
    phases: dict[str, float] = field(default_factory=lambda: dict.fromkeys(PHASES, 0.0))
    steps: int = 0
    worker_phases: list[dict[str, float]] = field(default_factory=list)
    tokens: list[list[int]] = field(default_factory=list)  # of the last run
    loads: list[float] = field(default_factory=list)
    notes: dict[str, str] = field(default_factory=dict)
    prefill_seconds: float = 0.0  # steps holding prompt tokens (transformers: up to the first token)
    decode_seconds: float = 0.0  # one-token-per-sequence steps (transformers: after the first token)
    cpu: dict[str, float] = field(default_factory=dict)  # CPU seconds by process (cluster.bench.cpu_time)

    def sample_load(self) -> None:
        self.loads.append(load_average()[0])

    def add(self, seconds: float, steps: Steps, tokens: list[list[int]]) -> None:
        self.sample_load()
        self.seconds.append(seconds)
        for step, prefill in zip(steps.phases, steps.prefill, strict=True):
            for phase, value in step.items():
                self.phases[phase] = self.phases.get(phase, 0.0) + value
            if prefill:
                self.prefill_seconds += sum(step.values())
            else:
                self.decode_seconds += sum(step.values())
        self.steps += len(steps.phases)
        self.tokens = tokens

    def add_cpu(self, used: dict[str, float]) -> None:
        for process, seconds in used.items():
            self.cpu[process] = self.cpu.get(process, 0.0) + seconds

    def add_worker_phases(self, per_worker: list[dict[str, float]]) -> None:
        if not self.worker_phases:
            self.worker_phases = [dict.fromkeys(w, 0.0) for w in per_worker]
        for total, run in zip(self.worker_phases, per_worker, strict=True):
            for phase, value in run.items():
                total[phase] = total.get(phase, 0.0) + value


def agreement(tokens: list[list[int]], reference: list[list[int]] | None) -> float | None:
    """Fraction of requests whose tokens equal the reference's (None without a reference)."""
    if reference is None or not tokens:
        return None
    return sum(a == b for a, b in zip(tokens, reference, strict=True)) / len(tokens)


def engine_run(label: str, engine: str, workers: int | None, timed: TimedRuns, workload: Workload,
               setup: EngineSetup, reference: list[list[int]] | None) -> EngineRun:
    """The record of one engine: median wall time; phases, steps and worker phases per run (means)."""
    runs = len(timed.seconds)
    stats = run_stats(label, engine, workers, timed.seconds, workload.num_prompts, workload.output_tokens)
    per_run = {k: v / runs for k, v in timed.phases.items()} if engine != TRANSFORMERS else {}
    settings = {"threads": str(setup.threads_per_rank), "max_batched_tokens": str(setup.max_batched_tokens)}
    mean_seconds = sum(timed.seconds) / runs
    return EngineRun(
        **stats, steps=timed.steps // runs, phase_seconds=per_run,
        prefill_seconds=timed.prefill_seconds / runs, decode_seconds=timed.decode_seconds / runs,
        unaccounted_seconds=mean_seconds - sum(per_run.values()) if per_run else None,
        worker_phase_seconds=tuple({k: v / runs for k, v in w.items()} for w in timed.worker_phases),
        cpu_seconds={k: v / runs for k, v in timed.cpu.items()},
        exact_output_len=all(len(t) == workload.output_len for t in timed.tokens),
        agreement_with_transformers=agreement(timed.tokens, reference),
        load_1m=(min(timed.loads, default=0.0), max(timed.loads, default=0.0)), notes=timed.notes | settings,
    )


def _local_generate(engine: LLMEngine, requests: list[GenerationRequest],
                    on_tokens: OnTokens) -> tuple[float, list[list[int]]]:
    out: dict[str, list[int]] = {r.request_id: [] for r in requests}
    start = time.perf_counter()
    for request in requests:
        engine.add_request(request)
    while engine.has_work():
        for update in engine.step():
            out[update.request_id].extend(update.token_ids)
            on_tokens(len(update.token_ids))
    return time.perf_counter() - start, [out[r.request_id] for r in requests]


def _take_steps(engine: LLMEngine) -> Steps:
    return Steps.of(engine.stats.take(num_running=0, num_waiting=0, kv_cache_usage=0.0))


def run_in_process(cfg: ModelConfig, setup: EngineSetup, workload: Workload, prompts: list[tuple[int, ...]],
                   timed: TimedRuns) -> None:
    """Builds the engine, warms it up, and adds one timed run of the workload to `timed`."""
    torch.set_num_threads(setup.threads_per_rank)
    engine = build_local_engine(engine_settings(cfg, setup, workload), scheduler_config(setup))
    _local_generate(engine, engine_requests(prompts, setup.warmup_tokens, "warmup"), lambda n: None)
    _take_steps(engine)
    requests = engine_requests(prompts, workload.output_len, f"run{len(timed.seconds)}")
    timed.sample_load()
    cpu_before = cpu_seconds()
    with token_bar(workload.output_tokens, IN_PROCESS_LABEL, enabled=setup.progress) as bar:
        seconds, tokens = _local_generate(engine, requests, bar.update)
    timed.add_cpu(cpu_delta(cpu_before, cpu_seconds()))
    timed.add(seconds, _take_steps(engine), tokens)
