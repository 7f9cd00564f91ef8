"""deploy/prometheus: the scrape config, the alert rules and their promtool unit tests."""

from __future__ import annotations

import re

import yaml

from tests.deploy.helpers import DEPLOY, PER_COORDINATOR, RULES_FILE, find_tool, run

PROM = DEPLOY / "prometheus"


def test_promtool_check_config():
    out = run([find_tool("promtool"), "check", "config", "prometheus.yml"], cwd=PROM)
    assert "SUCCESS" in out.stdout + out.stderr


def test_scrape_config_targets_the_local_gateway():
    config = yaml.safe_load((PROM / "prometheus.yml").read_text())
    (job,) = [j for j in config["scrape_configs"] if j["job_name"] == "mixserve"]
    assert job.get("metrics_path", "/metrics") == "/metrics"
    targets = [t for sc in job["static_configs"] for t in sc["targets"]]
    assert targets == ["127.0.0.1:9400"]
    assert config["rule_files"] == ["mixserve-rules.yaml"]


def test_promtool_check_rules():
    out = run([find_tool("promtool"), "check", "rules", str(RULES_FILE)])
    assert "SUCCESS" in out.stdout + out.stderr


def test_promtool_unit_tests_pass():
    out = run([find_tool("promtool"), "test", "rules", "mixserve-rules_test.yaml"], cwd=PROM)
    assert "SUCCESS" in out.stdout + out.stderr, out.stdout + out.stderr


def test_unit_tests_cover_every_alert_firing_and_not_firing():
    alerts = {r["alert"] for g in yaml.safe_load(RULES_FILE.read_text())["groups"] for r in g["rules"]}
    tests = yaml.safe_load((PROM / "mixserve-rules_test.yaml").read_text())["tests"]
    fired, quiet = set(), set()
    for test in tests:
        for case in test.get("alert_rule_test", []):
            (fired if case["exp_alerts"] else quiet).add(case["alertname"])
    assert alerts - fired == set(), "alerts never tested firing"
    assert alerts - quiet == set(), "alerts never tested not firing"


def test_per_coordinator_alerts_name_the_coordinator():
    """An alert on a per-coordinator series fires once per coordinator: its summary and description say which."""
    rules = [r for g in yaml.safe_load(RULES_FILE.read_text())["groups"] for r in g["rules"]]
    per_coordinator = [r for r in rules if set(re.findall(r"\bmixserve_[a-z0-9_]+", r["expr"])) & PER_COORDINATOR]
    assert {r["alert"] for r in per_coordinator} >= {
        "MixServeCoordinatorDown", "MixServeKVCacheNearlyFull", "MixServeQueueGrowing",
    }
    for rule in per_coordinator:
        for kept in re.findall(r"\bby \(([^)]*)\)", rule["expr"]):
            assert "coordinator" in kept, f"{rule['alert']}: by ({kept}) drops the coordinator label"
        for field in ("summary", "description"):
            assert "{{ $labels.coordinator }}" in rule["annotations"][field], f"{rule['alert']} {field}"
