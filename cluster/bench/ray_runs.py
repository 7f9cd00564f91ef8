"""The offline workload through the Ray expert-parallel engine with N expert workers (0: experts in the
coordinator actor). Assumes Ray is initialised by the caller.

Wall time runs from the first submit to the last token at the driver, so Ray calls are included; phases
come from the coordinator's per-step stats (drained with the updates), and each expert worker reports
its own dispatch / experts / combine seconds.
"""

from __future__ import annotations

import time

import ray

from cluster.bench.cpu_time import cpu_delta, cpu_seconds
from cluster.bench.engines import EngineSetup, OnTokens, Steps, TimedRuns, engine_settings, scheduler_config
from cluster.bench.progress import token_bar
from cluster.bench.workload import Workload, engine_requests
from cluster.errors import WorkerUnavailable
from cluster.ray_engine import ClusterOptions, RayExpertParallelEngine
from cluster.requests import GenerationRequest
from workers.config import ModelConfig


def ray_label(workers: int) -> str:
    if workers == 0:
        return "mixserve Ray, 0 workers (experts in coordinator)"
    return f"mixserve Ray, {workers} expert worker{'s' if workers > 1 else ''}"


def start_ray_engine(cfg: ModelConfig, setup: EngineSetup, workload: Workload, workers: int) -> RayExpertParallelEngine:
    settings = engine_settings(cfg, setup, workload, workers)
    options = ClusterOptions(num_workers=workers, threads_per_rank=setup.threads_per_rank,
                             reserved_cpus=setup.reserved_cpus)
    engine = RayExpertParallelEngine(settings, options, scheduler_config(setup))
    engine.start()
    return engine


def ray_generate(engine: RayExpertParallelEngine, requests: list[GenerationRequest], on_tokens: OnTokens,
                 timeout_s: float) -> tuple[float, Steps, list[list[int]]]:
    """Submits every request, drains until all finish; returns (seconds, the engine's steps, tokens)."""
    out: dict[str, list[int]] = {r.request_id: [] for r in requests}
    steps = Steps()
    start = time.perf_counter()
    ray.get([engine.submit_ref(r) for r in requests])
    pending = set(out)
    while pending:
        if time.perf_counter() - start > timeout_s:
            raise TimeoutError(f"{len(pending)} requests unfinished after {timeout_s}s")
        updates, stats = engine.drain_with_stats(1.0)
        if stats is not None:
            steps = steps + Steps.of(stats)
        for update in updates:
            if update.error:
                raise WorkerUnavailable(f"request {update.request_id} failed: {update.error}")
            out[update.request_id].extend(update.token_ids)
            on_tokens(len(update.token_ids))
            if update.finish_reason:
                pending.discard(update.request_id)
    return time.perf_counter() - start, steps, [out[r.request_id] for r in requests]


def worker_seconds(engine: RayExpertParallelEngine) -> list[dict[str, float]]:
    return [dict(s["seconds"]) for s in engine.worker_stats()] if engine.options.num_workers else []


def run_ray(cfg: ModelConfig, setup: EngineSetup, workload: Workload, prompts: list[tuple[int, ...]], workers: int,
            timed: TimedRuns) -> None:
    """Starts the engine, warms it up, adds one timed run of the workload to `timed`, and shuts it down."""
    engine = start_ray_engine(cfg, setup, workload, workers)
    try:
        ray_generate(engine, engine_requests(prompts, setup.warmup_tokens, "warmup"), lambda n: None, setup.timeout_s)
        before = worker_seconds(engine)
        requests = engine_requests(prompts, workload.output_len, f"run{len(timed.seconds)}")
        timed.sample_load()
        cpu_before = cpu_seconds(engine)
        with token_bar(workload.output_tokens, ray_label(workers), enabled=setup.progress) as bar:
            seconds, steps, tokens = ray_generate(engine, requests, bar.update, setup.timeout_s)
        timed.add_cpu(cpu_delta(cpu_before, cpu_seconds(engine)))
        timed.add(seconds, steps, tokens)
        after = worker_seconds(engine)
    finally:
        engine.shutdown()
    timed.add_worker_phases([{k: a[k] - b.get(k, 0.0) for k in a} for a, b in zip(after, before, strict=True)])
