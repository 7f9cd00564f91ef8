"""`mixserve bench offline`: N prompts through transformers, the in-process engine and the Ray engine with
each requested worker count, one after another in this process (and again per round), then ratios and
the compute and roofline floors.

The matmul rate and the memory bandwidth are measured before and after the engines (the best of the two
sets the floors), so a machine whose speed drifts during the run shows it in the report.
"""

from __future__ import annotations

from collections.abc import Callable
from contextlib import nullcontext
from dataclasses import dataclass, replace
from functools import partial

import torch

from cluster.bench import machine
from cluster.bench.report import (
    IN_PROCESS,
    RAY,
    TRANSFORMERS,
    EngineRun,
    ModelSummary,
    OfflineReport,
    compute_ratios,
    timing_fields,
)
from cluster.bench.runners import (
    HF_LABEL,
    IN_PROCESS_LABEL,
    TimedRuns,
    ray_label,
    run_in_process,
    run_ray,
    run_transformers,
)
from cluster.bench.workload import EngineSetup, Workload, make_prompts
from cluster.ray_session import ray_session
from workers.config import ModelConfig


@dataclass(frozen=True, kw_only=True)
class OfflineOptions:
    setup: EngineSetup
    workload: Workload
    workers: tuple[int, ...] = (0, 1, 2)  # Ray engines; 0 = experts in the coordinator actor
    micro_batches: tuple[int, ...] = (2,)  # engines with expert workers run once per value (ping-pong on/off)
    coordinators: tuple[int, ...] = (1,)  # and once per coordinator count
    in_process: bool = True
    transformers: bool = True
    ray_address: str | None = None

    def __post_init__(self) -> None:
        if any(w < 0 for w in self.workers):
            raise ValueError(f"workers must be >= 0, got {self.workers}")
        if not self.coordinators or any(c < 1 for c in self.coordinators):
            raise ValueError(f"coordinators must be >= 1, got {self.coordinators}")
        if not (self.workers or self.in_process or self.transformers):
            raise ValueError("nothing to run: no workers, in_process and transformers both off")

    @property
    def reference_label(self) -> str | None:
        """The mixserve engine the EP overhead is measured against."""
        if self.in_process:
            return IN_PROCESS_LABEL
        return ray_label(0) if 0 in self.workers else None


def agreement(tokens: list[list[int]], reference: list[list[int]] | None) -> float | None:
    """Fraction of requests whose tokens equal the reference's (None without a reference)."""
    if reference is None or not tokens:
        return None
    return sum(a == b for a, b in zip(tokens, reference, strict=True)) / len(tokens)


def engine_run(label: str, engine: str, workers: int | None, timed: TimedRuns, workload: Workload,
               setup: EngineSetup, reference: list[list[int]] | None, coordinators: int = 1) -> EngineRun:
    """The record of one engine: median wall time; phases, steps and worker phases per run (means; with several
    coordinators summed over them)."""
    runs = len(timed.seconds)
    per_run = {k: v / runs for k, v in timed.phases.items()} if engine != TRANSFORMERS else {}
    settings = {"threads": str(setup.threads_per_rank), "max_batched_tokens": str(setup.max_batched_tokens)}
    mean_seconds = sum(timed.seconds) / runs
    return EngineRun(
        label=label, engine=engine, workers=workers, coordinators=coordinators,
        **timing_fields(timed.seconds, workload.num_prompts, workload.output_tokens),
        steps=timed.steps // runs, phase_seconds=per_run,
        prefill_seconds=timed.prefill_seconds / runs, decode_seconds=timed.decode_seconds / runs,
        unaccounted_seconds=mean_seconds - sum(per_run.values()) if per_run and coordinators == 1 else None,
        worker_phase_seconds=tuple({k: v / runs for k, v in w.items()} for w in timed.worker_phases),
        cpu_seconds={k: v / runs for k, v in timed.cpu.items()},
        exact_output_len=all(len(t) == workload.output_len for t in timed.tokens),
        agreement_with_transformers=agreement(timed.tokens, reference),
        load_1m=(min(timed.loads, default=0.0), max(timed.loads, default=0.0)), notes=timed.notes | settings,
    )


def _machine_rates(setup: EngineSetup) -> tuple[float, float]:
    """(matmul FLOP/s, copy bytes/s) at the ranks' thread count."""
    torch.set_num_threads(setup.threads_per_rank)
    return (machine.measure_matmul_flops(setup.dtype, setup.device),
            machine.copy_bandwidth(setup.device, machine.COPY_BYTES))


@dataclass(frozen=True)
class _Engine:
    label: str
    kind: str
    workers: int | None
    run: Callable[[TimedRuns], None]  # one warmed-up, timed run of the workload
    coordinators: int = 1


def _engines(opts: OfflineOptions, cfg: ModelConfig, prompts: list[tuple[int, ...]]) -> list[_Engine]:
    setup, workload = opts.setup, opts.workload
    out = []
    if opts.transformers:
        out.append(_Engine(HF_LABEL, TRANSFORMERS, None, partial(run_transformers, cfg, setup, workload, prompts)))
    if opts.in_process:
        out.append(_Engine(IN_PROCESS_LABEL, IN_PROCESS, None, partial(run_in_process, cfg, setup, workload, prompts)))
    for w in opts.workers:
        for c in opts.coordinators if w else (1,):
            for m in opts.micro_batches if w else (1,):
                label = ray_label(w, c) + (f", {m} micro-batches" if w and len(opts.micro_batches) > 1 else "")
                variant = replace(setup, micro_batching=replace(setup.micro_batching, micro_batches=m)) if w else setup
                out.append(_Engine(label, RAY, w, partial(run_ray, cfg, variant, workload, prompts, w, label=label,
                                                          coordinators=c), coordinators=c))
    return out


def _floors(cfg: ModelConfig, opts: OfflineOptions,
            rates: list[tuple[float, float]]) -> tuple[machine.ComputeFloor, machine.RooflineFloor]:
    setup = opts.setup
    rate = machine.MatmulRate(size=machine.MATMUL_SIZE, dtype=str(setup.dtype).removeprefix("torch."),
                              device=str(setup.device), threads=setup.threads_per_rank,
                              flops_per_s=tuple(r[0] for r in rates))
    bandwidth = machine.MemoryBandwidth(copy_bytes=machine.COPY_BYTES, device=str(setup.device),
                                        threads=setup.threads_per_rank, bytes_per_s=tuple(r[1] for r in rates))
    roofline = machine.roofline_floor(cfg, opts.workload, max_num_seqs=setup.max_num_seqs,
                                      matmul_flops_per_s=rate.best, bandwidth=bandwidth,
                                      element_size=setup.dtype.itemsize)
    return machine.compute_floor(cfg, opts.workload, rate), roofline


def run_offline(opts: OfflineOptions) -> OfflineReport:
    """Every engine once per round, the engines interleaved, so load from other processes hits them alike."""
    start = machine.run_start()
    setup, workload = opts.setup, opts.workload
    cfg = ModelConfig.from_model_dir(setup.model_dir)
    engines = _engines(opts, cfg, make_prompts(workload, cfg.vocab_size))
    timed = {e.label: TimedRuns() for e in engines}
    rates = [_machine_rates(setup)]
    num_ranks = max(opts.workers, default=0) + max(opts.coordinators)
    with ray_session(opts.ray_address, num_ranks) if opts.workers else nullcontext():
        for _ in range(setup.rounds):
            for engine in engines:
                engine.run(timed[engine.label])
    rates.append(_machine_rates(setup))
    floor, roofline = _floors(cfg, opts, rates)
    reference = timed[HF_LABEL].tokens if opts.transformers else None
    runs = [engine_run(e.label, e.kind, e.workers, timed[e.label], workload, setup, reference, e.coordinators)
            for e in engines]
    label = opts.reference_label
    return OfflineReport(
        mode="offline", meta=machine.run_meta(start), model=ModelSummary.of(setup.model_dir, cfg), workload=workload,
        settings=setup.summary(), compute_floor=floor, roofline_floor=roofline, reference_label=label,
        runs=tuple(runs), ratios=tuple(compute_ratios(runs, reference_label=label, floor_seconds=floor.floor_seconds,
                                                      roofline_seconds=roofline.floor_seconds)),
    )
