"""serve.redundantExperts, serve.routingProfile and serve.balancer in the Helm chart (issue 22): each becomes its
`mixserve serve` flag only when set (redundantExperts > 0, a non-empty profile path, balancer.interval > 0, which
then passes the balancer's window and threshold too), and the chart refuses expert copies or a balancer without
expert workers."""

from __future__ import annotations

import pytest

from tests.deploy.helpers import helm_lint, helm_template, render, serve_args, validate_rendered

FLAGS = ("redundant-experts", "routing-profile", "balance-interval", "balance-window", "balance-threshold")
COPIES = ("--set", "serve.redundantExperts=2")
BALANCER = ("--set", "serve.balancer.interval=30")


@pytest.mark.parametrize("values_file", [None, "cpu-values.yaml", "kuberay-values.yaml"])
def test_defaults_pass_none_of_the_flags(values_file):
    args = serve_args(render(values_file))
    assert not set(FLAGS) & set(args), args


def test_redundant_experts_alone():
    args = serve_args(render(None, *COPIES))
    assert args["redundant-experts"] == "2"
    assert not {"routing-profile", "balance-interval", "balance-window", "balance-threshold"} & set(args), args


def test_routing_profile_path_is_passed_as_is():
    args = serve_args(render(None, *COPIES, "--set", "serve.routingProfile=/models/profiles/routing 1.json"))
    assert args["routing-profile"] == "/models/profiles/routing 1.json"
    assert "balance-interval" not in args


def test_balancer_on_passes_interval_window_and_threshold():
    args = serve_args(render(None, *COPIES, *BALANCER))
    assert (args["balance-interval"], args["balance-window"], args["balance-threshold"]) == ("30", "300", "0.05")
    assert args["redundant-experts"] == "2"


def test_balancer_values_from_a_file_keep_their_form(tmp_path):
    """Numbers from a values file are floats in Helm: whole ones render without an exponent (1e+06)."""
    values = tmp_path / "balancer.yaml"
    values.write_text("serve:\n  redundantExperts: 8\n  balancer:\n    interval: 0.5\n    window: 1000000\n"
                      "    threshold: 0.1\n")
    args = serve_args(render(None, "-f", str(values)))
    assert (args["balance-interval"], args["balance-window"], args["balance-threshold"]) == ("0.5", "1000000", "0.1")
    assert args["redundant-experts"] == "8"


def test_fractions_from_set_are_strings_and_pass_as_written():
    """`helm --set` passes 0.5 as the string "0.5": the schema takes decimal strings, the flags carry them as is."""
    args = serve_args(render(None, *COPIES, "--set", "serve.balancer.interval=0.5", "--set",
                             "serve.balancer.threshold=0.2", "--set", "serve.balancer.window=90.5"))
    assert (args["balance-interval"], args["balance-window"], args["balance-threshold"]) == ("0.5", "90.5", "0.2")


def test_balancer_on_kuberay_head():
    args = serve_args(render("kuberay-values.yaml", *COPIES, *BALANCER, "--set", "serve.balancer.window=60"))
    assert (args["redundant-experts"], args["balance-interval"], args["balance-window"]) == ("2", "30", "60")


def test_balancer_off_passes_no_balancer_flag_whatever_its_window():
    args = serve_args(render(None, *COPIES, "--set", "serve.balancer.window=60", "--set",
                             "serve.balancer.threshold=0.2"))
    assert not {"balance-interval", "balance-window", "balance-threshold"} & set(args), args


def test_lint_and_kubernetes_schemas_with_copies_and_balancer():
    args = (*COPIES, *BALANCER, "--set", "serve.routingProfile=/models/profile.json")
    assert "0 chart(s) failed" in helm_lint(None, *args).stdout
    validate_rendered(render(None, *args))


@pytest.mark.parametrize(("args", "message"), [
    (COPIES, "serve.redundantExperts (2) > 0 needs serve.expertWorkers >= 1, got 0"),
    (("--set", "serve.balancer.interval=0.5"), "serve.balancer.interval (0.5) > 0 needs serve.expertWorkers >= 1, "
                                               "got 0"),
], ids=["redundant-experts", "balancer"])
def test_copies_and_balancer_need_expert_workers(args, message):
    without_workers = ("--set", "serve.expertWorkers=0")
    # the schema refuses expertWorkers 0 whatever else is set
    proc = helm_template(None, *args, *without_workers, check=False)
    assert proc.returncode != 0 and "serve/expertWorkers" in proc.stderr, proc.stderr
    # the chart's own check, reached without the schema, names both values
    proc = helm_template(None, *args, *without_workers, "--skip-schema-validation", check=False)
    assert proc.returncode != 0, f"rendered {args} without expert workers"
    assert message in proc.stderr, proc.stderr


@pytest.mark.parametrize(("value", "where"), [
    ("serve.redundantExperts=-1", "serve/redundantExperts"),
    ("serve.redundantExperts=1.5", "serve/redundantExperts"),
    ("serve.balancer.interval=-1", "serve/balancer/interval"),
    ("serve.balancer.window=0", "serve/balancer/window"),
    ("serve.balancer.threshold=-0.1", "serve/balancer/threshold"),
    ("serve.balancer.threshold=2", "serve/balancer/threshold"),
    ("serve.balancer.interval=1e3", "serve/balancer/interval"),  # decimal strings only
    ("serve.balancer.threshold=abc", "serve/balancer/threshold"),
    ("serve.balancer.intervall=30", "intervall"),
])
def test_schema_rejects_bad_values(value, where):
    proc = helm_template(None, "--set", value, check=False)
    assert proc.returncode != 0 and where in proc.stderr, proc.stderr


@pytest.mark.parametrize(("value", "message"), [
    ("serve.balancer.threshold=1.5", "serve.balancer.threshold (1.5) must be within 0 and 1"),
    ("serve.balancer.window=0.0", "serve.balancer.window (0.0) must be > 0 seconds"),
])
def test_chart_bounds_decimal_strings(value, message):
    """The schema's minimum and maximum bound numbers only: the chart checks the strings --set makes of fractions."""
    proc = helm_template(None, "--set", value, check=False)
    assert proc.returncode != 0 and message in proc.stderr, proc.stderr
