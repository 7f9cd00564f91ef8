"""`mixserve serve`: start the Ray engine (coordinator + expert workers) and the gRPC gateway, serve until
SIGTERM, then drain and shut everything down. Its first line of output is its own ("mixserve: starting ..."),
printed before Ray starts; ray_session.py quiets what Ray says while it starts."""

from __future__ import annotations

import asyncio
import logging

from cluster.gateway.server import Gateway, GatewayOptions
from cluster.rank_introspection import compiled_step_tokens, describe_ranks
from cluster.ray_engine import ClusterOptions, RayExpertParallelEngine
from cluster.ray_session import ray_session
from cluster.scheduler import SchedulerConfig
from cluster.settings import EngineSettings

log = logging.getLogger(__name__)


async def _serve(engine: RayExpertParallelEngine, options: GatewayOptions) -> None:
    gateway = Gateway(engine, options)
    await gateway.start()
    gateway.install_signal_handlers()
    for line in describe_ranks(engine):
        log.info("%s", line)
    if engine.settings.compile_small_steps:
        compiled = compiled_step_tokens(engine)
        print(f"mixserve: steps of up to {compiled} tokens run compiled layers" if compiled else
              "mixserve: --compile has no effect here (it needs in-process experts small enough to gather)",
              flush=True)
    print(f"mixserve: serving {engine.settings.model_dir} on {options.host}:{gateway.port} "
          f"(metrics http://{options.metrics_host}:{gateway.metrics_port}/metrics, "
          f"{engine.options.num_coordinators} coordinators, {engine.options.num_workers} expert workers)", flush=True)
    await gateway.wait()


def serve(settings: EngineSettings, cluster: ClusterOptions, scheduler: SchedulerConfig, options: GatewayOptions,
          ray_address: str | None) -> None:
    where = f"the Ray cluster at {ray_address}" if ray_address else "a new local Ray cluster"
    ranks = f"{cluster.num_workers} expert workers"
    if cluster.num_coordinators > 1:
        ranks = f"{cluster.num_coordinators} coordinators and {ranks}"
    print(f"mixserve: starting {settings.model_dir} with {ranks} on {where}", flush=True)
    num_ranks = cluster.num_coordinators + cluster.num_workers
    with ray_session(ray_address, num_ranks), RayExpertParallelEngine(settings, cluster, scheduler) as engine:
        asyncio.run(_serve(engine, options))
