"""A gateway (and its started Ray engine) serving on loopback from a background event-loop thread."""

from __future__ import annotations

import asyncio
import threading

from cluster.gateway.server import Gateway, GatewayOptions
from cluster.ray_engine import RayExpertParallelEngine


class BackgroundGateway:
    def __init__(self, engine: RayExpertParallelEngine, options: GatewayOptions | None = None) -> None:
        self.engine = engine
        self.options = options or GatewayOptions(port=0, metrics_port=0, grace_s=5)
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, name="bench-gateway", daemon=True)
        self.gateway: Gateway | None = None

    def _run(self, coro, timeout_s: float = 60.0):
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout_s)

    async def _start(self) -> Gateway:
        gateway = Gateway(self.engine, self.options)
        await gateway.start()
        return gateway

    def __enter__(self) -> BackgroundGateway:
        self.thread.start()
        self.gateway = self._run(self._start())
        return self

    @property
    def target(self) -> str:
        assert self.gateway is not None, "start the gateway first"
        return f"127.0.0.1:{self.gateway.port}"

    @property
    def metrics_url(self) -> str:
        assert self.gateway is not None, "start the gateway first"
        return f"http://127.0.0.1:{self.gateway.metrics_port}/metrics"

    def __exit__(self, *exc_info) -> None:
        try:
            if self.gateway is not None:
                self._run(self.gateway.stop())
        finally:
            self.loop.call_soon_threadsafe(self.loop.stop)
            self.thread.join(10)
