"""Gateway TLS, mTLS and API keys in the Helm chart (gateway.tls.*, gateway.apiKeys.*): the Secrets are
mounted read-only into the head pod only, `mixserve serve` gets the matching flags, the probes keep working
(Kubernetes' gRPC probes cannot speak TLS, so with TLS on they use the gateway's plaintext health-only port),
and enabling a part without naming its Secret fails `helm template` and `helm lint`."""

from __future__ import annotations

import posixpath

import pytest

from cluster.gateway.security import PUBLIC_METHOD_PREFIXES
from tests.deploy.helpers import (
    NAMESPACE,
    fullname,
    head_container,
    head_template,
    helm_lint,
    helm_template,
    render,
    render_notes,
    serve_args,
    service_selects,
    validate_rendered,
    worker_templates,
)

TLS = ("--set", "gateway.tls.enabled=true", "--set", "gateway.tls.existingSecret=gw-tls")
MTLS = (*TLS, "--set", "gateway.tls.clientCA.enabled=true", "--set", "gateway.tls.clientCA.existingSecret=gw-ca",
        "--set", "gateway.tls.clientCA.key=bundle.pem")
KEYS = ("--set", "gateway.apiKeys.enabled=true", "--set", "gateway.apiKeys.existingSecret=gw-keys",
        "--set", "gateway.apiKeys.key=keys.txt")
CASES = {"off": (), "tls": TLS, "mtls": MTLS, "api-keys": KEYS, "tls+api-keys": (*TLS, *KEYS),
         "mtls+api-keys": (*MTLS, *KEYS)}
# (values file, extra args): every case on plain workloads, and everything on at once on KubeRay
RENDERS = [*((None, args) for args in CASES.values()), ("kuberay-values.yaml", (*MTLS, *KEYS))]
RENDER_IDS = [*CASES, "kuberay-mtls+api-keys"]
GATEWAY_VOLUMES = {"gateway-tls", "gateway-client-ca", "gateway-api-keys"}
# serve flag -> (volume, Secret key it must come from), per case
TLS_FLAGS = {"tls-cert": ("gateway-tls", "tls.crt"), "tls-key": ("gateway-tls", "tls.key")}
CA_FLAGS = {"tls-client-ca": ("gateway-client-ca", "bundle.pem")}
KEY_FLAGS = {"api-keys-file": ("gateway-api-keys", "keys.txt")}
SECRET_NAMES = {"gateway-tls": "gw-tls", "gateway-client-ca": "gw-ca", "gateway-api-keys": "gw-keys"}


def expected_flags(args: tuple[str, ...]) -> dict[str, tuple[str, str]]:
    on = set(args)
    flags = {}
    if "gateway.tls.enabled=true" in on:
        flags |= TLS_FLAGS
    if "gateway.tls.clientCA.enabled=true" in on:
        flags |= CA_FLAGS
    if "gateway.apiKeys.enabled=true" in on:
        flags |= KEY_FLAGS
    return flags


def tls_on(args: tuple[str, ...]) -> bool:
    return "gateway.tls.enabled=true" in args


def volumes_of(template: dict) -> dict[str, dict]:
    return {v["name"]: v for v in template["spec"]["volumes"]}


def mounts_of(container: dict) -> dict[str, dict]:
    return {m["name"]: m for m in container["volumeMounts"]}


# ------------------------------------------------------------------ volumes, mounts and flags


@pytest.mark.parametrize(("values_file", "args"), RENDERS, ids=RENDER_IDS)
def test_secrets_are_mounted_read_only_where_the_flags_point(values_file, args):
    r = render(values_file, *args)
    flags = expected_flags(args)
    serve = serve_args(r)
    volumes = volumes_of(head_template(r))
    mounts = mounts_of(head_container(r))
    wanted = {volume for volume, _ in flags.values()}
    assert GATEWAY_VOLUMES & volumes.keys() == wanted, sorted(volumes)
    assert GATEWAY_VOLUMES & mounts.keys() == wanted, sorted(mounts)
    assert {"tls-cert", "tls-key", "tls-client-ca", "api-keys-file"} & serve.keys() == flags.keys(), serve
    for flag, (volume_name, secret_key) in flags.items():
        directory, filename = posixpath.split(serve[flag])
        mount = mounts[volume_name]
        assert mount["mountPath"] == directory, (flag, serve[flag], mount)
        assert mount["readOnly"] is True, mount
        assert "subPath" not in mount, "a subPath mount would never see a rotated Secret"
        secret = volumes[volume_name]["secret"]
        assert secret["secretName"] == SECRET_NAMES[volume_name]
        assert {"key": secret_key, "path": filename} in secret["items"], (flag, secret["items"])
        assert secret["defaultMode"] == 0o440, "keys readable by the fsGroup only, not by every user"
        assert "optional" not in secret, "a missing Secret must keep the pod from starting"
    assert len({m["mountPath"] for m in mounts.values()}) == len(mounts), "two volumes on one path"


@pytest.mark.parametrize(("values_file", "args"), RENDERS, ids=RENDER_IDS)
def test_worker_pods_never_see_the_gateway_secrets(values_file, args):
    r = render(values_file, *args)
    assert worker_templates(r)
    for template in worker_templates(r):
        assert not GATEWAY_VOLUMES & volumes_of(template).keys()
        for c in template["spec"]["containers"]:
            assert not GATEWAY_VOLUMES & mounts_of(c).keys()
            assert "/etc/mixserve" not in str(c["args"])


def test_client_ca_may_come_from_the_tls_secret_itself():
    """cert-manager puts the issuer's CA into ca.crt of the certificate Secret."""
    r = render(None, *TLS, "--set", "gateway.tls.clientCA.enabled=true",
               "--set", "gateway.tls.clientCA.existingSecret=gw-tls")
    volumes = volumes_of(head_template(r))
    assert volumes["gateway-client-ca"]["secret"]["secretName"] == "gw-tls"
    assert volumes["gateway-client-ca"]["secret"]["items"] == [{"key": "ca.crt", "path": "ca.crt"}]
    assert volumes["gateway-tls"]["secret"]["items"] == [{"key": "tls.crt", "path": "tls.crt"},
                                                         {"key": "tls.key", "path": "tls.key"}]
    assert serve_args(r)["tls-client-ca"] == "/etc/mixserve/client-ca/ca.crt"


# ------------------------------------------------------------------ probes and ports


@pytest.mark.parametrize(("values_file", "args"), RENDERS, ids=RENDER_IDS)
def test_probes_use_a_port_that_answers_them(values_file, args):
    """Kubelet's gRPC probe speaks plaintext and sends no metadata: with TLS on it must target the gateway's
    plaintext health-only port (--health-port); API keys never guard grpc.health.v1, so keys change nothing."""
    assert any("/grpc.health.v1.Health/".startswith(p) for p in PUBLIC_METHOD_PREFIXES), (
        "the gateway now wants a key for health checks: the chart's probes would fail with API keys on"
    )
    r = render(values_file, *args)
    head = head_container(r)
    ports = {p["name"]: p["containerPort"] for p in head["ports"]}
    serve = serve_args(r)
    assert ports["grpc"] == int(serve["port"]) == 50051
    if tls_on(args):
        assert serve["health-port"] == "50052"
        assert ports["grpc-health"] == 50052
        probe_port = 50052
    else:
        assert "health-port" not in serve and "grpc-health" not in ports
        probe_port = 50051
    assert len(set(ports.values())) == len(ports), ports
    for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
        assert head[probe]["grpc"] == {"port": probe_port}, (probe, head[probe])
        assert not {"httpGet", "exec", "tcpSocket"} & head[probe].keys(), probe
    assert head["startupProbe"]["failureThreshold"] == 90, "the user's probe settings survive"


@pytest.mark.parametrize(("values_file", "args"), RENDERS, ids=RENDER_IDS)
def test_services_expose_only_what_they_should(values_file, args):
    r = render(values_file, *args)
    labels = head_template(r)["metadata"]["labels"]
    grpc_port, http_port = r.get("Service", fullname())["spec"]["ports"]
    assert (grpc_port["name"], grpc_port["port"], grpc_port["targetPort"]) == ("grpc", 50051, "grpc")
    scheme = "https" if tls_on(args) else "http"  # the HTTP API shares the gRPC port's TLS
    assert (http_port["name"], http_port["port"], http_port["targetPort"], http_port["appProtocol"]) == (
        "http", 8000, "http", scheme)
    (metrics_port,) = r.get("Service", f"{fullname()}-metrics")["spec"]["ports"]
    assert (metrics_port["name"], metrics_port["port"], metrics_port["appProtocol"]) == ("http-metrics", 9400, "http")
    assert "--metrics-port=9400" in head_container(r)["args"][0]
    health = [s for s in r.of_kind("Service") if s["metadata"]["name"] == f"{fullname()}-health"]
    if not tls_on(args):
        assert not health
        return
    (svc,) = health
    assert svc["spec"]["type"] == "ClusterIP", "the plaintext health port stays inside the cluster"
    (port,) = svc["spec"]["ports"]
    assert (port["port"], port["targetPort"], port["appProtocol"]) == (50052, "grpc-health", "grpc")
    assert service_selects(svc["spec"]["selector"], labels)
    assert not any(service_selects(svc["spec"]["selector"], t["metadata"]["labels"]) for t in worker_templates(r))


def test_metrics_scraping_is_unchanged_by_tls():
    base, secured = render("gpu-multinode-values.yaml"), render("gpu-multinode-values.yaml", *MTLS, *KEYS)
    for kind in ("ServiceMonitor", "PrometheusRule"):
        assert base.of_kind(kind) == secured.of_kind(kind), kind
    assert base.get("Service", f"{fullname()}-metrics") == secured.get("Service", f"{fullname()}-metrics")


@pytest.mark.parametrize("name", list(CASES))
def test_helm_test_pod_checks_health_where_it_answers(name):
    args = CASES[name]
    (pod,) = render(None, *args).of_kind("Pod")
    script = pod["spec"]["containers"][0]["command"][2]
    compile(script, "helm-test", "exec")
    mtls = "gateway.tls.clientCA.enabled=true" in args
    if tls_on(args):
        assert f'target = "{fullname()}-health.{NAMESPACE}.svc:50052"' in script, script
    else:
        assert f'target = "{fullname()}.{NAMESPACE}.svc:50051"' in script, script
    # without mTLS the pod also checks that the gRPC Service speaks TLS; with mTLS it has no client certificate
    assert ("wrap_socket" in script) == (tls_on(args) and not mtls), script
    assert "volumes" not in pod["spec"], "the test pod mounts no Secret"


# ------------------------------------------------------------------ lint and Kubernetes schemas


@pytest.mark.parametrize(("values_file", "args"), RENDERS, ids=RENDER_IDS)
def test_helm_lint_strict(values_file, args):
    out = helm_lint(values_file, *args).stdout
    assert "0 chart(s) failed" in out, out


@pytest.mark.parametrize(("values_file", "args"), RENDERS, ids=RENDER_IDS)
def test_objects_match_kubernetes_schemas(values_file, args):
    validate_rendered(render(values_file, *args))


# ------------------------------------------------------------------ values the chart must refuse

# (args, what the schema says: helm template and helm lint, what the template says: --skip-schema-validation)
REFUSED = [
    (("--set", "gateway.tls.enabled=true"), "/gateway/tls/existingSecret",
     "gateway.tls.enabled needs gateway.tls.existingSecret"),
    ((*TLS, "--set", "gateway.tls.clientCA.enabled=true"), "/gateway/tls/clientCA/existingSecret",
     "gateway.tls.clientCA.enabled needs gateway.tls.clientCA.existingSecret"),
    (("--set", "gateway.apiKeys.enabled=true"), "/gateway/apiKeys/existingSecret",
     "gateway.apiKeys.enabled needs gateway.apiKeys.existingSecret"),
    (("--set", "gateway.tls.clientCA.enabled=true", "--set", "gateway.tls.clientCA.existingSecret=gw-ca"),
     "/gateway/tls/enabled", "gateway.tls.clientCA.enabled needs gateway.tls.enabled"),
]


@pytest.mark.parametrize(("args", "schema_message", "template_message"), REFUSED, ids=[m for _, m, _ in REFUSED])
def test_enabling_without_a_secret_fails_template_and_lint(args, schema_message, template_message):
    proc = helm_template(None, *args, check=False)
    assert proc.returncode != 0, f"rendered although {args}"
    assert schema_message in proc.stderr, proc.stderr
    lint = helm_lint(None, *args, check=False)
    assert lint.returncode != 0, lint.stdout
    assert schema_message in lint.stdout + lint.stderr, lint.stdout + lint.stderr
    # the templates refuse on their own too, with a sentence naming the value to set
    proc = helm_template(None, *args, "--skip-schema-validation", check=False)
    assert proc.returncode != 0 and template_message in proc.stderr, proc.stderr


@pytest.mark.parametrize("port", ["50051", "9400", "6379"])
def test_health_port_must_not_collide(port):
    proc = helm_template(None, *TLS, "--set", f"gateway.tls.healthPort={port}", check=False)
    assert proc.returncode != 0, f"rendered with gateway.tls.healthPort={port}"
    assert f"gateway.tls.healthPort ({port}) must differ from" in proc.stderr, proc.stderr


@pytest.mark.parametrize("args", [("--set", "gateway.tls.existingSecret=Not_A_Name", *TLS[:2]),
                                  ("--set", "gateway.apiKeys.tokens=x")], ids=["bad-secret-name", "unknown-value"])
def test_schema_rejects_malformed_gateway_values(args):
    proc = helm_template(None, *args, check=False)
    assert proc.returncode != 0 and "/gateway/" in proc.stderr, proc.stderr


# ------------------------------------------------------------------ NOTES.txt


def test_notes_explain_how_to_call_a_secured_gateway(tmp_path):
    text = render_notes(tmp_path, None, *MTLS, *KEYS)
    assert "<no value>" not in text, text
    assert "TLS with the certificate of Secret gw-tls" in text
    assert "signed by the CA in Secret gw-ca (bundle.pem)" in text
    assert "from Secret gw-keys (keys.txt); health and reflection stay open" in text
    assert "grpcurl -plaintext" not in text, "a TLS gateway refuses plaintext clients"
    assert "-cacert ca.crt" in text and "-cert client.crt -key client.key" in text
    generate = [ln for ln in text.splitlines() if "-d '" in ln]
    assert generate and all('-H "authorization: Bearer $MIXSERVE_API_KEY"' in ln for ln in generate), generate
    assert "port 50052" in text and f"{fullname()}-health" in text
    assert "serves every client" not in text


def test_notes_warn_about_an_open_gateway(tmp_path):
    text = render_notes(tmp_path)
    assert "plaintext (gateway.tls.enabled=false)" in text and "off (gateway.apiKeys.enabled=false)" in text
    assert "grpcurl -plaintext localhost:50051 grpc.health.v1.Health/Check" in text
    assert "authorization" not in text
    assert "the gRPC gateway serves every client that reaches it, in plaintext" in text
    # TLS alone encrypts but admits anyone: still worth the note, without the plaintext part
    text = render_notes(tmp_path / "tls", None, *TLS)
    assert "serves every client that reaches it:" in text and "in plaintext" not in text, text
