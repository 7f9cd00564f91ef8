"""The Helm chart (helm/mixserve): lint, render for every value set, validate the built-in objects
against the Kubernetes 1.30 schemas, and check what each render must contain."""

from __future__ import annotations

import base64
import re

import pytest
import yaml

from tests.deploy.helpers import (
    CI_VALUES,
    CRD_KINDS,
    NAMESPACE,
    RELEASE,
    containers,
    fullname,
    head_container,
    head_slots,
    head_template,
    helm_lint,
    helm_template,
    pod_templates,
    render,
    render_notes,
    run,
    selects,
    serve_args,
    service_selects,
    validate_kubernetes,
    worker_slots,
    worker_templates,
)

VALUE_SETS = [None, "cpu-values.yaml", "gpu-multinode-values.yaml", "gpu-infiniband-values.yaml",
              "kuberay-values.yaml"]
GPU = "nvidia.com/gpu"


def ids(value_file: str | None) -> str:
    return value_file or "defaults"


def env_of(container: dict) -> dict[str, dict]:
    return {e["name"]: e for e in container.get("env", [])}


def gpu_limit(container: dict) -> int:
    return int(container.get("resources", {}).get("limits", {}).get(GPU, 0))


# ------------------------------------------------------------------ lint and schema validation


def test_ci_value_sets_exist():
    assert sorted(p.name for p in CI_VALUES.glob("*.yaml")) == sorted(v for v in VALUE_SETS if v)


@pytest.mark.parametrize("values_file", VALUE_SETS, ids=ids)
def test_helm_lint_strict(values_file):
    out = helm_lint(values_file).stdout
    assert "0 chart(s) failed" in out, out


@pytest.mark.parametrize("values_file", VALUE_SETS, ids=ids)
def test_builtin_objects_match_kubernetes_schemas(values_file):
    r = render(values_file)
    builtin = [o for o in r.objects if o["kind"] not in CRD_KINDS]
    assert builtin, r.names()
    for obj in builtin:
        validate_kubernetes(obj, f"{obj['kind']}/{obj['metadata']['name']} ({ids(values_file)})")


@pytest.mark.parametrize("values_file", VALUE_SETS, ids=ids)
def test_pod_templates_inside_raycluster_match_kubernetes_schemas(values_file):
    for owner, template in pod_templates(render(values_file)):
        wrapped = {"apiVersion": "v1", "kind": "PodTemplate", "metadata": {"name": "t"}, "template": template}
        validate_kubernetes(wrapped, f"pod template of {owner} ({ids(values_file)})")


# ------------------------------------------------------------------ properties of every render


@pytest.mark.parametrize("values_file", VALUE_SETS, ids=ids)
def test_every_object_has_the_helm_labels(values_file):
    for obj in render(values_file).objects:
        labels = obj["metadata"].get("labels", {})
        for key in ("helm.sh/chart", "app.kubernetes.io/managed-by"):
            assert key in labels, f"{obj['kind']}/{obj['metadata']['name']} lacks label {key}"
        assert labels.get("app.kubernetes.io/instance") == RELEASE, obj["metadata"]
        assert labels.get("app.kubernetes.io/name") == "mixserve", obj["metadata"]


@pytest.mark.parametrize("values_file", VALUE_SETS, ids=ids)
def test_pods_run_as_non_root_with_no_capabilities(values_file):
    """Every container drops ALL capabilities; the one ever added back is IPC_LOCK, on the rank containers only
    (ray-head, ray-worker: never the init container or the test pod), and only where rdma.enabled asks for it."""
    rdma = yaml.safe_load((CI_VALUES / values_file).read_text()).get("rdma", {}) if values_file else {}
    ipc_lock = bool(rdma.get("enabled") and rdma.get("ipcLock", True))
    for owner, template in pod_templates(render(values_file)) + _test_pods(values_file):
        spec = template["spec"]
        psc = spec["securityContext"]
        assert psc["runAsNonRoot"] is True and psc["runAsUser"] != 0, owner
        assert psc["seccompProfile"]["type"] == "RuntimeDefault", owner
        assert spec.get("automountServiceAccountToken") is False, owner
        for c in containers(spec):
            sc = c["securityContext"]
            assert sc["allowPrivilegeEscalation"] is False, (owner, c["name"])
            assert sc["capabilities"]["drop"] == ["ALL"], (owner, c["name"])
            if ipc_lock and c["name"] in {"ray-head", "ray-worker"}:
                assert sc["capabilities"]["add"] == ["IPC_LOCK"], (owner, c["name"])
            else:
                assert "add" not in sc["capabilities"], (owner, c["name"])
            assert sc["readOnlyRootFilesystem"] is True, (owner, c["name"])
            assert sc.get("privileged") is not True, (owner, c["name"])


def _test_pods(values_file):
    return [(f"Pod/{p['metadata']['name']}", p) for p in render(values_file).of_kind("Pod")]


@pytest.mark.parametrize("values_file", VALUE_SETS, ids=ids)
def test_ray_pods_have_writable_tmp_and_shm(values_file):
    for owner, template in pod_templates(render(values_file)):
        volumes = {v["name"]: v for v in template["spec"]["volumes"]}
        assert volumes["dshm"]["emptyDir"]["medium"] == "Memory", owner
        assert "emptyDir" in volumes["tmp"], owner
        for c in template["spec"]["containers"]:
            mounts = {m["mountPath"]: m["name"] for m in c["volumeMounts"]}
            assert mounts["/tmp"] == "tmp" and mounts["/dev/shm"] == "dshm", owner
            assert env_of(c)["HOME"]["value"].startswith("/tmp"), owner


@pytest.mark.parametrize("values_file", VALUE_SETS, ids=ids)
def test_grpc_service_reaches_the_head_with_native_grpc_probes(values_file):
    r = render(values_file)
    svc = r.get("Service", fullname())
    grpc_port, http_port = svc["spec"]["ports"]
    assert grpc_port["port"] == 50051 and grpc_port["appProtocol"] == "grpc" and grpc_port["name"] == "grpc"
    assert (http_port["name"], http_port["port"], http_port["targetPort"]) == ("http", 8000, "http")
    template = head_template(r)
    assert service_selects(svc["spec"]["selector"], template["metadata"]["labels"])
    assert not any(service_selects(svc["spec"]["selector"], t["metadata"]["labels"]) for t in worker_templates(r))
    head = head_container(r)
    container_ports = {p["name"]: p["containerPort"] for p in head["ports"]}
    assert container_ports["grpc"] == 50051 and container_ports["http-metrics"] == 9400
    assert container_ports["http"] == 8000
    assert container_ports["gcs-server"] == 6379 and container_ports["dashboard"] == 8265
    for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
        assert head[probe]["grpc"] == {"port": 50051}, (probe, head[probe])
        assert not {"httpGet", "exec", "tcpSocket"} & head[probe].keys(), probe


@pytest.mark.parametrize("values_file", VALUE_SETS, ids=ids)
def test_metrics_service_exposes_the_gateway_metrics_port(values_file):
    r = render(values_file)
    svc = r.get("Service", f"{fullname()}-metrics")
    assert svc["metadata"]["labels"]["app.kubernetes.io/component"] == "metrics"
    (port,) = svc["spec"]["ports"]
    assert (port["name"], port["port"], port["targetPort"]) == ("http-metrics", 9400, "http-metrics")
    assert service_selects(svc["spec"]["selector"], head_template(r)["metadata"]["labels"])


@pytest.mark.parametrize("values_file", VALUE_SETS, ids=ids)
def test_serve_command_line(values_file):
    r = render(values_file)
    args = serve_args(r)
    assert args["host"] == "0.0.0.0" and args["port"] == "50051"
    assert args["metrics-host"] == "0.0.0.0" and args["metrics-port"] == "9400"
    assert args["http-port"] == "8000" and "no-http" not in args
    assert args["ray-address"] == "auto"
    assert args["device"] in {"cuda", "cpu"} and int(args["workers"]) >= 1
    assert args["coordinators"] == "1", "every value set keeps the default, rendered like --workers"
    assert args["placement"] in {"PACK", "SPREAD", "STRICT_PACK", "STRICT_SPREAD"}
    # one Ray bundle per rank (coordinators + expert workers), from the head and the worker pods together
    ranks = int(args["workers"]) + int(args["coordinators"])
    assert head_slots(r) + worker_slots(r) >= ranks, (head_slots(r), worker_slots(r), ranks)


@pytest.mark.parametrize("values_file", VALUE_SETS, ids=ids)
def test_ray_token_auth_comes_from_a_secret(values_file):
    r = render(values_file)
    refs = set()
    for owner, template in pod_templates(r):
        for c in template["spec"]["containers"]:
            env = env_of(c)
            assert env["RAY_AUTH_MODE"]["value"] == "token", owner
            ref = env["RAY_AUTH_TOKEN"]["valueFrom"]["secretKeyRef"]
            refs.add((ref["name"], ref["key"]))
            assert "value" not in env["RAY_AUTH_TOKEN"], owner
    assert len(refs) == 1, refs
    ((name, key),) = refs
    secrets = r.of_kind("Secret")
    if values_file == "kuberay-values.yaml":  # an existing Secret: the chart must not create one
        assert name == "mixserve-ray-token" and not secrets
    else:
        secret = r.get("Secret", name)
        assert len(base64.b64decode(secret["data"][key])) >= 32


@pytest.mark.parametrize("values_file", VALUE_SETS, ids=ids)
def test_pod_disruption_budget_covers_head_and_workers(values_file):
    r = render(values_file)
    pdbs = r.of_kind("PodDisruptionBudget")
    if values_file == "cpu-values.yaml":
        assert not pdbs
        return
    (pdb,) = pdbs
    assert pdb["spec"]["maxUnavailable"] == 1
    for owner, template in pod_templates(r):
        assert selects(pdb["spec"]["selector"], template["metadata"]["labels"]), owner
    for _, pod in _test_pods(values_file):
        assert not selects(pdb["spec"]["selector"], pod["metadata"]["labels"])


@pytest.mark.parametrize("values_file", VALUE_SETS, ids=ids)
def test_workload_selectors_match_their_pod_templates(values_file):
    r = render(values_file)
    for kind in ("Deployment", "StatefulSet"):
        for o in r.of_kind(kind):
            assert selects(o["spec"]["selector"], o["spec"]["template"]["metadata"]["labels"]), o["metadata"]["name"]
    for sts in r.of_kind("StatefulSet"):
        governing = r.get("Service", sts["spec"]["serviceName"])
        assert governing["spec"]["clusterIP"] == "None"
        assert service_selects(governing["spec"]["selector"], sts["spec"]["template"]["metadata"]["labels"])


# ------------------------------------------------------------------ one test per value set


def test_defaults_single_node_gpu_plain_workloads():
    r = render(None)
    assert not r.of_kind("RayCluster") and not CRD_KINDS & {o["kind"] for o in r.objects}
    assert not r.of_kind("ConfigMap"), "the dashboard is off by default"
    deploy = r.get("Deployment", f"{fullname()}-head")
    assert deploy["spec"]["replicas"] == 1 and deploy["spec"]["strategy"]["type"] == "Recreate"
    sts = r.get("StatefulSet", f"{fullname()}-worker-gpu")
    assert sts["spec"]["replicas"] == 1 and sts["spec"]["podManagementPolicy"] == "Parallel"
    head = head_container(r)
    assert head["image"] == "mixserve:0.1.0-cuda"
    script = head["args"][0]
    assert re.search(r"^ray start --head --port=6379 .*--num-cpus=1 --num-gpus=1$", script, re.M), script
    assert gpu_limit(head) == 1
    (worker,) = sts["spec"]["template"]["spec"]["containers"]
    assert gpu_limit(worker) == 2
    head_svc = f"{fullname()}-head.{NAMESPACE}.svc:6379"
    start = rf"^exec ray start --address={re.escape(head_svc)} --block .*--num-gpus=2$"
    assert re.search(start, worker["args"][0], re.M), worker["args"][0]
    assert worker["readinessProbe"]["httpGet"] == {"path": "/api/local_raylet_healthz", "port": 52365}
    args = serve_args(r)
    assert args["device"] == "cuda" and args["workers"] == "2" and args["coordinators"] == "1"
    assert args["model"] == "/opt/mixserve/models/mixserve-tiny"
    # workers join the head's GCS before the gateway is ready: the head Service must publish not-ready pods
    head_service = r.get("Service", f"{fullname()}-head")
    assert head_service["spec"]["publishNotReadyAddresses"] is True
    assert head_service["spec"]["clusterIP"] == "None"
    assert {p["port"] for p in head_service["spec"]["ports"]} >= {6379, 8265}
    assert service_selects(head_service["spec"]["selector"], deploy["spec"]["template"]["metadata"]["labels"])
    (test_pod,) = r.of_kind("Pod")
    assert test_pod["metadata"]["annotations"]["helm.sh/hook"] == "test"
    assert f"{fullname()}.{NAMESPACE}.svc:50051" in test_pod["spec"]["containers"][0]["command"][2]


def test_cpu_only():
    r = render("cpu-values.yaml")
    text = str(r.objects)
    assert GPU not in text, "no GPU may be requested on CPU"
    args = serve_args(r)
    assert args["device"] == "cpu" and args["dtype"] == "float32" and args["workers"] == "2"
    assert head_container(r)["image"] == "mixserve:0.1.0-cpu"
    assert "--num-gpus=0" in head_container(r)["args"][0]
    (worker,) = worker_templates(r)
    assert re.search(r"--num-cpus=2 --num-gpus=0$", worker["spec"]["containers"][0]["args"][0], re.M)
    assert worker["spec"]["containers"][0]["resources"]["limits"] == {"cpu": "4", "memory": "4Gi"}


def test_multinode_gpu_eight_expert_workers():
    r = render("gpu-multinode-values.yaml")
    args = serve_args(r)
    assert args["workers"] == "8" and args["placement"] == "SPREAD" and args["dtype"] == "bfloat16"
    assert args["model"] == "/models/mixtral-8x7b-instruct" and args["collective-timeout"] == "60"
    (sts,) = r.of_kind("StatefulSet")
    assert sts["spec"]["replicas"] == 2
    spec = sts["spec"]["template"]["spec"]
    (worker,) = spec["containers"]
    assert gpu_limit(worker) == 4 and worker["resources"]["requests"][GPU] == 4
    assert "--num-cpus=4 --num-gpus=4" in worker["args"][0]
    assert sts["spec"]["replicas"] * 4 == 8
    assert gpu_limit(head_container(r)) == 1
    anti = spec["affinity"]["podAntiAffinity"]["requiredDuringSchedulingIgnoredDuringExecution"][0]
    assert anti["topologyKey"] == "kubernetes.io/hostname"
    assert selects(anti["labelSelector"], sts["spec"]["template"]["metadata"]["labels"])
    assert {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"} in spec["tolerations"]
    # weights: a ReadWriteMany PVC shared by every pod, filled by the download init container
    pvc = r.get("PersistentVolumeClaim", f"{fullname()}-model")
    assert pvc["spec"]["accessModes"] == ["ReadWriteMany"] and pvc["spec"]["storageClassName"] == "shared-nfs"
    assert pvc["metadata"]["annotations"]["helm.sh/resource-policy"] == "keep"
    for owner, template in pod_templates(r):
        volumes = {v["name"]: v for v in template["spec"]["volumes"]}
        assert volumes["model"]["persistentVolumeClaim"]["claimName"] == pvc["metadata"]["name"], owner
        (init,) = template["spec"]["initContainers"]
        env = env_of(init)
        assert init["name"] == "download-model"
        assert env["MODEL_REPO_ID"]["value"] == "mistralai/Mixtral-8x7B-Instruct-v0.1"
        assert env["MODEL_DIR"]["value"] == args["model"]
        assert env["HF_TOKEN"]["valueFrom"]["secretKeyRef"] == {"name": "hf-token", "key": "HF_TOKEN"}
        assert "snapshot_download" in init["command"][2]
        init_mounts = {m["name"]: m for m in init["volumeMounts"]}
        assert init_mounts["model"]["mountPath"] == "/models" and not init_mounts["model"].get("readOnly")
        main_mounts = {m["name"]: m for m in template["spec"]["containers"][0]["volumeMounts"]}
        assert main_mounts["model"]["readOnly"] is True
        assert {"name": "NCCL_DEBUG", "value": "WARN"} in template["spec"]["containers"][0]["env"]
    svc = r.get("Service", fullname())
    assert svc["spec"]["type"] == "LoadBalancer" and svc["spec"]["loadBalancerSourceRanges"] == ["10.0.0.0/8"]
    assert r.of_kind("ServiceMonitor") and r.of_kind("PrometheusRule") and r.of_kind("ConfigMap")


def test_kuberay_raycluster():
    r = render("kuberay-values.yaml")
    assert not r.of_kind("Deployment") and not r.of_kind("StatefulSet")
    assert not [s for s in r.of_kind("Service") if s["metadata"]["name"].endswith(("-head", "-workers"))], (
        "KubeRay creates the head Service itself"
    )
    (rc,) = r.of_kind("RayCluster")
    assert rc["apiVersion"] == "ray.io/v1"
    assert rc["metadata"]["annotations"]["ray.io/overwrite-container-cmd"] == "true"
    spec = rc["spec"]
    assert spec["rayVersion"] == "2.60.0" and spec["enableInTreeAutoscaling"] is False
    head = spec["headGroupSpec"]
    assert head["serviceType"] == "ClusterIP"
    assert all(isinstance(v, str) for v in head["rayStartParams"].values()), head["rayStartParams"]
    assert head["rayStartParams"]["num-gpus"] == "1" and head["rayStartParams"]["dashboard-host"] == "0.0.0.0"
    head_c = head["template"]["spec"]["containers"][0]
    assert head_c["name"] == "ray-head" and gpu_limit(head_c) == 1
    assert "${KUBERAY_GEN_RAY_START_CMD//--block/}" in head_c["args"][0]
    assert not re.search(r"^ray start", head_c["args"][0], re.M), "KubeRay's generated command starts Ray"
    (group,) = spec["workerGroupSpecs"]
    assert group["groupName"] == "gpu-a"
    assert group["replicas"] == group["minReplicas"] == group["maxReplicas"] == 2
    assert group["rayStartParams"] == {"dashboard-agent-listen-port": "52365", "num-cpus": "2", "num-gpus": "2"}
    worker_c = group["template"]["spec"]["containers"][0]
    assert worker_c["name"] == "ray-worker" and gpu_limit(worker_c) == 2
    assert "exec $KUBERAY_GEN_RAY_START_CMD" in worker_c["args"][0]
    assert group["template"]["spec"]["nodeSelector"] == {"cloud.google.com/gke-accelerator": "nvidia-l4"}
    # KubeRay injects wget-based probes only where none are set: both containers bring their own
    assert worker_c["readinessProbe"]["httpGet"]["path"] == "/api/local_raylet_healthz"
    assert "livenessProbe" in worker_c
    # KubeRay takes a container port named "metrics" as Ray's metrics-export-port: the gateway's must differ
    assert "metrics" not in {p["name"] for p in head_c["ports"]}
    assert int(serve_args(r)["workers"]) == 4 <= int(group["rayStartParams"]["num-gpus"]) * group["replicas"]
    for _, template in pod_templates(r):
        volumes = {v["name"]: v for v in template["spec"]["volumes"]}
        assert volumes["model"]["hostPath"] == {"path": "/mnt/models", "type": "Directory"}
        assert "initContainers" not in template["spec"]
    assert serve_args(r)["model"] == "/models/mixtral-8x7b"
    assert r.get("ConfigMap", f"{fullname()}-dashboard")["metadata"]["namespace"] == "monitoring"


def test_http_api_off_serves_grpc_only():
    r = render(None, "--set", "serve.httpEnabled=false")
    assert [p["name"] for p in r.get("Service", fullname())["spec"]["ports"]] == ["grpc"]
    assert "http" not in {p["name"] for p in head_container(r)["ports"]}
    args = serve_args(r)
    assert "no-http" in args and "http-port" not in args


# ------------------------------------------------------------------ values the chart must refuse

REFUSED = [
    (["--set", "serve.expertWorkers=5"], "serve.expertWorkers (5) + serve.coordinators (1) need 6 Ray bundles"),
    (["--set", "serve.coordinators=2"], "serve.expertWorkers (2) + serve.coordinators (2) need 4 Ray bundles with "
                                        "one GPU each, but the head and worker groups offer only 3"),
    (["--set", "serve.coordinators=0"], "serve/coordinators"),
    (["--set", "metrics.serviceMonitor.enabled=true", "--set", "metrics.podMonitor.enabled=true"], "not both"),
    (["--set", "model.download.enabled=true", "--set", "model.download.repoId=x/y"], "needs a volume"),
    (["--set", "model.source=pvc", "--set", "model.download.enabled=true"], "needs model.download.repoId"),
    (["--set", "serve.device=rocm"], "serve/device"),
    (["--set", "serve.placment=PACK"], "placment"),
    (["--set-json", 'workerGroups=[{"name":"g","replicas":1,"expertWorkersPerPod":4,"gpusPerPod":2}]'],
     "gpusPerPod (2) must be >= expertWorkersPerPod (4)"),
    (["--set", "serve.httpPort=9400"], "serve.httpPort (9400) must differ from serve.metricsPort"),
]


@pytest.mark.parametrize(("args", "message"), REFUSED, ids=[m for _, m in REFUSED])
def test_chart_refuses_inconsistent_values(args, message):
    proc = helm_template(None, *args, check=False)
    assert proc.returncode != 0, f"rendered although {args}"
    assert message in proc.stderr, proc.stderr


@pytest.mark.parametrize("values_file", VALUE_SETS, ids=ids)
def test_container_scripts_are_valid_bash(values_file):
    for owner, template in pod_templates(render(values_file)):
        for c in template["spec"]["containers"]:
            assert c["command"] == ["/bin/bash", "-c", "--"], owner
            (script,) = c["args"]
            assert script.startswith("set -eu\n"), owner
            run(["bash", "-n", "-c", script])


@pytest.mark.parametrize("values_file", VALUE_SETS, ids=ids)
def test_notes_render(values_file, tmp_path):
    text = render_notes(tmp_path, values_file)
    assert f"port-forward svc/{fullname()} 50051:50051" in text, text
    assert f"port-forward svc/{fullname()} 8000:8000" in text and "localhost:8000/v1/models" in text, text
    assert "mixserve.v1.MixServe/Generate" in text and "grpc.health.v1.Health/Check" in text
    assert "expert workers:" in text and "<no value>" not in text, text
    assert "  coordinators:    1, each with its own scheduler and " in text, text
