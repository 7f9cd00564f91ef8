"""`mixserve client`: stream a completion from a running server to the terminal.

Transport and credentials come in as a `ClientSecurity`; this module reads the files it names and nothing
from the environment (cli.py decides where the API key comes from).
"""

from __future__ import annotations

import sys
from dataclasses import dataclass
from pathlib import Path

import grpc

from cluster.gateway.security import read_pem
from protos import mixserve_pb2 as pb
from protos import mixserve_pb2_grpc as pb_grpc


@dataclass(frozen=True, kw_only=True)
class ClientSecurity:
    """TLS is on when `tls` is set or any TLS file is given; without `tls_ca` the system roots verify the server."""

    tls: bool = False
    tls_ca: Path | None = None
    tls_cert: Path | None = None
    tls_key: Path | None = None
    tls_server_name: str | None = None
    api_key: str | None = None

    def __post_init__(self) -> None:
        if (self.tls_cert is None) != (self.tls_key is None):
            given, missing = ("tls_cert", "tls_key") if self.tls_key is None else ("tls_key", "tls_cert")
            raise ValueError(f"{given} is set but {missing} is not: a client certificate needs its key")
        if self.tls_server_name is not None and not self.uses_tls:
            raise ValueError("tls_server_name is set but TLS is not (set tls or tls_ca)")
        if self.api_key is not None and (not self.api_key or any(c.isspace() for c in self.api_key)):
            raise ValueError("api_key must be non-empty and free of whitespace")

    @property
    def uses_tls(self) -> bool:
        return self.tls or self.tls_ca is not None or self.tls_cert is not None

    def channel(self, target: str) -> grpc.Channel:
        if not self.uses_tls:
            return grpc.insecure_channel(target)
        credentials = grpc.ssl_channel_credentials(
            root_certificates=read_pem(self.tls_ca, "tls_ca") if self.tls_ca else None,
            private_key=read_pem(self.tls_key, "tls_key") if self.tls_key else None,
            certificate_chain=read_pem(self.tls_cert, "tls_cert") if self.tls_cert else None,
        )
        options = [("grpc.ssl_target_name_override", self.tls_server_name)] if self.tls_server_name else []
        return grpc.secure_channel(target, credentials, options=options)

    def metadata(self) -> tuple[tuple[str, str], ...]:
        return (("authorization", f"Bearer {self.api_key}"),) if self.api_key else ()


def stream_completion(target: str, request: pb.GenerateRequest, *, timeout_s: float,
                      security: ClientSecurity | None = None, out=sys.stdout) -> int:
    security = security or ClientSecurity()
    with security.channel(target) as channel:
        stub = pb_grpc.MixServeStub(channel)
        try:
            for chunk in stub.GenerateStream(request, timeout=timeout_s, metadata=security.metadata()):
                out.write(chunk.text if chunk.text or not chunk.token_ids else f" {list(chunk.token_ids)}")
                out.flush()
                if chunk.finish_reason:
                    usage = chunk.usage
                    print(f"\n[{chunk.finish_reason}: {usage.prompt_tokens} prompt + "
                          f"{usage.completion_tokens} completion tokens, "
                          f"{chunk.timings.total_seconds:.2f}s]", file=sys.stderr)
        except grpc.RpcError as exc:
            print(f"mixserve: {exc.code().name}: {exc.details()}", file=sys.stderr)
            return 1
    return 0
