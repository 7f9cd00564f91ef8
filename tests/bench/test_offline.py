"""`mixserve bench offline` end to end on a tiny checkpoint: transformers, in-process and Ray with 0 and 1
expert workers. Checks the JSON's fields (each process's CPU seconds among them), that every engine's greedy
float32 tokens equal transformers', that the ratios pair each run with its baseline and reference, the
floor formula, and the PNG. Performance is reported, never asserted."""

from __future__ import annotations

import dataclasses
import json
import os

import pytest

from cluster.bench.machine import ComputeFloor, MatmulRate, MemoryBandwidth, ParamsPerToken, RooflineFloor, RunMeta
from cluster.bench.report import EngineRun, Ratios
from cluster.bench.workload import Workload
from cluster.cli import main
from workers.config import ModelConfig

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
LABELS = ["transformers (batched generate)", "mixserve in-process (no Ray)",
          "mixserve Ray, 0 workers (experts in coordinator)", "mixserve Ray, 1 expert worker"]


def names(cls) -> set[str]:
    return {f.name for f in dataclasses.fields(cls)}


@pytest.fixture(scope="module")
def offline(ray_cluster, tiny8, tmp_path_factory):
    out = tmp_path_factory.mktemp("bench")
    argv = ["bench", "offline", "--model", str(tiny8), "--num-prompts", "3", "--input-len", "6", "--output-len", "5",
            "--workers", "0,1", "--threads", "1", "--warmup-tokens", "2", "--no-progress",
            "--out", str(out / "r.json"), "--plot", str(out / "r.png")]
    assert main(argv) == 0
    return json.loads((out / "r.json").read_text()), out


@pytest.mark.timeout(240)
def test_json_has_every_field(offline):
    report, _ = offline
    assert report["mode"] == "offline"
    top = {"meta", "model", "workload", "settings", "compute_floor", "roofline_floor", "reference_label", "runs",
           "ratios"}
    assert top <= set(report)
    assert names(RunMeta) <= set(report["meta"])
    assert names(Workload) | {"output_tokens", "forwarded_tokens"} <= set(report["workload"])
    assert names(ComputeFloor) <= set(report["compute_floor"])
    assert names(ParamsPerToken) <= set(report["compute_floor"]["params"])
    assert names(MatmulRate) | {"best"} <= set(report["compute_floor"]["matmul"])
    assert names(RooflineFloor) <= set(report["roofline_floor"])
    assert names(MemoryBandwidth) | {"best"} <= set(report["roofline_floor"]["bandwidth"])
    assert [r["label"] for r in report["runs"]] == LABELS
    for run in report["runs"]:
        assert names(EngineRun) <= set(run)
        assert run["exact_output_len"] is True
        assert run["output_tokens"] == 3 * 5 and run["requests"] == 3
        assert run["agreement_with_transformers"] == 1.0, "greedy float32 tokens equal transformers' (DESIGN.md)"
    for run in report["runs"][1:]:
        assert set(run["phase_seconds"]) >= {"attention", "routing", "experts", "sampling"}
        assert run["steps"] >= 5
    ray1 = report["runs"][3]
    assert len(ray1["worker_phase_seconds"]) == 1 and ray1["worker_phase_seconds"][0]["experts"] > 0
    # CPU seconds by process: the bench process runs transformers and the in-process engine (and drives Ray)
    processes = [{"bench process"}, {"bench process"}, {"bench process", "coordinator"},
                 {"bench process", "coordinator", "worker 0"}]
    for run, expected in zip(report["runs"], processes, strict=True):
        assert set(run["cpu_seconds"]) == expected and all(v > 0 for v in run["cpu_seconds"].values()), run
        mean_wall = sum(run["run_seconds"]) / len(run["run_seconds"])
        assert sum(run["cpu_seconds"].values()) <= os.cpu_count() * (mean_wall + 0.5)
    assert [r["label"] for r in report["ratios"]] == LABELS and names(Ratios) <= set(report["ratios"][0])


@pytest.mark.timeout(240)
def test_ratios_pair_each_run_with_the_baseline_and_the_reference(offline):
    report, _ = offline
    ratios = {r["label"]: r for r in report["ratios"]}
    assert report["reference_label"] == LABELS[1]
    assert ratios[LABELS[0]]["tok_s_vs_transformers"] == 1.0, "transformers against itself"
    assert ratios[LABELS[1]]["time_vs_reference"] == 1.0, "the reference against itself"
    assert report["roofline_floor"]["floor_seconds"] >= report["compute_floor"]["floor_seconds"], (
        "the roofline adds memory time to the same FLOPs")
    for run in report["runs"]:
        ratio = ratios[run["label"]]
        assert run["output_tokens_per_s"] * run["seconds"] == pytest.approx(3 * 5)
        assert run["seconds"] == sorted(run["run_seconds"])[len(run["run_seconds"]) // 2] == run["best_seconds"]
        assert 0 < ratio["floor_fraction"] <= ratio["roofline_fraction"]


@pytest.mark.timeout(240)
def test_compute_floor_follows_the_stated_formula(offline, tiny8):
    report, _ = offline
    cfg = ModelConfig.from_model_dir(tiny8)
    d, dh, f = cfg.hidden_size, cfg.head_dim, cfg.intermediate_size
    h, hkv, e, k, v, layers = (cfg.num_attention_heads, cfg.num_key_value_heads, cfg.num_local_experts,
                               cfg.num_experts_per_tok, cfg.vocab_size, cfg.num_hidden_layers)
    t_fwd, t_sampled = 3 * (6 + 5 - 1), 3 * 5
    expected = 2 * (t_fwd * layers * (d * (h + 2 * hkv) * dh + h * dh * d + d * e + k * 3 * d * f) + t_sampled * v * d)
    floor = report["compute_floor"]
    assert floor["flops"] == expected
    assert floor["floor_seconds"] == pytest.approx(expected / max(floor["matmul"]["flops_per_s"]))
    assert "T_fwd" in floor["formula"]


@pytest.mark.timeout(240)
def test_plot_is_a_png(offline):
    _, out = offline
    assert (out / "r.png").read_bytes()[:8] == PNG_MAGIC
