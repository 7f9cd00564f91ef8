"""Runs a real gateway (and its Ray engine) on loopback in a background thread for the e2e tests."""

from __future__ import annotations

import asyncio
import threading
from pathlib import Path

import grpc
import torch

from cluster.gateway.server import Gateway, GatewayOptions
from cluster.ray_engine import ClusterOptions, RayExpertParallelEngine
from cluster.scheduler import SchedulerConfig
from cluster.settings import EngineSettings
from protos import mixserve_pb2_grpc as pb_grpc


class RunningGateway:
    def __init__(self, model_dir: Path, *, workers: int, scheduler: SchedulerConfig | None = None,
                 options: GatewayOptions | None = None, kv_cache_bytes: int = 8 * 2**20) -> None:
        settings = EngineSettings(model_dir=model_dir, device=torch.device("cpu"), dtype=torch.float32,
                                  kv_cache_bytes=kv_cache_bytes)
        self.engine = RayExpertParallelEngine(
            settings, ClusterOptions(num_workers=workers, threads_per_rank=1, collective_timeout_s=15), scheduler
        )
        self.options = options or GatewayOptions(port=0, metrics_port=0, grace_s=5)
        self.loop = asyncio.new_event_loop()
        self.gateway: Gateway | None = None
        self.thread = threading.Thread(target=self.loop.run_forever, name="gateway", daemon=True)

    def __enter__(self) -> RunningGateway:
        self.engine.start()
        self.thread.start()
        self.gateway = self._run(self._start())
        self.channel = grpc.insecure_channel(self.target)
        self.stub = pb_grpc.MixServeStub(self.channel)
        return self

    async def _start(self) -> Gateway:
        gateway = Gateway(self.engine, self.options)
        await gateway.start()
        return gateway

    def _run(self, coro, timeout: float = 60):
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)

    @property
    def target(self) -> str:
        return f"127.0.0.1:{self.gateway.port}"

    @property
    def metrics_url(self) -> str:
        return f"http://127.0.0.1:{self.gateway.metrics_port}/metrics"

    def __exit__(self, *exc) -> None:
        self.channel.close()
        try:
            self._run(self.gateway.stop())
        finally:
            self.loop.call_soon_threadsafe(self.loop.stop)
            self.thread.join(10)
            self.engine.shutdown()
