"""`mixserve bench offline`: N prompts through transformers, the in-process engine and the Ray engine with
each requested worker count, one after another in this process (and again per round), then ratios and
the compute and roofline floors.

The matmul rate and the memory bandwidth are measured before and after the engines (the best of the two
sets the floors), so a machine whose speed drifts during the run shows it in the report.
"""

from __future__ import annotations

from collections.abc import Callable
from contextlib import nullcontext
from dataclasses import dataclass
from functools import partial

import torch

from cluster.bench.bandwidth import copy_bandwidth
from cluster.bench.engines import IN_PROCESS_LABEL, EngineSetup, TimedRuns, engine_run, run_in_process
from cluster.bench.floor import ComputeFloor, MatmulRate, compute_floor, measure_matmul_flops
from cluster.bench.hf_baseline import run_transformers
from cluster.bench.meta import RunMeta, run_meta, run_start
from cluster.bench.ray_runs import ray_label, run_ray
from cluster.bench.results import IN_PROCESS, RAY, TRANSFORMERS, EngineRun, ModelSummary, Ratios, compute_ratios
from cluster.bench.roofline import COPY_BYTES, MemoryBandwidth, RooflineFloor, roofline_floor
from cluster.bench.workload import Workload, make_prompts
from cluster.ray_session import ray_session
from workers.config import ModelConfig

HF_LABEL = "transformers (batched generate)"


@dataclass(frozen=True, kw_only=True)
class OfflineOptions:
    setup: EngineSetup
    workload: Workload
    workers: tuple[int, ...] = (0, 1, 2)  # Ray engines; 0 = experts in the coordinator actor
    in_process: bool = True
    transformers: bool = True
    ray_address: str | None = None

    def __post_init__(self) -> None:
        if any(w < 0 for w in self.workers):
            raise ValueError(f"workers must be >= 0, got {self.workers}")
        if not (self.workers or self.in_process or self.transformers):
            raise ValueError("nothing to run: no workers, in_process and transformers both off")


@dataclass(frozen=True, kw_only=True)
class OfflineReport:
    mode: str
    meta: RunMeta
    model: ModelSummary
    workload: Workload
    settings: dict[str, str]
    compute_floor: ComputeFloor
    roofline_floor: RooflineFloor
    reference_label: str | None  # the mixserve engine "EP overhead" is measured against
    runs: tuple[EngineRun, ...]
    ratios: tuple[Ratios, ...]


def settings_summary(setup: EngineSetup) -> dict[str, str]:
    return {"device": str(setup.device), "dtype": str(setup.dtype).removeprefix("torch."),
            "threads_per_rank": str(setup.threads_per_rank), "max_batched_tokens": str(setup.max_batched_tokens),
            "max_num_seqs": str(setup.max_num_seqs), "block_size": str(setup.block_size),
            "warmup_tokens": str(setup.warmup_tokens), "rounds": str(setup.rounds),
            "ray_worker_niceness": setup.ray_worker_niceness, "reserved_cpus": str(setup.reserved_cpus),
            "compile_small_steps": "on" if setup.compile_small_steps else "off"}


def machine_rates(setup: EngineSetup) -> tuple[float, float]:
    """(matmul FLOP/s, copy bytes/s) at the ranks' thread count."""
    torch.set_num_threads(setup.threads_per_rank)
    return measure_matmul_flops(setup.dtype, setup.device), copy_bandwidth(setup.device, COPY_BYTES)


def _reference_label(opts: OfflineOptions) -> str | None:
    if opts.in_process:
        return IN_PROCESS_LABEL
    return ray_label(0) if 0 in opts.workers else None


@dataclass(frozen=True)
class _Engine:
    label: str
    kind: str
    workers: int | None
    run: Callable[[TimedRuns], None]  # one warmed-up, timed run of the workload


def _engines(opts: OfflineOptions, cfg: ModelConfig, prompts: list[tuple[int, ...]]) -> list[_Engine]:
    setup, workload = opts.setup, opts.workload
    out = []
    if opts.transformers:
        out.append(_Engine(HF_LABEL, TRANSFORMERS, None, partial(run_transformers, cfg, setup, workload, prompts)))
    if opts.in_process:
        out.append(_Engine(IN_PROCESS_LABEL, IN_PROCESS, None, partial(run_in_process, cfg, setup, workload, prompts)))
    for w in opts.workers:
        out.append(_Engine(ray_label(w), RAY, w, partial(run_ray, cfg, setup, workload, prompts, w)))
    return out


def run_offline(opts: OfflineOptions) -> OfflineReport:
    """Every engine once per round, the engines interleaved, so load from other processes hits them alike."""
    start = run_start()
    setup, workload = opts.setup, opts.workload
    cfg = ModelConfig.from_model_dir(setup.model_dir)
    engines = _engines(opts, cfg, make_prompts(workload, cfg.vocab_size))
    timed = {e.label: TimedRuns() for e in engines}
    rates = [machine_rates(setup)]
    with ray_session(opts.ray_address, max(opts.workers)) if opts.workers else nullcontext():
        for _ in range(setup.rounds):
            for engine in engines:
                engine.run(timed[engine.label])
    rates.append(machine_rates(setup))
    rate = MatmulRate(size=2048, dtype=str(setup.dtype).removeprefix("torch."), device=str(setup.device),
                      threads=setup.threads_per_rank, flops_per_s=tuple(r[0] for r in rates))
    bandwidth = MemoryBandwidth(copy_bytes=COPY_BYTES, device=str(setup.device), threads=setup.threads_per_rank,
                                bytes_per_s=tuple(r[1] for r in rates))
    floor = compute_floor(cfg, workload, rate)
    roofline = roofline_floor(cfg, workload, max_num_seqs=setup.max_num_seqs, matmul_flops_per_s=rate.best,
                              bandwidth=bandwidth, element_size=setup.dtype.itemsize)
    reference = timed[HF_LABEL].tokens if opts.transformers else None
    runs = [engine_run(e.label, e.kind, e.workers, timed[e.label], workload, setup, reference) for e in engines]
    label = _reference_label(opts)
    return OfflineReport(
        mode="offline", meta=run_meta(start), model=ModelSummary.of(setup.model_dir, cfg), workload=workload,
        settings=settings_summary(setup), compute_floor=floor, roofline_floor=roofline, reference_label=label,
        runs=tuple(runs), ratios=tuple(compute_ratios(runs, reference_label=label, floor_seconds=floor.floor_seconds,
                                                      roofline_seconds=roofline.floor_seconds)),
    )
