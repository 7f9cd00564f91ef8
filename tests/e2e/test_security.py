"""Security end to end: a real gateway with TLS, required client certificates (mTLS), API keys and request
limits, plus the key-file parsing and the constant-time key check as units. Certificates are generated here."""

from __future__ import annotations

import datetime
import ipaddress
import os
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import grpc
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID
from grpc_health.v1 import health_pb2, health_pb2_grpc

from cluster import cli
from cluster.gateway import security
from cluster.gateway.security import SecurityConfigError, SecurityOptions
from cluster.gateway.server import GatewayOptions
from cluster.gateway.validation import RequestLimits
from protos import mixserve_pb2 as pb
from protos import mixserve_pb2_grpc as pb_grpc
from tests.e2e.harness import RunningGateway

ROOT = Path(__file__).resolve().parents[2]
KEYS = ("key-alpha-0123456789", "key-bravo-9876543210")
WRONG_KEY = "key-wrong-5555555555"
MAX_MESSAGE_BYTES = 64 * 1024
MAX_PROMPT_CHARS = 200  # the served model holds 256 tokens
pytestmark = pytest.mark.timeout(300)


# ---------------------------------------------------------------- certificates

@dataclass(frozen=True)
class Pki:
    ca: Path
    server_cert: Path
    server_key: Path
    client_cert: Path
    client_key: Path
    rogue_cert: Path  # a client certificate signed by a CA the server does not trust
    rogue_key: Path

    def credentials(self, *, client: str | None = "client") -> grpc.ChannelCredentials:
        if client is None:
            return grpc.ssl_channel_credentials(root_certificates=self.ca.read_bytes())
        cert, key = getattr(self, f"{client}_cert"), getattr(self, f"{client}_key")
        return grpc.ssl_channel_credentials(root_certificates=self.ca.read_bytes(), private_key=key.read_bytes(),
                                            certificate_chain=cert.read_bytes())


def _name(common_name: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])


def _issue(subject: str, key, issuer: x509.Name, issuer_key, *, ca: bool = False,
           san: list[x509.GeneralName] | None = None, usage=None) -> x509.Certificate:
    now = datetime.datetime.now(datetime.UTC)
    builder = (x509.CertificateBuilder().subject_name(_name(subject)).issuer_name(issuer)
               .public_key(key.public_key()).serial_number(x509.random_serial_number())
               .not_valid_before(now - datetime.timedelta(minutes=5)).not_valid_after(now + datetime.timedelta(days=1))
               .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True))
    if san:
        builder = builder.add_extension(x509.SubjectAlternativeName(san), critical=False)
    if usage:
        builder = builder.add_extension(x509.ExtendedKeyUsage([usage]), critical=False)
    return builder.sign(issuer_key, hashes.SHA256())


def _write(directory: Path, stem: str, cert: x509.Certificate, key) -> tuple[Path, Path]:
    cert_path, key_path = directory / f"{stem}.crt", directory / f"{stem}.key"
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                           serialization.NoEncryption()))
    return cert_path, key_path


def make_pki(directory: Path) -> Pki:
    ca_key, rogue_ca_key = ec.generate_private_key(ec.SECP256R1()), ec.generate_private_key(ec.SECP256R1())
    ca = _issue("mixserve test CA", ca_key, _name("mixserve test CA"), ca_key, ca=True)
    rogue_ca = _name("rogue CA")
    ca_path, _ = _write(directory, "ca", ca, ca_key)
    keys = {stem: ec.generate_private_key(ec.SECP256R1()) for stem in ("server", "client", "rogue")}
    san = [x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]
    server = _issue("localhost", keys["server"], ca.subject, ca_key, san=san, usage=ExtendedKeyUsageOID.SERVER_AUTH)
    client = _issue("client", keys["client"], ca.subject, ca_key, usage=ExtendedKeyUsageOID.CLIENT_AUTH)
    rogue = _issue("rogue", keys["rogue"], rogue_ca, rogue_ca_key, usage=ExtendedKeyUsageOID.CLIENT_AUTH)
    paths = {stem: _write(directory, stem, cert, keys[stem])
             for stem, cert in (("server", server), ("client", client), ("rogue", rogue))}
    return Pki(ca_path, *paths["server"], *paths["client"], *paths["rogue"])


# ---------------------------------------------------------------- the secured gateway

@pytest.fixture(scope="module")
def pki(tmp_path_factory) -> Pki:
    return make_pki(tmp_path_factory.mktemp("pki"))


@pytest.fixture(scope="module")
def keys_file(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("secret") / "api-keys"
    path.write_text(f"# mounted from a Kubernetes Secret\n\n{KEYS[0]}\n  {KEYS[1]}  \n# retired: old-key\n")
    return path


@pytest.fixture(scope="module")
def server(ray_cluster, served_model, pki, keys_file):
    options = GatewayOptions(
        port=0, metrics_port=0, grace_s=5, health_port=0,
        limits=RequestLimits(max_prompt_chars=MAX_PROMPT_CHARS),
        security=SecurityOptions(tls_cert=pki.server_cert, tls_key=pki.server_key, tls_client_ca=pki.ca,
                                 api_keys_file=keys_file, max_message_bytes=MAX_MESSAGE_BYTES),
    )
    with RunningGateway(served_model, workers=1, options=options) as running:
        yield running


@pytest.fixture(scope="module")
def secure(server, pki) -> grpc.Channel:
    return server.open_channel(pki.credentials())


def _auth(key: str) -> tuple[tuple[str, str], ...]:
    return (("authorization", f"Bearer {key}"),)


def _request(max_new: int = 3, **fields) -> pb.GenerateRequest:
    fields.setdefault("prompt_token_ids", [1, 5, 9])
    return pb.GenerateRequest(sampling=pb.SamplingParams(max_new_tokens=max_new, temperature=0, ignore_eos=True),
                              **fields)


def _assert_serving(channel: grpc.Channel) -> None:
    response = pb_grpc.MixServeStub(channel).Generate(_request(2), metadata=_auth(KEYS[0]), timeout=30)
    assert response.usage.completion_tokens == 2


def _code(call) -> grpc.RpcError:
    with pytest.raises(grpc.RpcError) as err:
        call()
    return err.value


def test_right_key_over_mtls_serves_every_rpc(secure):
    stub = pb_grpc.MixServeStub(secure)
    for key in KEYS:
        assert stub.Generate(_request(4), metadata=_auth(key), timeout=30).usage.completion_tokens == 4
    chunks = list(stub.GenerateStream(_request(5), metadata=(("authorization", f"bearer {KEYS[1]}"),), timeout=30))
    assert sum(len(c.token_ids) for c in chunks) == 5 and chunks[-1].finish_reason == "length"
    assert stub.GetModelInfo(pb.GetModelInfoRequest(), metadata=_auth(KEYS[0]), timeout=10).num_expert_workers == 1


@pytest.mark.parametrize("metadata", [
    (), _auth(WRONG_KEY), _auth(KEYS[0] + "x"), _auth(KEYS[0][:-1]), (("authorization", f"Basic {KEYS[0]}"),),
    (("authorization", "Bearer "),), (("x-api-key", KEYS[0]),), (*_auth(KEYS[0]), *_auth(WRONG_KEY)),
], ids=["none", "wrong", "longer", "shorter", "basic", "empty", "other-header", "repeated"])
def test_missing_or_wrong_key_is_unauthenticated_without_echo(secure, metadata):
    stub = pb_grpc.MixServeStub(secure)
    calls = (lambda: stub.Generate(_request(), metadata=metadata, timeout=10),
             lambda: list(stub.GenerateStream(_request(), metadata=metadata, timeout=10)),
             lambda: stub.GetModelInfo(pb.GetModelInfoRequest(), metadata=metadata, timeout=10))
    for call in calls:
        err = _code(call)
        assert err.code() == grpc.StatusCode.UNAUTHENTICATED, err
        assert "API key" in err.details()
        assert not any(k in err.details() for k in (*KEYS, WRONG_KEY, KEYS[0][:-1]))
    _assert_serving(secure)


def test_plaintext_client_never_completes_the_handshake(server, secure):
    plain = pb_grpc.MixServeStub(server.channel)
    err = _code(lambda: plain.Generate(_request(), metadata=_auth(KEYS[0]), timeout=5))
    assert err.code() == grpc.StatusCode.UNAVAILABLE
    health = health_pb2_grpc.HealthStub(server.channel)
    assert _code(lambda: health.Check(health_pb2.HealthCheckRequest(), timeout=5)).code() == grpc.StatusCode.UNAVAILABLE
    _assert_serving(secure)


@pytest.mark.parametrize("client", [None, "rogue"], ids=["no-client-cert", "untrusted-client-cert"])
def test_tls_without_a_trusted_client_certificate_fails(server, secure, pki, client):
    channel = server.open_channel(pki.credentials(client=client))
    err = _code(lambda: pb_grpc.MixServeStub(channel).Generate(_request(), metadata=_auth(KEYS[0]), timeout=5))
    assert err.code() == grpc.StatusCode.UNAVAILABLE
    _assert_serving(secure)


def test_health_and_reflection_need_no_key_and_tell_nothing_else(server, secure):
    from grpc_reflection.v1alpha import reflection_pb2 as refl

    for channel in (secure, server.open_channel(target=server.health_target)):
        stub = health_pb2_grpc.HealthStub(channel)
        for service in ("", "mixserve.v1.MixServe"):
            status = stub.Check(health_pb2.HealthCheckRequest(service=service), timeout=10).status
            assert status == health_pb2.HealthCheckResponse.SERVING
        err = _code(lambda stub=stub: stub.Check(health_pb2.HealthCheckRequest(service="ray"), timeout=10))
        assert err.code() == grpc.StatusCode.NOT_FOUND
    health_only = pb_grpc.MixServeStub(server.open_channel(target=server.health_target))
    err = _code(lambda: health_only.Generate(_request(), metadata=_auth(KEYS[0]), timeout=10))
    assert err.code() == grpc.StatusCode.UNIMPLEMENTED  # the plaintext probe port serves health alone
    call = secure.stream_stream(
        "/grpc.reflection.v1.ServerReflection/ServerReflectionInfo",
        request_serializer=refl.ServerReflectionRequest.SerializeToString,
        response_deserializer=refl.ServerReflectionResponse.FromString,
    )
    (response,) = list(call(iter([refl.ServerReflectionRequest(list_services="")]), timeout=10))
    assert "mixserve.v1.MixServe" in {s.name for s in response.list_services_response.service}


def test_oversize_message_is_resource_exhausted(secure):
    stub = pb_grpc.MixServeStub(secure)
    big = _request(prompt_token_ids=[300] * MAX_MESSAGE_BYTES)  # ~2 bytes per id
    assert big.ByteSize() > MAX_MESSAGE_BYTES
    for metadata in (_auth(KEYS[0]), ()):  # the limit holds with or without a key
        err = _code(lambda metadata=metadata: stub.Generate(big, metadata=metadata, timeout=10))
        assert err.code() == grpc.StatusCode.RESOURCE_EXHAUSTED, err
    _assert_serving(secure)


def test_prompt_over_max_prompt_chars_is_invalid_argument(secure):
    stub = pb_grpc.MixServeStub(secure)
    err = _code(lambda: stub.Generate(_request(prompt="x" * (MAX_PROMPT_CHARS + 1), prompt_token_ids=[]),
                                      metadata=_auth(KEYS[0]), timeout=10))
    assert err.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert err.details().startswith("prompt"), err.details()
    ok = stub.Generate(_request(prompt="x" * MAX_PROMPT_CHARS, prompt_token_ids=[]), metadata=_auth(KEYS[0]),
                       timeout=30)
    assert ok.usage.completion_tokens == 3


def _client(server: RunningGateway, pki: Pki, *extra: str, env: dict[str, str] | None = None):
    environ = {k: v for k, v in os.environ.items() if k != cli.API_KEY_ENV} | {"PYTHONPATH": str(ROOT)}
    return subprocess.run(
        [sys.executable, "-m", "cluster.cli", "client", "--target", server.target, "--token-ids", "1,5,9",
         "--max-new-tokens", "6", "--ignore-eos", "--tls-ca", str(pki.ca), "--tls-cert", str(pki.client_cert),
         "--tls-key", str(pki.client_key), *extra],
        capture_output=True, text=True, env=environ | (env or {}), timeout=60, check=False)


def test_client_command_streams_over_mtls_with_an_api_key_file(server, pki, tmp_path):
    key_file = tmp_path / "key"
    key_file.write_text(f"{KEYS[1]}\n")
    run = _client(server, pki, "--api-key-file", str(key_file))
    assert run.returncode == 0, run.stderr
    assert "[length: 3 prompt + 6 completion tokens" in run.stderr
    from_env = _client(server, pki, env={cli.API_KEY_ENV: KEYS[0]})
    assert from_env.returncode == 0, from_env.stderr
    missing = _client(server, pki)
    assert missing.returncode == 1 and "UNAUTHENTICATED" in missing.stderr


def test_server_still_serves_after_everything(secure):
    _assert_serving(secure)


# ---------------------------------------------------------------- units: keys, options, CLI start-up checks

def test_key_file_parsing_ignores_comments_blanks_and_duplicates(tmp_path):
    assert security.parse_api_keys(f"# c\n\n  {KEYS[0]}\t\n{KEYS[1]}\n{KEYS[0]}\n#{WRONG_KEY}\n", "f") == KEYS
    path = tmp_path / "keys"
    path.write_text("\n".join(KEYS) + "\n")
    assert security.load_api_keys(path) == KEYS


@pytest.mark.parametrize(("content", "needle"), [
    (None, "cannot be read"), ("", "holds no keys"), ("# only\n\n   \n", "holds no keys"),
    ("good-key\nkey with space\n", "line 2"), ("clé-secrète\n", "line 1"),
])
def test_bad_key_files_are_errors_naming_the_file_and_not_the_key(tmp_path, content, needle):
    path = tmp_path / "keys"
    if content is not None:
        path.write_text(content)
    with pytest.raises(SecurityConfigError) as err:
        security.load_security(SecurityOptions(api_keys_file=path))
    assert str(path) in str(err.value) and needle in str(err.value)
    assert "secrète" not in str(err.value) and "with space" not in str(err.value)


def test_key_check_compares_against_every_key_without_early_exit(monkeypatch):
    digests = tuple(security.key_digest(k) for k in (*KEYS, "third-key"))
    assert security.matches_any(KEYS[0], digests) and security.matches_any("third-key", digests)
    assert not security.matches_any(WRONG_KEY, digests) and not security.matches_any("", digests)
    assert not security.matches_any(KEYS[0], ())
    calls = []
    real = security.hmac.compare_digest
    monkeypatch.setattr(security.hmac, "compare_digest", lambda a, b: calls.append((len(a), len(b))) or real(a, b))
    for presented in (KEYS[0], "x", WRONG_KEY * 10):
        calls.clear()
        security.matches_any(presented, digests)
        assert calls == [(32, 32)] * 3  # every key, fixed-length digests: no length or position leaks


def test_bearer_token_parsing():
    assert security.bearer_token(_auth("abc")) == "abc"
    assert security.bearer_token((("authorization", "BEARER  abc "),)) == "abc"
    for bad in ((), None, (("authorization", "Basic abc"),), (("authorization", "Bearer"),),
                (*_auth("a"), *_auth("a"))):
        assert security.bearer_token(bad) is None


@pytest.mark.parametrize(("kwargs", "needle"), [
    ({"tls_key": Path("k")}, "tls_key is set but tls_cert is not"),
    ({"tls_cert": Path("c")}, "tls_cert is set but tls_key is not"),
    ({"tls_client_ca": Path("ca")}, "tls_client_ca is set but tls_cert is not"),
    ({"max_message_bytes": 0}, "max_message_bytes"),
])
def test_security_options_name_the_conflict(kwargs, needle):
    with pytest.raises(ValueError, match=needle):
        SecurityOptions(**kwargs)


def test_gateway_options_reject_a_prompt_limit_larger_than_a_message():
    with pytest.raises(ValueError, match="max_prompt_chars"):
        GatewayOptions(limits=RequestLimits(max_prompt_chars=5000), security=SecurityOptions(max_message_bytes=4096))


def test_tls_files_that_are_missing_or_not_pem_are_named(tmp_path, pki):
    not_pem = tmp_path / "server.crt"
    not_pem.write_text("hello")
    with pytest.raises(SecurityConfigError) as err:
        security.load_security(SecurityOptions(tls_cert=not_pem, tls_key=pki.server_key))
    assert f"tls_cert file {not_pem} is not PEM" in str(err.value)
    missing = tmp_path / "missing.pem"
    with pytest.raises(SecurityConfigError) as err:
        security.load_security(SecurityOptions(tls_cert=pki.server_cert, tls_key=pki.server_key, tls_client_ca=missing))
    assert f"tls_client_ca file {missing} cannot be read" in str(err.value)


@pytest.mark.parametrize(("flags", "needle"), [
    (["--api-keys-file", "{empty}"], "{empty} holds no keys"),
    (["--api-keys-file", "{missing}"], "{missing} cannot be read"),
    (["--tls-key", "{empty}"], "tls_key is set but tls_cert is not"),
])
def test_serve_refuses_to_start_before_the_cluster_on_bad_security_flags(tmp_path, capsys, flags, needle):
    paths = {"empty": tmp_path / "empty", "missing": tmp_path / "missing"}
    paths["empty"].write_text("# nothing yet\n")
    argv = ["serve", "--model", str(tmp_path), *(f.format(**paths) for f in flags)]
    assert cli.main(argv) == 2
    assert needle.format(**paths) in capsys.readouterr().err
