"""The chart's Prometheus Operator objects (ServiceMonitor, PodMonitor, PrometheusRule) and the Grafana
dashboard ConfigMap: fields that matter, selectors that find the gateway, one source with deploy/."""

from __future__ import annotations

import json
import re

import pytest
import yaml

from tests.deploy.helpers import (
    DASHBOARD_FILE,
    DEPLOY,
    NAMESPACE,
    RULES_FILE,
    fullname,
    pod_templates,
    render,
    selects,
)

MONITORING_API = "monitoring.coreos.com/v1"
DURATION = re.compile(r"^([0-9]+(ms|s|m|h|d|w|y))+$")


def _head_pod_labels(r) -> dict:
    (labels,) = [t["metadata"]["labels"] for _, t in pod_templates(r)
                 if t["metadata"]["labels"]["app.kubernetes.io/component"] == "head"]
    return labels


def _head_container_ports(r) -> set[str]:
    (ports,) = [{p["name"] for p in t["spec"]["containers"][0]["ports"]} for _, t in pod_templates(r)
                if t["metadata"]["labels"]["app.kubernetes.io/component"] == "head"]
    return ports


def _assert_job_relabeled_to_mixserve(endpoint: dict) -> None:
    relabel = [x for x in endpoint["relabelings"] if x.get("targetLabel") == "job"]
    assert relabel == [{"action": "replace", "targetLabel": "job", "replacement": "mixserve"}], endpoint


def test_service_monitor_selects_the_metrics_service():
    r = render("gpu-multinode-values.yaml")
    (sm,) = r.of_kind("ServiceMonitor")
    assert sm["apiVersion"] == MONITORING_API
    assert sm["metadata"]["namespace"] == NAMESPACE
    assert sm["metadata"]["labels"]["release"] == "kube-prometheus-stack", "kube-prometheus-stack selects by release"
    spec = sm["spec"]
    assert spec["namespaceSelector"] == {"matchNames": [NAMESPACE]}
    selected = [s for s in r.of_kind("Service") if selects(spec["selector"], s["metadata"]["labels"])]
    assert [s["metadata"]["name"] for s in selected] == [f"{fullname()}-metrics"], "exactly the metrics Service"
    (endpoint,) = spec["endpoints"]
    assert endpoint["port"] in {p["name"] for p in selected[0]["spec"]["ports"]}
    assert endpoint["path"] == "/metrics" and endpoint["scheme"] == "http"
    assert DURATION.match(endpoint["interval"]) and DURATION.match(endpoint["scrapeTimeout"])
    _assert_job_relabeled_to_mixserve(endpoint)


def test_pod_monitor_selects_the_head_pod_and_its_metrics_port():
    r = render("kuberay-values.yaml")
    assert not r.of_kind("ServiceMonitor")
    (pm,) = r.of_kind("PodMonitor")
    assert pm["apiVersion"] == MONITORING_API
    spec = pm["spec"]
    assert spec["namespaceSelector"] == {"matchNames": [NAMESPACE]}
    assert selects(spec["selector"], _head_pod_labels(r))
    for _, template in pod_templates(r):
        if template["metadata"]["labels"]["app.kubernetes.io/component"] == "worker":
            assert not selects(spec["selector"], template["metadata"]["labels"])
    (endpoint,) = spec["podMetricsEndpoints"]
    assert endpoint["port"] in _head_container_ports(r)
    assert endpoint["path"] == "/metrics"
    _assert_job_relabeled_to_mixserve(endpoint)


@pytest.mark.parametrize("values_file", ["gpu-multinode-values.yaml", "kuberay-values.yaml"])
def test_prometheus_rule_is_the_rules_file(values_file):
    r = render(values_file)
    (rule,) = r.of_kind("PrometheusRule")
    assert rule["apiVersion"] == MONITORING_API
    assert rule["spec"] == yaml.safe_load(RULES_FILE.read_text()), "PrometheusRule must carry files/mixserve-rules.yaml"
    if values_file == "gpu-multinode-values.yaml":
        assert rule["metadata"]["labels"]["release"] == "kube-prometheus-stack"


def test_prometheus_rule_groups_are_complete():
    (rule,) = render("gpu-multinode-values.yaml").of_kind("PrometheusRule")
    groups = rule["spec"]["groups"]
    assert groups and len({g["name"] for g in groups}) == len(groups)
    alerts = []
    for group in groups:
        assert group["rules"], group["name"]
        for r in group["rules"]:
            alerts.append(r["alert"])
            assert r["expr"].strip() and 'job="mixserve"' in r["expr"], r["alert"]
            assert DURATION.match(r["for"]), r["alert"]
            assert r["labels"]["severity"] in {"critical", "warning", "info"}, r["alert"]
            assert r["annotations"]["summary"] and r["annotations"]["description"], r["alert"]
    assert len(set(alerts)) == len(alerts)
    assert set(alerts) >= {
        "MixServeGatewayDown", "MixServeExpertWorkerDown", "MixServeTimeToFirstTokenHigh", "MixServeQueueGrowing",
        "MixServeKVCacheNearlyFull", "MixServeExpertLoadImbalance", "MixServeCoordinatorDown",
    }


def test_monitoring_objects_are_off_by_default():
    kinds = {o["kind"] for o in render(None).objects}
    assert not kinds & {"ServiceMonitor", "PodMonitor", "PrometheusRule", "ConfigMap"}


@pytest.mark.parametrize("values_file", ["gpu-multinode-values.yaml", "kuberay-values.yaml"])
def test_dashboard_configmap_embeds_the_dashboard_file(values_file):
    cm = render(values_file).get("ConfigMap", f"{fullname()}-dashboard")
    assert cm["metadata"]["labels"]["grafana_dashboard"] == "1", "label of the Grafana sidecar"
    (payload,) = cm["data"].values()
    assert payload == DASHBOARD_FILE.read_text().rstrip("\n")
    assert json.loads(payload)["uid"] == "mixserve-overview"
    if values_file == "gpu-multinode-values.yaml":
        assert cm["metadata"]["annotations"]["grafana_folder"] == "LLM serving"


def test_deploy_files_are_the_chart_files():
    """deploy/ holds the rules and the dashboard only as links to (or identical copies of) the chart's files."""
    pairs = [
        (DEPLOY / "prometheus" / "mixserve-rules.yaml", RULES_FILE),
        (DEPLOY / "grafana" / "mixserve-dashboard.json", DASHBOARD_FILE),
    ]
    for deploy_file, chart_file in pairs:
        assert deploy_file.read_bytes() == chart_file.read_bytes(), f"{deploy_file} differs from {chart_file}"
