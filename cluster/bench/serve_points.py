"""Measures sweep points: mixserve over gRPC (client-side traces, server phases from /metrics, expert
workers' own timings) and the transformers baseline (batched generate, batch = concurrency)."""

from __future__ import annotations

import asyncio
import gc
from dataclasses import dataclass

from cluster.bench.cpu_time import cpu_delta, cpu_seconds
from cluster.bench.grpc_load import closed_loop, open_loop
from cluster.bench.hf_baseline import generate_batch, load_model
from cluster.bench.latency import RequestTrace
from cluster.bench.meta import load_average
from cluster.bench.progress import token_bar
from cluster.bench.prom import phase_delta, scrape, scrape_settled
from cluster.bench.ray_runs import worker_seconds
from cluster.bench.results import TRANSFORMERS
from cluster.bench.serve_samples import Collected
from cluster.bench.serve_types import ServeOptions, SweepPoint
from cluster.bench.workload import Workload, make_prompts
from cluster.ray_engine import RayExpertParallelEngine
from workers.config import ModelConfig

HF_SERVE_LABEL = "transformers (batched generate, batch = concurrency)"


@dataclass(frozen=True, kw_only=True)
class Server:
    """Where a mixserve engine serves, and (when we started it) the engine itself."""

    label: str
    engine_kind: str
    workers: int | None
    target: str
    metrics_url: str | None
    engine: RayExpertParallelEngine | None = None


def point_prompts(opts: ServeOptions, cfg: ModelConfig, point: SweepPoint) -> list[tuple[int, ...]]:
    workload = Workload(num_prompts=point.num_prompts, input_len=opts.input_len, output_len=opts.output_len,
                        seed=opts.seed)
    return make_prompts(workload, cfg.vocab_size)


def _drive(opts: ServeOptions, server: Server, point: SweepPoint, prompts: list[tuple[int, ...]],
           output_len: int, progress: bool) -> tuple[list[RequestTrace], float]:
    with token_bar(len(prompts) * output_len, f"{server.label} {point.key}", enabled=progress) as bar:
        if point.concurrency is not None:
            load = closed_loop(server.target, prompts, output_len, point.concurrency, bar.update, opts.timeout_s)
        else:
            load = open_loop(server.target, prompts, output_len, point.request_rate, opts.seed, bar.update,
                             opts.timeout_s)
        return asyncio.run(load)


def _worker_delta(before: list[dict[str, float]], after: list[dict[str, float]]) -> list[dict[str, float]]:
    return [{k: a[k] - b.get(k, 0.0) for k in a} for a, b in zip(after, before, strict=True)]


def measure_server(opts: ServeOptions, cfg: ModelConfig, server: Server, collected: Collected) -> None:
    """Warms the server up with one wave of short requests, then measures every sweep point once."""
    warm = SweepPoint(concurrency=opts.max_in_flight, request_rate=None, num_prompts=opts.max_in_flight)
    _drive(opts, server, warm, point_prompts(opts, cfg, warm), opts.setup.warmup_tokens, False)
    for point in opts.sweep():
        prompts = point_prompts(opts, cfg, point)
        before = scrape(server.metrics_url) if server.metrics_url else {}
        workers_before = worker_seconds(server.engine) if server.engine else []
        load_before = load_average()[0]
        cpu_before = cpu_seconds(server.engine)
        traces, seconds = _drive(opts, server, point, prompts, opts.output_len, opts.setup.progress)
        cpu_after = cpu_seconds(server.engine)
        expected = sum(t.tokens for t in traces)
        after = scrape_settled(server.metrics_url, before, expected) if server.metrics_url else {}
        workers_after = worker_seconds(server.engine) if server.engine else []
        collected.at(server.label, server.engine_kind, server.workers, point).add(
            traces, seconds, server_phases=phase_delta(before, after),
            worker_phases=_worker_delta(workers_before, workers_after), loads=(load_before, load_average()[0]),
            cpu=cpu_delta(cpu_before, cpu_after))


def _hf_point(model, cfg: ModelConfig, opts: ServeOptions, point: SweepPoint, collected: Collected) -> None:
    prompts = point_prompts(opts, cfg, point)
    traces: list[RequestTrace] = []
    seconds = 0.0
    batch = point.concurrency or len(prompts)
    load_before = load_average()[0]
    cpu_before = cpu_seconds()
    with token_bar(len(prompts) * opts.output_len, f"transformers {point.key}", enabled=opts.setup.progress) as bar:
        for first in range(0, len(prompts), batch):
            out = generate_batch(model, cfg, prompts[first:first + batch], opts.output_len, bar.update)
            seconds += out.end - out.start
            traces += [RequestTrace(sent=out.start, chunk_times=out.step_times, chunk_tokens=(1,) * len(ids),
                                    done=out.end, finish_reason="length") for ids in out.token_ids]
    collected.at(HF_SERVE_LABEL, TRANSFORMERS, None, point).add(
        traces, seconds, server_phases={}, worker_phases=[], loads=(load_before, load_average()[0]),
        cpu=cpu_delta(cpu_before, cpu_seconds()))


def measure_transformers(opts: ServeOptions, cfg: ModelConfig, collected: Collected) -> None:
    """Concurrency points only: a request-rate sweep has no batched-generate equivalent."""
    sweep = [p for p in opts.sweep() if p.concurrency is not None]
    if not sweep:
        return
    model = load_model(opts.setup.model_dir, opts.setup.dtype, opts.setup.device)
    warm = point_prompts(opts, cfg, sweep[-1])[: max(p.concurrency or 1 for p in sweep)]
    generate_batch(model, cfg, warm, opts.setup.warmup_tokens)
    for point in sweep:
        _hf_point(model, cfg, opts, point, collected)
    del model
    gc.collect()
