"""deploy/grafana/mixserve-dashboard.json (= helm/mixserve/files/mixserve-dashboard.json): structure, the
metrics each panel queries, and that every panel expression is PromQL that Prometheus parses."""

from __future__ import annotations

import json
import re
from itertools import combinations

import pytest
import yaml

from tests.deploy.helpers import DEPLOY, METRIC_NAMES, PER_COORDINATOR, find_tool, run

DASHBOARD = DEPLOY / "grafana" / "mixserve-dashboard.json"
DATASOURCE = {"type": "prometheus", "uid": "${datasource}"}
# Identifiers followed by a selector or a range: metric names (functions are followed by "(").
SELECTOR = re.compile(r"\b([a-zA-Z_:][a-zA-Z0-9_:]*)\s*(?=\{|\[)")
METRIC = re.compile(r"\bmixserve_[a-z0-9_]+\b")


@pytest.fixture(scope="module")
def dashboard() -> dict:
    return json.loads(DASHBOARD.read_text())


def panels(dashboard: dict) -> list[dict]:
    return [p for p in dashboard["panels"] if p["type"] != "row"]


def targets(dashboard: dict) -> list[tuple[dict, dict]]:
    return [(p, t) for p in panels(dashboard) for t in p["targets"]]


def test_dashboard_identity_and_datasource_variable(dashboard):
    assert dashboard["uid"] == "mixserve-overview" and dashboard["title"] == "mixserve"
    assert "id" not in dashboard or dashboard["id"] is None, "a provisioned dashboard carries no database id"
    (var,) = [v for v in dashboard["templating"]["list"] if v["name"] == "datasource"]
    assert var["type"] == "datasource" and var["query"] == "prometheus"
    assert "__inputs" not in dashboard, "the sidecar loads the JSON as is: no import placeholders"


def test_every_panel_queries_prometheus_through_the_variable(dashboard):
    ids = [p["id"] for p in dashboard["panels"]]
    assert len(ids) == len(set(ids)), "panel ids must be unique"
    for p in panels(dashboard):
        assert p["datasource"] == DATASOURCE, p["title"]
        assert p["targets"], f"panel {p['title']!r} has no query"
        for t in p["targets"]:
            assert t["datasource"] == DATASOURCE, p["title"]
            assert t["expr"].strip(), p["title"]


def test_panel_queries_use_only_gateway_metrics(dashboard):
    for p, t in targets(dashboard):
        expr = t["expr"]
        names = set(METRIC.findall(expr))
        assert names, f"{p['title']!r}: {expr} queries no mixserve metric"
        assert names <= METRIC_NAMES, f"{p['title']!r}: unknown metrics {names - METRIC_NAMES}"
        assert set(SELECTOR.findall(expr)) <= METRIC_NAMES, f"{p['title']!r}: {expr}"
        assert 'job="mixserve"' in expr, f"{p['title']!r}: select the gateway's job"
        assert "$" not in expr, f"{p['title']!r}: keep queries free of dashboard variables so they run as is"
        for window in re.findall(r"\[([^\]]+)\]", expr):
            assert window in {"1m", "5m"}, f"{p['title']!r}: range [{window}]"


def test_dashboard_covers_the_serving_signals(dashboard):
    def queried(pattern: str) -> list[dict]:
        return [p for p, t in targets(dashboard) if re.search(pattern, t["expr"])]

    for pattern in [
        r"rate\(mixserve_requests_total", r"mixserve_prompt_tokens_total", r"mixserve_generation_tokens_total",
        r"histogram_quantile\(0\.5, .*mixserve_time_to_first_token_seconds_bucket",
        r"histogram_quantile\(0\.99, .*mixserve_time_to_first_token_seconds_bucket",
        r"histogram_quantile\(0\.5, .*mixserve_inter_token_latency_seconds_bucket",
        r"histogram_quantile\(0\.99, .*mixserve_inter_token_latency_seconds_bucket",
        r"mixserve_num_requests_waiting", r"mixserve_num_requests_running", r"mixserve_kv_cache_usage_ratio",
        r"mixserve_batch_size", r"sum by \(phase\).*mixserve_step_phase_seconds", r"mixserve_worker_up",
        r"mixserve_request_queue_time_seconds_bucket", r"rate\(mixserve_request_replays_total",
        r"histogram_quantile\(0\.5, .*mixserve_recovery_seconds_bucket",
        r"histogram_quantile\(0\.99, .*mixserve_recovery_seconds_bucket",
        r"mixserve_worker_failures_total", r"mixserve_worker_recoveries_total",
    ]:
        assert queried(pattern), f"no panel queries {pattern}"
    expert_load = queried(r"by \(layer, expert\).*mixserve_expert_routed_tokens_total")
    assert [p for p in expert_load if p["type"] == "heatmap"], "a layer x expert heatmap of the routed tokens"


def test_dashboard_covers_the_coordinators(dashboard):
    """With --coordinators M each coordinator's health, placements, KV cache and queue have a line of their own,
    in the Coordinators row; the expert workers' own phase seconds have a panel too."""
    (row,) = [p for p in dashboard["panels"] if p["type"] == "row" and p["title"] == "Coordinators"]
    top = row["gridPos"]["y"]
    below = [p["gridPos"]["y"] for p in dashboard["panels"] if p["type"] == "row" and p["gridPos"]["y"] > top]
    in_row = [p for p in panels(dashboard) if top < p["gridPos"]["y"] < min(below, default=10**6)]

    def queried(pattern: str, among: list[dict]) -> list[dict]:
        return [p for p in among for t in p["targets"] if re.search(pattern, t["expr"])]

    health = queried(r"max by \(coordinator\) \(mixserve_coordinator_up\{", in_row)
    assert [p for p in health if p["type"] == "state-timeline"], "a state timeline of each coordinator's up gauge"
    for metric in sorted(PER_COORDINATOR - {"mixserve_coordinator_up"}):
        assert queried(rf"by \(coordinator\) \((rate\()?{metric}\{{", in_row), f"no per-coordinator panel of {metric}"
    for p in queried(r"by \(coordinator\)", in_row):
        assert all("{{coordinator}}" in t["legendFormat"] for t in p["targets"]), p["title"]
    (phases,) = queried(r"sum by \(worker, phase\) \(rate\(mixserve_worker_phase_seconds_total\{", panels(dashboard))
    assert phases["targets"][0]["legendFormat"] == "worker {{worker}} {{phase}}"
    assert phases["fieldConfig"]["defaults"]["unit"] == "percentunit", "seconds per second: a share of the time"


def test_dashboard_covers_the_expert_balancer(dashboard):
    """The balancer's runs, moves and moved copies, its move duration and its predicted imbalance of the current
    and the proposed placement have panels of their own, in the Expert balancer row."""
    (row,) = [p for p in dashboard["panels"] if p["type"] == "row" and p["title"] == "Expert balancer"]
    top = row["gridPos"]["y"]
    below = [p["gridPos"]["y"] for p in dashboard["panels"] if p["type"] == "row" and p["gridPos"]["y"] > top]
    in_row = {p["title"]: p for p in panels(dashboard) if top < p["gridPos"]["y"] < min(below, default=10**6)}
    assert set(in_row) >= {"Balancer runs and moves", "Balancer move duration",
                           "Predicted imbalance: current vs proposed"}, sorted(in_row)

    def exprs(title: str) -> list[str]:
        return [t["expr"] for t in in_row[title]["targets"]]

    for counter in ("runs", "moves", "moved_copies"):
        pattern = rf"^sum\((rate|increase)\(mixserve_balancer_{counter}_total\{{"
        assert [e for e in exprs("Balancer runs and moves") if re.search(pattern, e)], f"no rate of {counter}"
    for q in ("0.5", "0.99"):
        pattern = (rf"^histogram_quantile\({re.escape(q)}, sum by \(le\) "
                   r"\((rate|increase)\(mixserve_balancer_move_seconds_bucket\{")
        assert [e for e in exprs("Balancer move duration") if re.search(pattern, e)], f"no quantile {q} of moves"
    assert in_row["Balancer move duration"]["fieldConfig"]["defaults"]["unit"] == "s"
    predicted = in_row["Predicted imbalance: current vs proposed"]
    (target,) = predicted["targets"]
    assert re.search(r"by \(placement\) \(mixserve_balancer_predicted_imbalance\{", target["expr"]), target["expr"]
    assert target["legendFormat"] == "{{placement}}", "one line per placement: current and proposed"


def test_dashboard_covers_copy_failover(dashboard):
    """Copy failovers and rejoins of the left-out workers' replacements, and the expert workers left out right now,
    have panels of their own in the Failover row, beside the replays and the recovery time."""
    (row,) = [p for p in dashboard["panels"] if p["type"] == "row" and p["title"] == "Failover"]
    top = row["gridPos"]["y"]
    below = [p["gridPos"]["y"] for p in dashboard["panels"] if p["type"] == "row" and p["gridPos"]["y"] > top]
    in_row = {p["title"]: p for p in panels(dashboard) if top < p["gridPos"]["y"] < min(below, default=10**6)}
    assert set(in_row) >= {"Request replays / s", "Recovery time", "Copy failovers and worker rejoins",
                           "Expert workers left out"}, sorted(in_row)

    def exprs(title: str) -> list[str]:
        return [t["expr"] for t in in_row[title]["targets"]]

    for counter in ("copy_failovers", "worker_rejoins"):
        pattern = rf"^sum\((rate|increase)\(mixserve_{counter}_total\{{"
        assert [e for e in exprs("Copy failovers and worker rejoins") if re.search(pattern, e)], f"no rate of {counter}"
    (left_out,) = exprs("Expert workers left out")
    assert re.search(r"^(max|sum)\(mixserve_expert_workers_left_out\{", left_out), left_out
    assert in_row["Expert workers left out"]["fieldConfig"]["defaults"]["decimals"] == 0, "a count of workers"


def test_panels_do_not_overlap(dashboard):
    boxes = [(p["title"], p["gridPos"]) for p in dashboard["panels"]]
    for (a, ga), (b, gb) in combinations(boxes, 2):
        disjoint = (ga["x"] + ga["w"] <= gb["x"] or gb["x"] + gb["w"] <= ga["x"]
                    or ga["y"] + ga["h"] <= gb["y"] or gb["y"] + gb["h"] <= ga["y"])
        assert disjoint, f"panels {a!r} and {b!r} overlap"
    assert all(g["x"] + g["w"] <= 24 for _, g in boxes)


def test_every_panel_expression_parses_as_promql(dashboard, tmp_path):
    """promtool has no parse-only command: the expressions go into a rules file as recording rules."""
    rules = [{"record": f"mixserve:dashboard_panel_{p['id']}_{t['refId']}", "expr": t["expr"]}
             for p, t in targets(dashboard)]
    path = tmp_path / "dashboard-exprs.yaml"
    path.write_text(yaml.safe_dump({"groups": [{"name": "dashboard", "rules": rules}]}))
    out = run([find_tool("promtool"), "check", "rules", str(path)])
    assert f"SUCCESS: {len(rules)} rules found" in out.stdout, out.stdout + out.stderr
