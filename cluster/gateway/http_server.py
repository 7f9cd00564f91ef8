"""Runs an ASGI app with uvicorn inside the gateway's asyncio loop: start binds the port, stop drains.

uvicorn's own signal handling is off: the gateway owns SIGTERM/SIGINT and calls stop(). TLS uses the gateway's
certificate files (with a client CA, client certificates are required, as on the gRPC port).
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
import ssl

import uvicorn
from starlette.types import ASGIApp

from cluster.gateway.security import SecurityOptions

START_TIMEOUT_S = 30.0


class _Server(uvicorn.Server):
    @contextlib.contextmanager
    def capture_signals(self):  # the gateway handles signals (Gateway.install_signal_handlers)
        yield


class HttpServer:
    def __init__(self, app: ASGIApp, *, host: str, port: int, grace_s: float, security: SecurityOptions) -> None:
        tls = {}
        if security.tls:
            tls = {"ssl_certfile": str(security.tls_cert), "ssl_keyfile": str(security.tls_key)}
            if security.tls_client_ca is not None:
                tls |= {"ssl_ca_certs": str(security.tls_client_ca), "ssl_cert_reqs": ssl.CERT_REQUIRED}
        self.config = uvicorn.Config(
            app, host=host, port=port, lifespan="off", log_config=None, http="h11", ws="none", server_header=False,
            timeout_graceful_shutdown=max(1, round(grace_s)), **tls,
        )
        self._server = _Server(self.config)
        self._task: asyncio.Task | None = None
        self.port = 0

    async def start(self) -> None:
        self.config.load()
        sock = _bind(self.config.host, self.config.port)  # now: a taken port fails the start, 0 gets a free one
        self.port = sock.getsockname()[1]
        self._task = asyncio.create_task(self._server.serve(sockets=[sock]), name="http")
        deadline = asyncio.get_running_loop().time() + START_TIMEOUT_S
        while not self._server.started:
            if self._task.done():
                self._task.result()  # raises what failed
                raise RuntimeError("the HTTP server stopped while starting")
            if asyncio.get_running_loop().time() > deadline:
                raise TimeoutError(f"the HTTP server did not start within {START_TIMEOUT_S:g}s")
            await asyncio.sleep(0.01)

    async def stop(self) -> None:
        """Stops accepting, lets responses in flight finish within the grace period, then cancels them."""
        if self._task is None:
            return
        self._server.should_exit = True
        with contextlib.suppress(asyncio.CancelledError):
            await self._task


def _bind(host: str, port: int) -> socket.socket:
    sock = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError as exc:
        sock.close()
        raise OSError(exc.errno, f"cannot bind the HTTP port {host}:{port}: {exc.strerror}") from exc
    return sock
