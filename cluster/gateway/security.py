"""Who may talk to the gateway: TLS / mTLS server credentials, API-key authentication and the receive limit.

This module knows nothing about the MixServe service or the engine: it reads the configured files once at
start (`load_security`), turns them into `grpc.ServerCredentials`, and checks `authorization: Bearer <key>`
metadata in a grpc.aio server interceptor. It reads no environment variables; paths come in as options.

Decisions:
- Every RPC needs a key except grpc.health.v1.Health and server reflection (v1 and v1alpha). Kubernetes
  probes and load balancers cannot send metadata. Health answers SERVING / NOT_SERVING for "" and
  mixserve.v1.MixServe only; reflection describes the public .proto and nothing else. GetModelInfo needs a key.
- Keys are compared as SHA-256 digests with `hmac.compare_digest` against every configured key, without an
  early exit, so neither the position of the matching key nor the key length shows in the timing.
- A rejected call gets UNAUTHENTICATED with a message that never contains what the client sent.
- TLS with a client CA requires and verifies client certificates (mTLS). With TLS on, the port speaks only
  TLS: a plaintext client never completes the handshake and sees UNAVAILABLE.
- Kubernetes gRPC probes speak plaintext only, so with TLS on the gateway can serve grpc.health.v1 alone on a
  separate plaintext port (`GatewayOptions.health_port`); nothing else is served there.
"""

from __future__ import annotations

import hashlib
import hmac
import logging
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass
from pathlib import Path

import grpc

log = logging.getLogger(__name__)

DEFAULT_MAX_MESSAGE_BYTES = 4 * 2**20
# Methods reachable without a key: probes and discovery (see the module docstring).
PUBLIC_METHOD_PREFIXES = (
    "/grpc.health.v1.Health/",
    "/grpc.reflection.v1.ServerReflection/",
    "/grpc.reflection.v1alpha.ServerReflection/",
)
MISSING_KEY = "missing API key: send metadata 'authorization: Bearer <key>'"
INVALID_KEY = "invalid API key"


class SecurityConfigError(ValueError):
    """A configured security file is unreadable, empty or malformed; the message names the file."""


@dataclass(frozen=True, kw_only=True)
class SecurityOptions:
    """Paths of the TLS material and the API-key file, and the gRPC receive limit. All off by default."""

    tls_cert: Path | None = None
    tls_key: Path | None = None
    tls_client_ca: Path | None = None
    api_keys_file: Path | None = None
    max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES

    def __post_init__(self) -> None:
        if (self.tls_cert is None) != (self.tls_key is None):
            given, missing = ("tls_cert", "tls_key") if self.tls_key is None else ("tls_key", "tls_cert")
            raise ValueError(f"{given} is set but {missing} is not: TLS needs both a certificate and its key")
        if self.tls_client_ca is not None and self.tls_cert is None:
            raise ValueError("tls_client_ca is set but tls_cert is not: client certificates need TLS")
        if self.max_message_bytes <= 0:
            raise ValueError(f"max_message_bytes must be positive, got {self.max_message_bytes}")

    @property
    def tls(self) -> bool:
        return self.tls_cert is not None

    @property
    def mtls(self) -> bool:
        return self.tls_client_ca is not None

    def describe(self) -> str:
        transport = "mTLS" if self.mtls else "TLS" if self.tls else "plaintext"
        auth = "API keys" if self.api_keys_file is not None else "no API keys"
        return f"{transport}, {auth}, max message {self.max_message_bytes} bytes"


@dataclass(frozen=True)
class SecurityMaterial:
    """What `load_security` read: server credentials (None = plaintext) and the digests of the API keys."""

    credentials: grpc.ServerCredentials | None
    key_digests: tuple[bytes, ...]


def load_security(options: SecurityOptions) -> SecurityMaterial:
    """Read every configured file once; raises SecurityConfigError naming the file that is wrong."""
    credentials = None
    if options.tls_cert is not None and options.tls_key is not None:
        ca = read_pem(options.tls_client_ca, "tls_client_ca") if options.tls_client_ca is not None else None
        credentials = grpc.ssl_server_credentials(
            [(read_pem(options.tls_key, "tls_key"), read_pem(options.tls_cert, "tls_cert"))],
            root_certificates=ca, require_client_auth=ca is not None,
        )
    digests = ()
    if options.api_keys_file is not None:
        digests = tuple(key_digest(k) for k in load_api_keys(options.api_keys_file))
    return SecurityMaterial(credentials, digests)


def read_pem(path: Path, option: str) -> bytes:
    data = _read(path, option)
    if b"-----BEGIN " not in data:
        raise SecurityConfigError(f"{option} file {path} is not PEM (no '-----BEGIN' line)")
    return data


def _read(path: Path, option: str) -> bytes:
    try:
        return Path(path).read_bytes()
    except OSError as exc:
        raise SecurityConfigError(f"{option} file {path} cannot be read: {exc.strerror or exc}") from exc


def parse_api_keys(text: str, source: str) -> tuple[str, ...]:
    """One key per line; blank lines and lines starting with '#' are ignored; duplicates collapse."""
    keys: dict[str, None] = {}
    for number, line in enumerate(text.splitlines(), start=1):
        key = line.strip()
        if not key or key.startswith("#"):
            continue
        if not (key.isascii() and key.isprintable()) or any(c.isspace() for c in key):
            raise SecurityConfigError(
                f"API key on line {number} of {source} has a space or a non-printable or non-ASCII character"
            )
        keys[key] = None
    if not keys:
        raise SecurityConfigError(f"API key file {source} holds no keys (only blank or '#' lines)")
    return tuple(keys)


def load_api_keys(path: Path, option: str = "api_keys_file") -> tuple[str, ...]:
    data = _read(path, option)
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise SecurityConfigError(f"{option} file {path} is not UTF-8 text") from exc
    return parse_api_keys(text, str(path))


def key_digest(key: str) -> bytes:
    return hashlib.sha256(key.encode()).digest()


def matches_any(presented: str, key_digests: Iterable[bytes]) -> bool:
    """Constant time in the presented key: one compare_digest per configured key, no early exit."""
    digest = key_digest(presented)
    matched = False
    for expected in key_digests:
        matched |= hmac.compare_digest(digest, expected)
    return matched


def bearer_token(metadata: Iterable[tuple[str, str | bytes]] | None) -> str | None:
    """The key of the single `authorization: Bearer <key>` entry, else None (absent, repeated or malformed)."""
    values = [value for key, value in (metadata or ()) if key == "authorization"]
    if len(values) != 1 or not isinstance(values[0], str):
        return None
    scheme, _, token = values[0].partition(" ")
    token = token.strip()
    return token if scheme.lower() == "bearer" and token else None


class ApiKeyInterceptor(grpc.aio.ServerInterceptor):
    """Lets a call through when it carries a configured key or names a public method; else UNAUTHENTICATED."""

    def __init__(self, key_digests: tuple[bytes, ...], public_prefixes: tuple[str, ...] = PUBLIC_METHOD_PREFIXES):
        assert key_digests, "ApiKeyInterceptor needs at least one key"
        self._key_digests = key_digests
        self._public_prefixes = public_prefixes

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler | None]],
        details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler | None:
        handler = await continuation(details)
        if handler is None or details.method.startswith(self._public_prefixes):
            return handler
        token = bearer_token(details.invocation_metadata)
        if token is not None and matches_any(token, self._key_digests):
            return handler
        log.debug("rejected %s: %s", details.method, "no key" if token is None else "wrong key")
        return _deny(handler, MISSING_KEY if token is None else INVALID_KEY)


def _deny(handler: grpc.RpcMethodHandler, message: str) -> grpc.RpcMethodHandler:
    """A handler of the same shape as `handler` that only aborts with UNAUTHENTICATED."""

    async def abort(_request, context: grpc.aio.ServicerContext) -> None:
        await context.abort(grpc.StatusCode.UNAUTHENTICATED, message)

    make = {
        (False, False): grpc.unary_unary_rpc_method_handler,
        (False, True): grpc.unary_stream_rpc_method_handler,
        (True, False): grpc.stream_unary_rpc_method_handler,
        (True, True): grpc.stream_stream_rpc_method_handler,
    }[(handler.request_streaming, handler.response_streaming)]
    return make(abort)
