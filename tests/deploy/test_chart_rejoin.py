"""serve.rejoinDelay in the Helm chart (issue 22, failover onto surviving expert copies): the seconds between a
failed expert worker's replacement being loaded and its rejoining the group become `--rejoin-delay` only when
> 0, and the schema refuses a negative delay."""

from __future__ import annotations

import pytest

from tests.deploy.helpers import helm_lint, helm_template, render, serve_args, validate_rendered

COPIES = ("--set", "serve.redundantExperts=2")


@pytest.mark.parametrize("values_file", [None, "cpu-values.yaml", "kuberay-values.yaml"])
def test_default_passes_no_rejoin_delay(values_file):
    args = serve_args(render(values_file))
    assert "rejoin-delay" not in args, args


def test_zero_passes_no_rejoin_delay():
    args = serve_args(render(None, *COPIES, "--set", "serve.rejoinDelay=0"))
    assert "rejoin-delay" not in args, args
    assert args["redundant-experts"] == "2"


@pytest.mark.parametrize(("value", "flag"), [("30", "30"), ("0.5", "0.5")], ids=["whole", "fraction"])
def test_rejoin_delay_from_set(value, flag):
    """`helm --set` passes 30 as a number and 0.5 as the string "0.5": both reach the flag as written."""
    args = serve_args(render(None, *COPIES, "--set", f"serve.rejoinDelay={value}"))
    assert args["rejoin-delay"] == flag
    assert args["redundant-experts"] == "2"


def test_rejoin_delay_from_a_file_keeps_its_form(tmp_path):
    """Numbers from a values file are floats in Helm: whole ones render without an exponent (1e+06)."""
    for value, flag in (("2.5", "2.5"), ("1000000", "1000000")):
        values = tmp_path / "rejoin.yaml"
        values.write_text(f"serve:\n  redundantExperts: 2\n  rejoinDelay: {value}\n")
        assert serve_args(render(None, "-f", str(values)))["rejoin-delay"] == flag


def test_rejoin_delay_on_kuberay_head():
    args = serve_args(render("kuberay-values.yaml", *COPIES, "--set", "serve.rejoinDelay=15"))
    assert (args["redundant-experts"], args["rejoin-delay"]) == ("2", "15")


def test_lint_and_kubernetes_schemas_with_a_rejoin_delay():
    args = (*COPIES, "--set", "serve.rejoinDelay=15")
    assert "0 chart(s) failed" in helm_lint(None, *args).stdout
    validate_rendered(render(None, *args))


@pytest.mark.parametrize("value", ["-1", "-0.5", "abc", "1e3"])
def test_schema_rejects_bad_rejoin_delays(value):
    proc = helm_template(None, *COPIES, "--set", f"serve.rejoinDelay={value}", check=False)
    assert proc.returncode != 0 and "serve/rejoinDelay" in proc.stderr, proc.stderr
