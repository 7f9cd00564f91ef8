"""Helpers of the deployment tests: locating the tools and rendering the Helm chart.

The tools are never skipped: a missing one fails the test with the command that installs it.
helm and promtool come from scripts/install_tools.sh; hadolint and kubernetes-validate are Python
packages of the test environment.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from dataclasses import dataclass
from functools import cache
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[2]
CHART = ROOT / "helm" / "mixserve"
CI_VALUES = CHART / "ci"
DEPLOY = ROOT / "deploy"
RULES_FILE = CHART / "files" / "mixserve-rules.yaml"
DASHBOARD_FILE = CHART / "files" / "mixserve-dashboard.json"
KUBE_VERSION = "1.30.0"
RELEASE = "mx"
NAMESPACE = "serving"
INSTALL_HINT = "run scripts/install_tools.sh (it installs helm into .cache/tools/bin and promtool with apt-get)"

# The gateway's metric names (prometheus_client, job="mixserve"); histograms also export _bucket/_sum/_count.
COUNTERS = {
    "mixserve_requests_total",
    "mixserve_prompt_tokens_total",
    "mixserve_generation_tokens_total",
    "mixserve_expert_routed_tokens_total",
    "mixserve_worker_routed_tokens_total",
    "mixserve_worker_failures_total",
    "mixserve_worker_recoveries_total",
    "mixserve_preemptions_total",
    "mixserve_request_replays_total",
    "mixserve_prefix_cache_query_tokens_total",
    "mixserve_prefix_cache_hit_tokens_total",
    "mixserve_coordinator_placed_requests_total",
    "mixserve_worker_phase_seconds_total",
    "mixserve_expert_replica_rows_total",
    "mixserve_balancer_runs_total",
    "mixserve_balancer_moves_total",
    "mixserve_balancer_moved_copies_total",
    "mixserve_balancer_move_failures_total",
    "mixserve_copy_failovers_total",
    "mixserve_worker_rejoins_total",
}
HISTOGRAMS = {
    "mixserve_time_to_first_token_seconds",
    "mixserve_inter_token_latency_seconds",
    "mixserve_e2e_request_latency_seconds",
    "mixserve_request_queue_time_seconds",
    "mixserve_batch_size",
    "mixserve_step_phase_seconds",
    "mixserve_recovery_seconds",
    "mixserve_balancer_move_seconds",
}
GAUGES = {
    "mixserve_num_requests_running",
    "mixserve_num_requests_waiting",
    "mixserve_kv_cache_usage_ratio",
    "mixserve_worker_up",
    "mixserve_num_expert_workers",
    "mixserve_coordinator_up",
    "mixserve_num_coordinators",
    "mixserve_expert_worker_imbalance_ratio",
    "mixserve_balancer_predicted_imbalance",
    "mixserve_expert_workers_left_out",
}
# Series the gateway exports once per coordinator (label coordinator="0", "1", ...).
PER_COORDINATOR = {
    "mixserve_num_requests_running",
    "mixserve_num_requests_waiting",
    "mixserve_kv_cache_usage_ratio",
    "mixserve_coordinator_up",
    "mixserve_coordinator_placed_requests_total",
}
CRD_KINDS = {"ServiceMonitor", "PodMonitor", "PrometheusRule", "RayCluster"}  # custom resources the chart renders
METRIC_NAMES = frozenset(
    COUNTERS | GAUGES | {h + suffix for h in HISTOGRAMS for suffix in ("_bucket", "_sum", "_count")}
)


def find_tool(name: str, hint: str = INSTALL_HINT) -> str:
    """Path of a tool: the installer's cache dir, then the venv's bin dir, then PATH; else the test fails."""
    tools_dir = Path(os.environ.get("MIXSERVE_TOOLS_DIR", ROOT / ".cache" / "tools")) / "bin"
    for candidate in (tools_dir / name, Path(sys.executable).parent / name):
        if candidate.is_file() and os.access(candidate, os.X_OK):
            return str(candidate)
    found = shutil.which(name)
    if found is None:
        pytest.fail(f"`{name}` not found in {tools_dir}, {Path(sys.executable).parent} or PATH: {hint}")
    return found


def run(cmd: list[str], *, cwd: Path = ROOT, check: bool = True, timeout: float = 60) -> subprocess.CompletedProcess:
    proc = subprocess.run(cmd, cwd=cwd, capture_output=True, text=True, timeout=timeout)
    if check and proc.returncode != 0:
        pytest.fail(f"`{' '.join(cmd)}` exited {proc.returncode}\nstdout:\n{proc.stdout}\nstderr:\n{proc.stderr}")
    return proc


@dataclass(frozen=True)
class Render:
    """The objects of one `helm template`, with lookups by kind and name."""

    values_file: str | None
    objects: tuple[dict, ...]

    def of_kind(self, kind: str) -> list[dict]:
        return [o for o in self.objects if o["kind"] == kind]

    def get(self, kind: str, name: str) -> dict:
        matches = [o for o in self.of_kind(kind) if o["metadata"]["name"] == name]
        assert len(matches) == 1, f"expected one {kind} {name!r}, found {len(matches)} in {self.names()}"
        return matches[0]

    def names(self) -> list[str]:
        return [f"{o['kind']}/{o['metadata']['name']}" for o in self.objects]


def helm_template(values_file: str | None = None, *extra: str, check: bool = True) -> subprocess.CompletedProcess:
    cmd = [find_tool("helm"), "template", RELEASE, str(CHART), "--namespace", NAMESPACE, "--kube-version", KUBE_VERSION]
    if values_file:
        cmd += ["-f", str(CI_VALUES / values_file)]
    return run([*cmd, *extra], check=check)


@cache
def helm_lint(values_file: str | None = None, *extra: str, check: bool = True) -> subprocess.CompletedProcess:
    cmd = [find_tool("helm"), "lint", "--strict", "--kube-version", KUBE_VERSION, str(CHART), *extra]
    if values_file:
        cmd += ["-f", str(CI_VALUES / values_file)]
    return run(cmd, check=check)


def validate_kubernetes(obj: dict, where: str) -> None:
    """Fails the test, naming `where`, unless obj matches the Kubernetes schemas of KUBE_VERSION."""
    try:
        import kubernetes_validate
    except ImportError:
        pytest.fail("kubernetes-validate is not installed: pip install kubernetes-validate (a test dependency)")
    try:
        kubernetes_validate.validate(obj, KUBE_VERSION, strict=True)
    except kubernetes_validate.ValidationError as exc:
        pytest.fail(f"{where}: {exc.message} at {list(exc.path)}")


def render(values_file: str | None = None, *extra: str) -> Render:
    """Renders the chart once per values file (None: the chart's defaults) and extra helm arguments (--set ...)."""
    docs = yaml.safe_load_all(helm_template(values_file, *extra).stdout)
    return Render(values_file, tuple(d for d in docs if d))


def render_notes(tmp_path: Path, values_file: str | None = None, *extra: str) -> str:
    """NOTES.txt renders only at install; a copy of the chart carries it in a ConfigMap for `helm template`."""
    chart = tmp_path / "mixserve"
    shutil.copytree(CHART, chart)
    notes = (chart / "templates" / "NOTES.txt").read_text()
    (chart / "templates" / "NOTES.txt").unlink()
    (chart / "templates" / "_notes.tpl").write_text('{{- define "test.notes" -}}\n' + notes + "{{- end }}\n")
    (chart / "templates" / "notes-configmap.yaml").write_text(
        "apiVersion: v1\nkind: ConfigMap\nmetadata:\n  name: notes\ndata:\n"
        '  notes: {{ include "test.notes" . | quote }}\n'
    )
    cmd = [find_tool("helm"), "template", RELEASE, str(chart), "--namespace", NAMESPACE, "--kube-version",
           KUBE_VERSION, "--show-only", "templates/notes-configmap.yaml"]
    if values_file:
        cmd += ["-f", str(CI_VALUES / values_file)]
    return yaml.safe_load(run([*cmd, *extra]).stdout)["data"]["notes"]


def fullname() -> str:
    return f"{RELEASE}-mixserve"


def pod_templates(r: Render) -> list[tuple[str, dict]]:
    """(owner, pod template) of every workload, RayCluster groups included."""
    out = []
    for kind in ("Deployment", "StatefulSet"):
        out += [(f"{kind}/{o['metadata']['name']}", o["spec"]["template"]) for o in r.of_kind(kind)]
    for rc in r.of_kind("RayCluster"):
        out.append(("RayCluster head", rc["spec"]["headGroupSpec"]["template"]))
        out += [(f"RayCluster {g['groupName']}", g["template"]) for g in rc["spec"]["workerGroupSpecs"]]
    return out


def validate_rendered(r: Render) -> None:
    """Every built-in object of a render, and every pod template (the RayCluster's too, wrapped as a
    PodTemplate), against the Kubernetes schemas; CRD instances pass kubernetes-validate unchecked."""
    objects = [o for o in r.objects if o["kind"] not in CRD_KINDS]
    objects += [{"apiVersion": "v1", "kind": "PodTemplate", "metadata": {"name": owner}, "template": t}
                for owner, t in pod_templates(r)]
    for obj in objects:
        validate_kubernetes(obj, f"{obj['kind']}/{obj['metadata']['name']}")


def head_template(r: Render) -> dict:
    """The pod template of the head (gateway + coordinator), Deployment or RayCluster head group."""
    (template,) = [t for _, t in pod_templates(r) if t["metadata"]["labels"]["app.kubernetes.io/component"] == "head"]
    return template


def head_container(r: Render) -> dict:
    (container,) = [c for c in head_template(r)["spec"]["containers"] if c["name"] == "ray-head"]
    return container


def worker_templates(r: Render) -> list[dict]:
    return [t for _, t in pod_templates(r) if t["metadata"]["labels"]["app.kubernetes.io/component"] == "worker"]


def serve_args(r: Render) -> dict[str, str]:
    """--flag=value pairs of the `exec mixserve 'serve' ...` line of the head script (a bare --flag maps to "")."""
    script = head_container(r)["args"][0]
    (line,) = [ln for ln in script.splitlines() if ln.startswith("exec mixserve ")]
    words = re.findall(r"'([^']*)'", line)
    assert words[0] == "serve", line
    return dict((*w.removeprefix("--").split("=", 1), "")[:2] for w in words[1:])


def head_slots(r: Render) -> int:
    """Ray bundles the head offers: ray start --num-cpus, on CUDA at most --num-gpus (one GPU per bundle)."""
    if r.of_kind("RayCluster"):
        params = r.of_kind("RayCluster")[0]["spec"]["headGroupSpec"]["rayStartParams"]
        cpus, gpus = int(params["num-cpus"]), int(params["num-gpus"])
    else:
        start = re.search(r"^ray start --head .*--num-cpus=(\d+) --num-gpus=(\d+)$", head_container(r)["args"][0], re.M)
        cpus, gpus = int(start.group(1)), int(start.group(2))
    return min(cpus, gpus) if serve_args(r)["device"] == "cuda" else cpus


def worker_slots(r: Render) -> int:
    """Ray bundles the worker pods offer (ray start --num-cpus), summed over the replicas."""
    for rc in r.of_kind("RayCluster"):
        return sum(int(g["rayStartParams"]["num-cpus"]) * g["replicas"] for g in rc["spec"]["workerGroupSpecs"])
    total = 0
    for sts in r.of_kind("StatefulSet"):
        script = sts["spec"]["template"]["spec"]["containers"][0]["args"][0]
        total += int(re.search(r"--num-cpus=(\d+)", script).group(1)) * sts["spec"]["replicas"]
    return total


def containers(pod_spec: dict) -> list[dict]:
    return pod_spec.get("initContainers", []) + pod_spec["containers"]


def selects(selector: dict, labels: dict) -> bool:
    """Does a LabelSelector (matchLabels and matchExpressions) select these labels?"""
    if any(labels.get(k) != v for k, v in selector.get("matchLabels", {}).items()):
        return False
    for expr in selector.get("matchExpressions", []):
        value, op = labels.get(expr["key"]), expr["operator"]
        if (op == "In" and value not in expr["values"]) or (op == "NotIn" and value in expr["values"]):
            return False
        if (op == "Exists" and value is None) or (op == "DoesNotExist" and value is not None):
            return False
    return True


def service_selects(selector: dict, labels: dict) -> bool:
    """Does a Service's plain selector map select these labels?"""
    return bool(selector) and all(labels.get(k) == v for k, v in selector.items())
