"""Runs a real gateway (and its Ray engine) on loopback in a background thread for the e2e tests.

`channel`/`stub` are plaintext and carry no key; with TLS or API keys in the options, build channels with
`open_channel(credentials)` and pass metadata per call. The default options also serve the OpenAI-compatible
HTTP API on a free port (`http_base_url`)."""

from __future__ import annotations

import asyncio
import threading
from pathlib import Path

import grpc
import torch

from cluster.cpu_tuning import CpuPolicy
from cluster.gateway.server import Gateway, GatewayOptions
from cluster.ray_engine import ClusterOptions, RayExpertParallelEngine
from cluster.scheduler import SchedulerConfig
from cluster.settings import EngineSettings
from protos import mixserve_pb2_grpc as pb_grpc


class RunningGateway:
    def __init__(self, model_dir: Path, *, workers: int, scheduler: SchedulerConfig | None = None,
                 options: GatewayOptions | None = None, kv_cache_bytes: int = 8 * 2**20, coordinators: int = 1,
                 redundant_experts: int = 0) -> None:
        settings = EngineSettings(model_dir=model_dir, device=torch.device("cpu"), dtype=torch.float32,
                                  kv_cache_bytes=kv_cache_bytes)
        self.engine = RayExpertParallelEngine(
            settings,
            ClusterOptions(num_workers=workers, num_coordinators=coordinators, redundant_experts=redundant_experts,
                           cpu=CpuPolicy(threads_per_rank=1), collective_timeout_s=15),
            scheduler,
        )
        self.options = options or GatewayOptions(port=0, metrics_port=0, http_port=0, grace_s=5)
        self.loop = asyncio.new_event_loop()
        self.gateway: Gateway | None = None
        self.thread = threading.Thread(target=self.loop.run_forever, name="gateway", daemon=True)
        self._channels: list[grpc.Channel] = []

    def __enter__(self) -> RunningGateway:
        self.engine.start()
        self.thread.start()
        self.gateway = self._run(self._start())
        self.channel = self.open_channel()
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
    def health_target(self) -> str:
        """The plaintext health-only port (GatewayOptions.health_port)."""
        assert self.gateway.health_server is not None, "GatewayOptions.health_port is not set"
        return f"127.0.0.1:{self.gateway.health_port}"

    def open_channel(self, credentials: grpc.ChannelCredentials | None = None, *, target: str | None = None,
                     server_name: str | None = None) -> grpc.Channel:
        """A channel to the gateway (plaintext without credentials), closed when the gateway stops."""
        target = target or self.target
        if credentials is None:
            channel = grpc.insecure_channel(target)
        else:
            options = [("grpc.ssl_target_name_override", server_name)] if server_name else []
            channel = grpc.secure_channel(target, credentials, options=options)
        self._channels.append(channel)
        return channel

    @property
    def http_base_url(self) -> str:
        """The OpenAI API's base URL (`openai.OpenAI(base_url=...)`); needs GatewayOptions.http_port."""
        assert self.gateway.http_server is not None, "GatewayOptions.http_port is not set"
        scheme = "https" if self.options.security.tls else "http"
        return f"{scheme}://127.0.0.1:{self.gateway.http_port}/v1"

    @property
    def metrics_url(self) -> str:
        return f"http://127.0.0.1:{self.gateway.metrics_port}/metrics"

    def __exit__(self, *exc) -> None:
        for channel in self._channels:
            channel.close()
        try:
            self._run(self.gateway.stop())
        finally:
            self.loop.call_soon_threadsafe(self.loop.stop)
            self.thread.join(10)
            self.engine.shutdown()
