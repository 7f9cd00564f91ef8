"""`mixserve bench serve`: online serving over gRPC. For each worker count it starts a Ray engine and a
gateway on loopback in this process (or measures `--target`), drives a concurrency or request-rate sweep
from an asyncio client, and measures the transformers baseline (batched generate, batch = concurrency)
on the same prompts in the same run."""

from __future__ import annotations

from contextlib import nullcontext

import torch

from cluster.bench.engines import EngineSetup
from cluster.bench.gateway_runner import BackgroundGateway
from cluster.bench.meta import run_meta, run_start
from cluster.bench.offline import settings_summary
from cluster.bench.ray_runs import ray_label, start_ray_engine
from cluster.bench.results import RAY, ModelSummary, compute_ratios
from cluster.bench.serve_points import Server, measure_server, measure_transformers
from cluster.bench.serve_samples import Collected
from cluster.bench.serve_types import PointRatios, ServeOptions, ServePoint, ServeReport
from cluster.bench.workload import Workload
from cluster.ray_session import ray_session
from workers.config import ModelConfig

EXTERNAL_LABEL = "mixserve (external server)"


def _measure_engine(opts: ServeOptions, cfg: ModelConfig, workers: int, collected: Collected) -> None:
    setup: EngineSetup = opts.setup
    sizing = Workload(num_prompts=opts.max_in_flight, input_len=opts.input_len, output_len=opts.output_len)
    engine = start_ray_engine(cfg, setup, sizing, workers)
    try:
        with BackgroundGateway(engine) as gateway:
            server = Server(label=ray_label(workers), engine_kind=RAY, workers=workers, target=gateway.target,
                            metrics_url=gateway.metrics_url, engine=engine)
            measure_server(opts, cfg, server, collected)
    finally:
        engine.shutdown()


def _ratios(points: list[ServePoint], reference_label: str | None) -> list[PointRatios]:
    out = []
    for key in dict.fromkeys(p.point for p in points):
        group = [p for p in points if p.point == key]
        out += [PointRatios(point=key, ratios=r) for r in compute_ratios(group, reference_label=reference_label)]
    return out


def _one_round(opts: ServeOptions, cfg: ModelConfig, collected: Collected) -> None:
    if opts.transformers:
        measure_transformers(opts, cfg, collected)
    if opts.target is not None:
        server = Server(label=EXTERNAL_LABEL, engine_kind=RAY, workers=None, target=opts.target,
                        metrics_url=opts.metrics_url)
        measure_server(opts, cfg, server, collected)
    for workers in opts.workers if opts.target is None else ():
        _measure_engine(opts, cfg, workers, collected)


def run_serve(opts: ServeOptions) -> ServeReport:
    """Every engine through the whole sweep once per round, the engines interleaved."""
    start = run_start()
    cfg = ModelConfig.from_model_dir(opts.setup.model_dir)
    torch.set_num_threads(opts.setup.threads_per_rank)
    collected = Collected()
    session = ray_session(opts.ray_address, max(opts.workers)) if opts.target is None else nullcontext()
    with session:
        for _ in range(opts.setup.rounds):
            _one_round(opts, cfg, collected)
    points = collected.points(opts.output_len)
    reference = EXTERNAL_LABEL if opts.target else (ray_label(0) if 0 in opts.workers else None)
    return ServeReport(
        mode="serve", meta=run_meta(start), model=ModelSummary.of(opts.setup.model_dir, cfg),
        input_len=opts.input_len, output_len=opts.output_len, settings=settings_summary(opts.setup),
        reference_label=reference, points=tuple(points), ratios=tuple(_ratios(points, reference)),
    )
