"""`mixserve bench serve` end to end: a gateway on loopback over the Ray engine (0 workers) and the
transformers baseline, a two-point concurrency sweep; every point's fields (CPU seconds per process
among them), that the ratios pair each point with its baseline and reference, and the PNG."""

from __future__ import annotations

import json
import os

import pytest

from cluster.cli import main

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


@pytest.mark.timeout(240)
def test_concurrency_sweep_reports_client_latency_and_server_phases(ray_cluster, tiny8, tmp_path, capsys):
    argv = ["bench", "serve", "--model", str(tiny8), "--concurrency", "1,2", "--num-prompts", "2", "--input-len", "5",
            "--output-len", "4", "--workers", "0", "--threads", "1", "--warmup-tokens", "2", "--no-progress",
            "--out", str(tmp_path / "s.json"), "--plot", str(tmp_path / "s.png")]
    assert main(argv) == 0
    assert "CPU seconds per point and round" in capsys.readouterr().out
    report = json.loads((tmp_path / "s.json").read_text())
    assert report["mode"] == "serve"
    points = {(p["point"], p["engine"]): p for p in report["points"]}
    assert set(points) == {(c, e) for c in ("c=1", "c=2") for e in ("transformers", "ray")}
    for p in report["points"]:
        assert p["exact_output_len"] and p["errors"] == 0 and p["output_tokens"] == 8 and p["requests"] == 2
        assert p["output_tokens_per_s"] * p["seconds"] == pytest.approx(8)
        for stat in ("ttft", "itl", "tpot", "e2e"):
            assert set(p["latency"][stat]) == {"count", "mean", "p50", "p90", "p99"}
            assert p["latency"][stat]["count"] > 0
        assert p["latency"]["ttft"]["p50"] <= p["latency"]["e2e"]["p50"]
    ray_points = [p for p in report["points"] if p["engine"] == "ray"]
    assert all(p["server_phase_seconds"]["attention"] > 0 for p in ray_points)
    for p in report["points"]:  # per process: the bench's own, and with an engine its coordinator's
        expected = {"bench process", "coordinator"} if p["engine"] == "ray" else {"bench process"}
        assert set(p["cpu_seconds"]) == expected
        assert all(v > 0 for v in p["cpu_seconds"].values()), p["cpu_seconds"]
        assert sum(p["cpu_seconds"].values()) <= os.cpu_count() * (p["seconds"] + 0.5)
    assert report["reference_label"] == "mixserve Ray, 0 workers (experts in coordinator)"
    ratios = {(r["point"], r["ratios"]["label"]): r["ratios"] for r in report["ratios"]}
    assert set(ratios) == {(p["point"], p["label"]) for p in report["points"]}
    for c in ("c=1", "c=2"):
        assert ratios[(c, points[(c, "transformers")]["label"])]["tok_s_vs_transformers"] == 1.0
        assert ratios[(c, points[(c, "ray")]["label"])]["time_vs_reference"] == 1.0
    assert (tmp_path / "s.png").read_bytes()[:8] == PNG_MAGIC


@pytest.mark.timeout(240)
def test_prefix_caching_off_and_on_side_by_side(ray_cluster, tiny8, tmp_path, capsys):
    """A shared prefix, both settings in one run: one engine per setting, paired in the report, every request's
    greedy tokens the same both ways, and only the caching engine reusing blocks (never on its warm-up's prompts:
    the first request of the point computes the prefix)."""
    prefix, own, streams = 48, 8, 3
    argv = ["bench", "serve", "--model", str(tiny8), "--concurrency", str(streams), "--shared-prefix-len", str(prefix),
            "--input-len", str(own), "--output-len", "4", "--workers", "0", "--threads", "1", "--warmup-tokens", "2",
            "--max-batched-tokens", str(prefix + own), "--prefix-caching", "on,off", "--no-transformers",
            "--no-progress", "--out", str(tmp_path / "p.json")]
    assert main(argv) == 0
    assert "prefix caching off against on" in capsys.readouterr().out
    report = json.loads((tmp_path / "p.json").read_text())
    assert report["shared_prefix_len"] == prefix and report["settings"]["prefix_caching"] == "on,off"
    by_setting = {p["prefix_caching"]: p for p in report["points"]}
    assert set(by_setting) == {True, False} and all(p["errors"] == 0 for p in report["points"])
    assert by_setting[True]["label"].endswith("prefix caching on")
    (pair,) = report["prefix_cache"]
    assert (pair["point"], pair["workers"], pair["requests"]) == (f"c={streams}", 0, streams)
    assert pair["tokens_identical"] and pair["first_difference"] is None
    assert pair["ttft_p50_ratio"] == pytest.approx(pair["ttft_p50_off"] / pair["ttft_p50_on"])
    reused = by_setting[True]["prefix_cache_tokens"]
    assert reused["looked up"] == streams * (prefix + own)
    assert 0 < reused["reused"] <= (streams - 1) * prefix, reused
    assert by_setting[False]["prefix_cache_tokens"].get("reused", 0.0) == 0.0
