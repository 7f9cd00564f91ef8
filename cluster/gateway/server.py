"""Builds and runs the gateway: the MixServe service, grpc.health.v1, reflection, the OpenAI-compatible HTTP
API (cluster/gateway/http_api.py, on its own port when `http_port` is set), and /metrics.

Security (TLS / mTLS, API keys, the receive limit) is configured by `SecurityOptions` and lives in
cluster/gateway/security.py. The metrics port binds 127.0.0.1 unless told otherwise (0.0.0.0 in Kubernetes,
where Prometheus scrapes the pod IP); it serves only aggregate metrics with bounded labels.

Lifecycle: start() binds the ports; wait() serves until SIGTERM/SIGINT, then health goes NOT_SERVING,
in-flight gRPC streams and HTTP responses get a grace period to finish, and the servers stop.
"""

from __future__ import annotations

import asyncio
import logging
import signal
from dataclasses import dataclass, field
from pathlib import Path

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from prometheus_client import start_http_server

from cluster.expert_balance import RoutingProfile, RoutingProfileError
from cluster.gateway.balancer import BalancerSettings, ExpertBalancer
from cluster.gateway.engine_client import EngineClient
from cluster.gateway.handlers import add_mixserve_servicer
from cluster.gateway.http_api import OpenAIApp
from cluster.gateway.http_server import HttpServer
from cluster.gateway.metrics import GatewayMetrics
from cluster.gateway.reflection import enable_reflection
from cluster.gateway.security import ApiKeyInterceptor, SecurityMaterial, SecurityOptions, load_security
from cluster.gateway.service import MixServeServicer
from cluster.gateway.validation import RequestLimits
from cluster.ray_engine import RayExpertParallelEngine
from cluster.tokenizer import TextTokenizer
from protos import mixserve_pb2 as pb

log = logging.getLogger(__name__)
SERVICE_NAME = pb.DESCRIPTOR.services_by_name["MixServe"].full_name


@dataclass(frozen=True, kw_only=True)
class GatewayOptions:
    host: str = "127.0.0.1"
    port: int = 50051
    metrics_host: str = "127.0.0.1"
    metrics_port: int = 9400
    grace_s: float = 30.0
    replay_timeout_s: float = 60.0  # how long a request in flight waits for its replay after an engine failure
    # after a failover onto surviving copies: seconds between the replacement being loaded and its rejoin (a
    # short pause that replays every stream in flight); a delay lets a burst pass first
    rejoin_delay_s: float = 0.0
    limits: RequestLimits = field(default_factory=RequestLimits)
    security: SecurityOptions = field(default_factory=SecurityOptions)
    # A plaintext port serving grpc.health.v1 only, for Kubernetes gRPC probes (they cannot speak TLS).
    health_port: int | None = None
    chat_template: Path | None = None  # --chat-template; None: the checkpoint's (cluster.chat_template)
    http_port: int | None = None  # the OpenAI-compatible HTTP API on `host`; None: off, 0: any free port
    balancer: BalancerSettings = field(default_factory=BalancerSettings)  # the online expert balancer (off)
    # --save-routing-profile: rows routed per (layer, expert) since start, written at stop (cluster.expert_balance)
    save_routing_profile: Path | None = None

    def __post_init__(self) -> None:
        if self.limits.max_prompt_chars > self.security.max_message_bytes:
            raise ValueError(
                f"max_prompt_chars ({self.limits.max_prompt_chars}) exceeds max_message_bytes "
                f"({self.security.max_message_bytes}): a prompt that long could never arrive"
            )
        if self.rejoin_delay_s < 0:
            raise ValueError(f"rejoin_delay_s must be >= 0, got {self.rejoin_delay_s}")
        if self.health_port and self.health_port in (self.port, self.metrics_port):
            raise ValueError(f"health_port ({self.health_port}) must differ from port and metrics_port")
        if self.http_port and self.http_port in (self.port, self.metrics_port, self.health_port):
            raise ValueError(f"http_port ({self.http_port}) must differ from port, metrics_port and health_port")


class Gateway:
    def __init__(self, engine: RayExpertParallelEngine, options: GatewayOptions) -> None:
        self.engine = engine
        self.options = options
        cfg = engine.cfg
        self.metrics = GatewayMetrics(num_layers=cfg.num_hidden_layers, num_experts=cfg.num_local_experts,
                                      num_workers=engine.options.num_workers,
                                      num_coordinators=engine.num_coordinators)
        self.client = EngineClient(engine, self.metrics, replay_timeout_s=options.replay_timeout_s,
                                   rejoin_delay_s=options.rejoin_delay_s)
        self.tokenizer = TextTokenizer.from_model_dir(
            engine.settings.model_dir, cfg.bos_token_id,
            eos_token_id=cfg.eos_token_ids[0] if cfg.eos_token_ids else None, chat_template_path=options.chat_template)
        self.health = health.aio.HealthServicer()
        self.server: grpc.aio.Server | None = None
        self.health_server: grpc.aio.Server | None = None
        self.http_server: HttpServer | None = None
        self.port = 0
        self.health_port = 0
        self.http_port = 0
        self.metrics_port = 0
        self._metrics_server = None
        self._stopped = asyncio.Event()
        self.balancer: ExpertBalancer | None = None
        if options.balancer.enabled and engine.options.num_workers:
            self.balancer = ExpertBalancer(engine, self.metrics, options.balancer,
                                           recovering=lambda: self.client.recovering)
        self._balancer_task: asyncio.Task | None = None

    def model_info(self) -> pb.ModelInfo:
        cfg, settings = self.engine.cfg, self.engine.settings
        return pb.ModelInfo(
            model=settings.model_dir.name, architecture="MixtralForCausalLM", vocab_size=cfg.vocab_size,
            hidden_size=cfg.hidden_size, num_layers=cfg.num_hidden_layers, num_experts=cfg.num_local_experts,
            experts_per_token=cfg.num_experts_per_tok, max_context=cfg.max_position_embeddings,
            sliding_window=cfg.sliding_window or 0, num_expert_workers=self.engine.options.num_workers,
            dtype=str(settings.dtype).removeprefix("torch."), device=settings.device.type,
            max_new_tokens_limit=self.options.limits.max_new_tokens, has_tokenizer=self.tokenizer is not None,
            has_chat_template=self.tokenizer is not None and self.tokenizer.chat_template is not None,
        )

    async def start(self) -> None:
        security = self.options.security
        material = load_security(security)  # before binding anything: a bad file fails the start cleanly
        self.server = self._build_server(material)
        if self.options.http_port is not None:
            self.http_server = self._build_http_server(material)
        if self.options.health_port is not None:
            self.health_server = grpc.aio.server(options=[("grpc.max_receive_message_length", 4096)])
            health_pb2_grpc.add_HealthServicer_to_server(self.health, self.health_server)
            self.health_port = self.health_server.add_insecure_port(f"{self.options.host}:{self.options.health_port}")
        self._metrics_server, _ = start_http_server(
            self.options.metrics_port, addr=self.options.metrics_host, registry=self.metrics.registry
        )
        self.metrics_port = self._metrics_server.server_port
        self.client.on_health_change = self._set_health
        await self.client.start()
        await self._set_health(self.client.healthy)
        if self.balancer is not None:
            self._balancer_task = asyncio.create_task(self.balancer.run(), name="expert balancer")
        await self.server.start()
        if self.health_server is not None:
            await self.health_server.start()
        if self.http_server is not None:
            await self.http_server.start()
            self.http_port = self.http_server.port
        log.info("gateway serving on %s:%d (%s), metrics on %s:%d", self.options.host, self.port,
                 security.describe(), self.options.metrics_host, self.metrics_port)
        if self.http_server is not None:
            log.info("OpenAI-compatible HTTP API on %s://%s:%d/v1 (model '%s')", "https" if security.tls else "http",
                     self.options.host, self.http_port, self.model_info().model)
        if self.options.host not in ("127.0.0.1", "::1", "localhost") and not (security.tls or material.key_digests):
            log.warning("gateway listens on %s in plaintext without API keys: anyone who reaches the port can "
                        "use the model (see --tls-cert and --api-keys-file)", self.options.host)

    def _build_server(self, material: SecurityMaterial) -> grpc.aio.Server:
        """MixServe + health + reflection on one port, behind the API-key check when keys are configured."""
        interceptors = [ApiKeyInterceptor(material.key_digests)] if material.key_digests else []
        limit = self.options.security.max_message_bytes
        server = grpc.aio.server(interceptors=interceptors, options=[("grpc.max_receive_message_length", limit)])
        servicer = MixServeServicer(client=self.client, cfg=self.engine.cfg, tokenizer=self.tokenizer,
                                    limits=self.options.limits, model_info=self.model_info())
        add_mixserve_servicer(servicer, server)
        health_pb2_grpc.add_HealthServicer_to_server(self.health, server)
        enable_reflection([SERVICE_NAME, health.SERVICE_NAME], server)
        address = f"{self.options.host}:{self.options.port}"
        if material.credentials is None:
            self.port = server.add_insecure_port(address)
        else:
            self.port = server.add_secure_port(address, material.credentials)
        return server

    def _build_http_server(self, material: SecurityMaterial) -> HttpServer:
        """The OpenAI-compatible API: the same engine client, validation, limits, API keys and TLS files."""
        api = OpenAIApp(client=self.client, cfg=self.engine.cfg, tokenizer=self.tokenizer, limits=self.options.limits,
                        model_id=self.model_info().model, key_digests=material.key_digests,
                        max_body_bytes=self.options.security.max_message_bytes)
        return HttpServer(api.app, host=self.options.host, port=self.options.http_port, grace_s=self.options.grace_s,
                          security=self.options.security)

    async def _set_health(self, healthy: bool) -> None:
        status = health_pb2.HealthCheckResponse.SERVING if healthy else health_pb2.HealthCheckResponse.NOT_SERVING
        for name in ("", SERVICE_NAME):
            await self.health.set(name, status)

    def install_signal_handlers(self) -> None:
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, lambda: asyncio.ensure_future(self.stop()))

    async def stop(self) -> None:
        """Drain: refuse new work, let in-flight requests finish within the grace period, then stop."""
        if self._stopped.is_set() or self.server is None:
            return
        self._stopped.set()
        await self.health.enter_graceful_shutdown()
        if self._balancer_task is not None:
            self._balancer_task.cancel()
        drains = [self.server.stop(self.options.grace_s)]
        if self.http_server is not None:
            drains.append(self.http_server.stop())
        await asyncio.gather(*drains)
        if self.health_server is not None:  # probes saw NOT_SERVING during the drain
            await self.health_server.stop(0)
        await self.client.stop()
        self._save_routing_profile()
        if self._metrics_server is not None:
            self._metrics_server.shutdown()
            self._metrics_server.server_close()

    def _save_routing_profile(self) -> None:
        path = self.options.save_routing_profile
        if path is None:
            return
        try:
            RoutingProfile.from_rows(self.metrics.routed_rows_LE()).save(path)
        except (RoutingProfileError, OSError) as exc:  # nothing routed, or the path cannot be written
            log.warning("routing profile not saved to %s: %s", path, exc)
        else:
            log.info("routing profile saved to %s", path)

    async def wait(self) -> None:
        await self._stopped.wait()
        if self.server is not None:
            await self.server.wait_for_termination()
