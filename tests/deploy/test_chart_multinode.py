"""What multi-node NCCL needs from the Helm chart (rdma.*, hostNetwork, nccl.env): RDMA devices requested and
IPC_LOCK added on the rank pods only, host networking with cluster DNS, the user's NCCL_* settings in every
Ray container, and ranks (expert workers, coordinators) counted across worker groups. All of it off by default."""

from __future__ import annotations

import pytest
import yaml

from cluster.cpu_tuning import SOCKET_IFNAME_VARS, nccl_fault_env, node_interface_env
from tests.deploy.helpers import (
    CHART,
    containers,
    head_container,
    head_template,
    helm_lint,
    helm_template,
    pod_templates,
    render,
    render_notes,
    serve_args,
    validate_rendered,
    worker_templates,
)

RDMA = "rdma/rdma_shared_device_a"
GPU = "nvidia.com/gpu"
RAY_CONTAINERS = {"ray-head", "ray-worker"}
RDMA_ON = ("--set", "rdma.enabled=true")
HOST_NET = ("--set", "hostNetwork=true")
NCCL_ENV = ("--set", "nccl.env.NCCL_IB_HCA=mlx5", "--set", "nccl.env.NCCL_IB_GID_INDEX=3",
            "--set", "nccl.env.NCCL_DEBUG=INFO")
ALL_ON = (*RDMA_ON, *HOST_NET, *NCCL_ENV)
# (values file, extra args) with the options on: plain workloads, KubeRay, and the CI set that turns them on
RENDERS = [(None, ALL_ON), ("gpu-multinode-values.yaml", ALL_ON[:-2]), ("kuberay-values.yaml", ALL_ON),
           ("gpu-infiniband-values.yaml", ())]
RENDER_IDS = ["defaults+all", "multinode+all", "kuberay+all", "gpu-infiniband"]


def ray_containers(template: dict) -> list[dict]:
    return [c for c in template["spec"]["containers"] if c["name"] in RAY_CONTAINERS]


def ray_pods(r) -> list[tuple[str, dict]]:
    return [(owner, t) for owner, t in pod_templates(r) if ray_containers(t)]


def env_list(container: dict) -> list[tuple[str, object]]:
    return [(e["name"], e.get("value", e.get("valueFrom"))) for e in container.get("env", [])]


def capabilities(container: dict) -> dict:
    return container["securityContext"]["capabilities"]


def resources(container: dict) -> tuple[dict, dict]:
    res = container.get("resources", {})
    return res.get("requests", {}), res.get("limits", {})


# ------------------------------------------------------------------ defaults: nothing of it


def test_defaults_are_off():
    values = yaml.safe_load((CHART / "values.yaml").read_text())
    assert values["rdma"] == {"enabled": False, "resourceName": RDMA, "count": 1, "ipcLock": True}
    assert values["hostNetwork"] is False and values["nccl"] == {"env": {}}


@pytest.mark.parametrize("values_file", [None, "cpu-values.yaml", "gpu-multinode-values.yaml", "kuberay-values.yaml"])
def test_default_renders_carry_none_of_it(values_file):
    r = render(values_file)
    for owner, template in pod_templates(r) + [(p["metadata"]["name"], p) for p in r.of_kind("Pod")]:
        spec = template["spec"]
        assert "hostNetwork" not in spec and "dnsPolicy" not in spec, owner
        for c in containers(spec):
            assert "add" not in capabilities(c), (owner, c["name"])
            assert not any("hostPort" in p for p in c.get("ports", [])), (owner, c["name"])
            requests, limits = resources(c)
            assert not any(k.startswith("rdma/") for k in {**requests, **limits}), (owner, c["name"])
            nccl = [e["name"] for e in c.get("env", []) if e["name"].startswith("NCCL_")]
            from_extra_env = values_file == "gpu-multinode-values.yaml" and c["name"] in RAY_CONTAINERS
            assert nccl == (["NCCL_DEBUG"] if from_extra_env else []), (owner, c["name"], nccl)


# ------------------------------------------------------------------ rdma.*: devices and IPC_LOCK on the rank pods


@pytest.mark.parametrize("values_file", [None, "kuberay-values.yaml"], ids=["plain", "kuberay"])
def test_rdma_requests_the_device_and_ipc_lock_on_every_rank_container(values_file):
    r = render(values_file, *RDMA_ON)
    head = head_container(r)
    assert resources(head)[0][RDMA] == resources(head)[1][RDMA] == 1
    assert resources(head)[0][GPU] == 1, "the GPU request stays"
    assert capabilities(head) == {"drop": ["ALL"], "add": ["IPC_LOCK"]}
    assert worker_templates(r)
    for template in worker_templates(r):
        (worker,) = ray_containers(template)
        requests, limits = resources(worker)
        assert requests[RDMA] == limits[RDMA] == 1, (requests, limits)
        assert capabilities(worker) == {"drop": ["ALL"], "add": ["IPC_LOCK"]}
        assert worker["securityContext"]["allowPrivilegeEscalation"] is False
        assert worker["securityContext"]["runAsNonRoot"] is True
    (test_pod,) = r.of_kind("Pod")
    assert "add" not in capabilities(test_pod["spec"]["containers"][0])
    assert RDMA not in str(test_pod)


def test_rdma_stays_off_the_init_container():
    r = render("gpu-multinode-values.yaml", *RDMA_ON)
    for owner, template in ray_pods(r):
        (init,) = template["spec"]["initContainers"]
        assert init["name"] == "download-model", owner
        assert "add" not in capabilities(init), owner
        assert RDMA not in str(init["resources"]), owner
        (rank,) = ray_containers(template)
        assert capabilities(rank)["add"] == ["IPC_LOCK"], owner


def test_rdma_resource_name_count_and_ipc_lock_are_values():
    r = render(None, *RDMA_ON, "--set", "rdma.resourceName=nvidia.com/hostdev", "--set", "rdma.count=4",
               "--set", "rdma.ipcLock=false")
    for c in [head_container(r), *(ray_containers(t)[0] for t in worker_templates(r))]:
        requests, limits = resources(c)
        assert requests["nvidia.com/hostdev"] == limits["nvidia.com/hostdev"] == 4, c["name"]
        assert RDMA not in requests and RDMA not in limits
        assert "add" not in capabilities(c), c["name"]


def test_rdma_count_zero_requests_nothing_but_keeps_ipc_lock():
    r = render(None, *RDMA_ON, "--set", "rdma.count=0")
    for c in [head_container(r), *(ray_containers(t)[0] for t in worker_templates(r))]:
        requests, limits = resources(c)
        assert RDMA not in requests and RDMA not in limits, c["name"]
        assert capabilities(c)["add"] == ["IPC_LOCK"], c["name"]


def test_a_pods_own_rdma_count_wins():
    """SR-IOV: one VF per GPU on the worker pods, the rdma.count default on the head."""
    group = ('workerGroups=[{"name":"gpu","replicas":1,"expertWorkersPerPod":2,"gpusPerPod":2,'
             '"resources":{"limits":{"nvidia.com/hostdev":2}}}]')
    r = render(None, *RDMA_ON, "--set", "rdma.resourceName=nvidia.com/hostdev", "--set-json", group)
    (worker,) = ray_containers(worker_templates(r)[0])
    assert resources(worker)[0]["nvidia.com/hostdev"] == resources(worker)[1]["nvidia.com/hostdev"] == 2
    assert resources(head_container(r))[1]["nvidia.com/hostdev"] == 1


def test_a_head_without_gpus_runs_no_rank_and_gets_no_rdma():
    """On CUDA with head.gpus 0 the coordinator runs on a worker pod: the head needs no RDMA device."""
    r = render(None, *RDMA_ON, "--set", "head.gpus=0", "--set", "serve.expertWorkers=1")
    head = head_container(r)
    assert RDMA not in str(head["resources"]) and "add" not in capabilities(head)
    (worker,) = ray_containers(worker_templates(r)[0])
    assert resources(worker)[1][RDMA] == 1 and capabilities(worker)["add"] == ["IPC_LOCK"]


def test_coordinators_on_worker_pods_get_the_network_there():
    """With head.gpus 0 every coordinator takes a worker pod's bundle: the workers carry 2 + 2 ranks."""
    group = 'workerGroups=[{"name":"gpu","replicas":1,"expertWorkersPerPod":4,"gpusPerPod":4}]'
    r = render(None, *RDMA_ON, "--set", "head.gpus=0", "--set", "serve.coordinators=2", "--set-json", group)
    assert serve_args(r)["coordinators"] == "2" and serve_args(r)["workers"] == "2"
    head = head_container(r)
    assert RDMA not in str(head["resources"]) and GPU not in str(head["resources"])
    (worker,) = ray_containers(worker_templates(r)[0])
    assert resources(worker)[1][GPU] == 4 and resources(worker)[1][RDMA] == 1
    assert capabilities(worker)["add"] == ["IPC_LOCK"]
    proc = helm_template(None, "--set", "head.gpus=0", "--set", "serve.coordinators=3", "--set-json", group,
                         check=False)
    assert proc.returncode != 0 and "need 5 Ray bundles" in proc.stderr and "offer only 4" in proc.stderr


def test_user_added_capabilities_are_kept():
    r = render(None, *RDMA_ON, "--set-json", 'securityContext={"runAsNonRoot":true,"allowPrivilegeEscalation":false,'
               '"readOnlyRootFilesystem":true,"capabilities":{"drop":["ALL"],"add":["IPC_LOCK","NET_RAW"]}}')
    assert capabilities(head_container(r))["add"] == ["IPC_LOCK", "NET_RAW"], "IPC_LOCK once, the user's kept"


def test_rdma_is_refused_on_cpu():
    proc = helm_template("cpu-values.yaml", *RDMA_ON, check=False)
    assert proc.returncode != 0
    assert "rdma.enabled needs serve.device=cuda" in proc.stderr, proc.stderr


@pytest.mark.parametrize("name", ["rdma_shared_device_a", "rdma/", "RDMA/x y"])
def test_schema_rejects_a_resource_name_without_domain(name):
    proc = helm_template(None, *RDMA_ON, "--set", f"rdma.resourceName={name}", check=False)
    assert proc.returncode != 0 and "/rdma/resourceName" in proc.stderr, proc.stderr


# ------------------------------------------------------------------ hostNetwork


@pytest.mark.parametrize("values_file", [None, "kuberay-values.yaml"], ids=["plain", "kuberay"])
def test_host_network_uses_cluster_dns_and_one_ray_pod_per_node(values_file):
    agent_port = 52365
    r = render(values_file, *HOST_NET, "--set", "gateway.tls.enabled=true", "--set", "gateway.tls.existingSecret=t")
    pods = ray_pods(r)
    assert len(pods) >= 2
    for owner, template in pods:
        spec = template["spec"]
        assert spec["hostNetwork"] is True, owner
        assert spec["dnsPolicy"] == "ClusterFirstWithHostNet", owner
        (c,) = ray_containers(template)
        for port in c["ports"]:
            assert port["hostPort"] == port["containerPort"], (owner, port)
        # every Ray pod takes the dashboard agent's port on its node: the scheduler keeps two of them apart
        assert agent_port in {p["hostPort"] for p in c["ports"]}, (owner, c["ports"])
        ports = [p["containerPort"] for p in c["ports"]]
        assert len(ports) == len(set(ports)), ports
    head_ports = {p["name"]: p["hostPort"] for p in head_container(r)["ports"]}
    assert head_ports["grpc"] == 50051 and head_ports["grpc-health"] == 50052 and head_ports["http"] == 8000
    assert head_ports["dashboard-agt"] == agent_port
    # ... the port the head's agent listens on
    for rc in r.of_kind("RayCluster"):
        assert rc["spec"]["headGroupSpec"]["rayStartParams"]["dashboard-agent-listen-port"] == str(agent_port)
    if not r.of_kind("RayCluster"):
        assert f"--dashboard-agent-listen-port={agent_port}" in head_container(r)["args"][0]
    (test_pod,) = r.of_kind("Pod")
    assert "hostNetwork" not in test_pod["spec"], "the helm test pod stays on the pod network"


def test_host_network_off_declares_no_extra_port():
    names = [p["name"] for p in head_container(render(None))["ports"]]
    assert names == ["grpc", "http-metrics", "http", "gcs-server", "dashboard", "client"]


# ------------------------------------------------------------------ nccl.env


@pytest.mark.parametrize("values_file", [None, "kuberay-values.yaml"], ids=["plain", "kuberay"])
def test_nccl_env_reaches_every_ray_container(values_file):
    r = render(values_file, *NCCL_ENV, "--set", "nccl.env.NCCL_NET_GDR_READ=true")
    wanted = [("NCCL_DEBUG", "INFO"), ("NCCL_IB_GID_INDEX", "3"), ("NCCL_IB_HCA", "mlx5"),
              ("NCCL_NET_GDR_READ", "true")]
    pods = ray_pods(r)
    assert len(pods) >= 2
    for owner, template in pods:
        (c,) = ray_containers(template)
        env = env_list(c)
        assert [e for e in env if e[0].startswith("NCCL_")] == wanted, (owner, env)
        assert all(isinstance(e["value"], str) for e in c["env"] if "value" in e), "EnvVar values are strings"
        assert len({n for n, _ in env}) == len(env), env
    (test_pod,) = r.of_kind("Pod")
    assert "NCCL_" not in str(test_pod["spec"]["containers"][0].get("env"))


def test_nccl_env_and_extra_env_side_by_side():
    r = render("gpu-multinode-values.yaml", "--set", "nccl.env.NCCL_IB_HCA=mlx5")
    for owner, template in ray_pods(r):
        env = dict(env_list(ray_containers(template)[0]))
        assert env["NCCL_IB_HCA"] == "mlx5" and env["NCCL_DEBUG"] == "WARN", owner
        (init,) = template["spec"]["initContainers"]
        assert "NCCL_IB_HCA" not in str(init["env"]), owner


def test_a_name_in_both_nccl_env_and_extra_env_is_refused():
    proc = helm_template("gpu-multinode-values.yaml", "--set", "nccl.env.NCCL_DEBUG=INFO", check=False)
    assert proc.returncode != 0
    assert "NCCL_DEBUG is set in both nccl.env and extraEnv" in proc.stderr, proc.stderr


@pytest.mark.parametrize("args", [("--set", "nccl.env.NCCL-DEBUG=INFO"), ("--set", "nccl.debug=INFO"),
                                  ("--set-json", 'nccl.env={"NCCL_DEBUG":{"a":1}}')],
                         ids=["bad-name", "unknown-value", "non-scalar"])
def test_schema_rejects_malformed_nccl_values(args):
    proc = helm_template(None, *args, check=False)
    assert proc.returncode != 0 and "nccl" in proc.stderr.lower(), proc.stderr


def test_mixserve_overwrites_no_nccl_variable_the_pod_sets():
    """The contract values.yaml states for nccl.env: a rank process sets only GLOO_SOCKET_IFNAME,
    NCCL_SOCKET_IFNAME and TORCH_NCCL_* fault handling, and none of them where the environment already has it."""
    assert set(SOCKET_IFNAME_VARS) == {"GLOO_SOCKET_IFNAME", "NCCL_SOCKET_IFNAME"}
    defaults = nccl_fault_env(20.0, {})
    assert defaults and all(name.startswith("TORCH_NCCL_") for name in defaults), defaults
    user = dict.fromkeys(defaults, "user")
    assert nccl_fault_env(20.0, user) == {}
    assert "TORCH_NCCL_ASYNC_ERROR_HANDLING" not in nccl_fault_env(20.0, {"NCCL_ASYNC_ERROR_HANDLING": "1"})
    interfaces = {"ib0": ["10.1.0.5"], "eth0": ["10.0.0.5"]}
    assert node_interface_env("10.1.0.5", interfaces, {}) == dict.fromkeys(SOCKET_IFNAME_VARS, "ib0")
    assert node_interface_env("10.1.0.5", interfaces, {"NCCL_SOCKET_IFNAME": "eth0"}) == {"GLOO_SOCKET_IFNAME": "ib0"}
    comment = (CHART / "values.yaml").read_text().split("\nnccl:\n")[0].rsplit("\n\n", 1)[1]
    for name in (*SOCKET_IFNAME_VARS, "TORCH_NCCL_*", "never overwrites"):
        assert name in comment, f"values.yaml's nccl comment no longer mentions {name}"


# ------------------------------------------------------------------ scale-out: expert workers across groups


def test_expert_workers_across_worker_groups_all_get_the_network():
    groups = ('workerGroups=[{"name":"a","replicas":2,"expertWorkersPerPod":2,"gpusPerPod":2},'
              '{"name":"b","replicas":1,"expertWorkersPerPod":4,"gpusPerPod":4}]')
    r = render(None, *ALL_ON, "--set", "serve.expertWorkers=8", "--set-json", groups)
    assert serve_args(r)["workers"] == "8"
    stateful_sets = {s["metadata"]["name"].rsplit("-", 1)[1]: s for s in r.of_kind("StatefulSet")}
    assert {k: s["spec"]["replicas"] for k, s in stateful_sets.items()} == {"a": 2, "b": 1}
    slots = 0
    for s in stateful_sets.values():
        (c,) = ray_containers(s["spec"]["template"])
        per_pod = int(c["args"][0].rsplit("--num-cpus=", 1)[1].split()[0])
        assert resources(c)[1][GPU] == per_pod, "one GPU per expert worker"
        assert resources(c)[1][RDMA] == 1 and capabilities(c)["add"] == ["IPC_LOCK"]
        assert s["spec"]["template"]["spec"]["hostNetwork"] is True
        slots += per_pod * s["spec"]["replicas"]
    assert slots == 8
    proc = helm_template(None, "--set", "serve.expertWorkers=9", "--set-json", groups, check=False)
    assert proc.returncode != 0 and "need 10 Ray bundles" in proc.stderr, proc.stderr


def test_gpu_infiniband_value_set():
    r = render("gpu-infiniband-values.yaml")
    assert serve_args(r)["workers"] == "8" and serve_args(r)["placement"] == "SPREAD"
    (sts,) = r.of_kind("StatefulSet")
    assert sts["spec"]["replicas"] == 2
    (worker,) = ray_containers(sts["spec"]["template"])
    assert resources(worker)[1] == {"memory": "256Gi", GPU: 4, RDMA: 1}
    assert resources(worker)[0] == {"cpu": "32", "memory": "256Gi", GPU: 4, RDMA: 1}
    assert resources(head_container(r))[1] == {"memory": "64Gi", GPU: 1, RDMA: 1}
    for _, template in ray_pods(r):
        assert template["spec"]["hostNetwork"] is True
        assert template["spec"]["dnsPolicy"] == "ClusterFirstWithHostNet"
        env = dict(env_list(ray_containers(template)[0]))
        assert env["NCCL_IB_HCA"] == "mlx5" and env["NCCL_DEBUG"] == "WARN"
    assert head_template(r)["spec"]["hostNetwork"] is True


# ------------------------------------------------------------------ lint, Kubernetes schemas, NOTES


@pytest.mark.parametrize(("values_file", "args"), RENDERS, ids=RENDER_IDS)
def test_helm_lint_strict_with_the_options_on(values_file, args):
    out = helm_lint(values_file, *args).stdout
    assert "0 chart(s) failed" in out, out


@pytest.mark.parametrize(("values_file", "args"), RENDERS, ids=RENDER_IDS)
def test_objects_match_kubernetes_schemas_with_the_options_on(values_file, args):
    validate_rendered(render(values_file, *args))


def test_notes_summarize_the_nccl_network(tmp_path):
    text = render_notes(tmp_path, "gpu-infiniband-values.yaml")
    line = next(ln for ln in text.splitlines() if "NCCL network:" in ln)
    assert f"RDMA {RDMA} x1 per rank pod + IPC_LOCK;" in line, line
    assert "host network (one Ray pod per node)" in line and "NCCL_DEBUG, NCCL_IB_HCA from nccl.env" in line, line
    assert "NCCL network:" not in render_notes(tmp_path / "defaults")
    text = render_notes(tmp_path / "open", None, *HOST_NET, "--set", "rayAuth.enabled=false")
    assert "they listen on the nodes' own addresses" in text, text
