"""The capacity model's arithmetic on hand-computed inputs: FLOPs and bytes of a tiny shape, all-to-all volume,
node placement and cross-node shares, the ping-pong schedule against serial, the fit to DeepEP's published
latencies, and the CPU check read from a benchmark JSON. Nothing runs but arithmetic."""

from __future__ import annotations

import json
import math
from dataclasses import replace
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from cluster.bench.capacity import (
    H100_SXM,
    H200_SXM,
    HGX_HOPPER,
    MIXTRAL_8X7B,
    W2_DECODE_LAYER,
    Fabric,
    Gpu,
    LayerTimes,
    ModelShape,
    Placement,
    all_to_all_bytes,
    attention_flops_bytes,
    decode_layer_bound,
    deepep_check,
    expert_flops_bytes,
    experts_per_gpu,
    pingpong_seconds,
    project,
    read_cpu_run,
    roofline_half_scales,
    run_overlap_bound,
)

TINY = ModelShape(name="tiny", hidden=8, intermediate=16, layers=2, experts=4, top_k=2, heads=2, kv_heads=1,
                  head_dim=4, vocab=10)
REPO = Path(__file__).resolve().parents[2]


def test_tiny_shape_flops_and_bytes_are_the_hand_counts():
    assert TINY.attention_params == 8 * 4 * 4 + 2 * 4 * 8 == 192
    assert TINY.expert_params == 3 * 8 * 16 == 384
    assert TINY.kv_bytes_per_token == 2 * 1 * 4 * 2 == 16
    assert TINY.dense_bytes == (2 * (192 + 32 + 16) + 2 * 10 * 8 + 8) * 2
    # 3 tokens, 5 keys each: projections + router (224 weights), QKᵀ and PV; weights once, K/V of 15 keys
    assert attention_flops_bytes(TINY, 3, 5) == (2 * 3 * 224 + 4 * 3 * 5 * 2 * 4, 224 * 2 + 3 * 5 * 16)
    # 2 coordinators × 3 tokens × top-2 over 2 expert GPUs: 6 rows each; 2 local experts, each hit w.p. 1 − (1/2)^6
    flops, bytes_ = expert_flops_bytes(TINY, Placement(coordinators=2, expert_gpus=2, nodes=1), 3)
    assert flops == 2 * 6 * 384
    assert bytes_ == pytest.approx((2 * (1 - 0.5**6) * 384 + 2 * 6 * 8) * 2)


def test_mixtral_8x7b_has_its_published_46_7b_parameters():
    total = MIXTRAL_8X7B.dense_bytes / 2 + MIXTRAL_8X7B.layers * MIXTRAL_8X7B.experts * MIXTRAL_8X7B.expert_params
    assert total == pytest.approx(46.7e9, rel=1e-3)
    assert MIXTRAL_8X7B.kv_bytes_per_token * MIXTRAL_8X7B.layers == 128 * 1024  # 128 KiB of K/V a token


def test_all_to_all_bytes_scale_with_top_k_and_are_counted_every_layer_both_ways():
    top1 = replace(MIXTRAL_8X7B, top_k=1)
    assert all_to_all_bytes(MIXTRAL_8X7B, 64) == 2 * all_to_all_bytes(top1, 64) == 64 * 2 * 4096 * 2
    placement = Placement(coordinators=2, expert_gpus=4, nodes=1)
    p = project(MIXTRAL_8X7B, H100_SXM, HGX_HOPPER, placement, batch=64, context=512)
    assert p.all_to_all_bytes_per_step == 2 * 32 * 2 * 64 * 2 * 4096 * 2
    assert project(top1, H100_SXM, HGX_HOPPER, placement, batch=64, context=512).all_to_all_bytes_per_step == \
        p.all_to_all_bytes_per_step / 2
    assert p.cross_node_bytes_per_step == 0  # one node


@pytest.mark.parametrize("nodes", [1, 2, 3, 4])
def test_cross_node_share_for_expert_gpus_spread_over_nodes(nodes):
    placement = Placement(coordinators=nodes, expert_gpus=4 * nodes, nodes=nodes)
    share = (nodes - 1) / nodes
    assert placement.experts_per_node == (4,) * nodes and placement.coordinators_per_node == (1,) * nodes
    assert placement.cross_node_share() == pytest.approx(share)
    assert placement.send_fractions() == pytest.approx((1 - share, share))
    assert placement.receive_fractions() == pytest.approx((1 - share, share))


def test_uneven_placements_take_the_busiest_rank_and_refuse_what_does_not_fit():
    p = Placement(coordinators=1, expert_gpus=8, nodes=2)  # experts 4 + 4, the coordinator on the last node
    assert p.coordinators_per_node == (0, 1) and p.send_fractions() == (0.5, 0.5)
    assert p.receive_fractions() == (0.0, 1.0)  # the first node's expert GPUs get every row from afar
    p = Placement(coordinators=4, expert_gpus=16, nodes=3)  # experts 6, 5, 5; coordinators 1, 1, 2
    assert p.experts_per_node == (6, 5, 5) and p.coordinators_per_node == (1, 1, 2)
    assert p.send_fractions() == pytest.approx((5 / 16, 11 / 16))
    assert p.cross_node_share() == pytest.approx((10 / 16 + 11 / 16 + 2 * 11 / 16) / 4)
    with pytest.raises(ValueError, match="node 0 would hold 12 GPUs"):
        Placement(coordinators=4, expert_gpus=8, nodes=1)
    with pytest.raises(ValueError, match="nodes"):
        Placement(coordinators=1, expert_gpus=2, nodes=4)


def test_experts_per_gpu_shards_or_replicates():
    assert experts_per_gpu(MIXTRAL_8X7B, 2) == (4, 1)
    assert experts_per_gpu(MIXTRAL_8X7B, 8) == (1, 1)
    assert experts_per_gpu(MIXTRAL_8X7B, 16) == (1, 2)
    with pytest.raises(ValueError, match="expert_gpus"):
        experts_per_gpu(MIXTRAL_8X7B, 3)


times = st.floats(min_value=0.0, max_value=1.0, allow_nan=False)


@given(times, times, times, times)
def test_when_every_stage_halves_with_the_batch_pingpong_is_never_slower(a, d, x, c):
    full = LayerTimes(attention=a, dispatch=d, experts=x, combine=c)
    half = LayerTimes(attention=a / 2, dispatch=d / 2, experts=x / 2, combine=c / 2)
    assert pingpong_seconds(half) == pytest.approx(max(a, d, x, c, full.serial / 2))
    assert pingpong_seconds(half) <= full.serial + 1e-12


def test_pingpong_hides_the_shorter_of_attention_and_experts():
    half = LayerTimes(attention=2.0, dispatch=0.1, experts=5.0, combine=0.1)
    assert pingpong_seconds(half) == 10.0  # the expert GPU does both halves back to back
    assert pingpong_seconds(replace(half, dispatch=3.0, combine=3.0)) == 13.0  # the chain of one half


def test_weight_bound_decode_does_not_split_and_large_batches_do():
    placement = Placement(coordinators=4, expert_gpus=4, nodes=1)
    small = project(MIXTRAL_8X7B, H100_SXM, HGX_HOPPER, placement, batch=16, context=1024)
    # each micro-batch still reads every local expert's weights: the expert GPU's time doubles
    assert small.half.experts == pytest.approx(small.full.experts, rel=0.01)
    assert small.pingpong_step_s > small.serial_step_s and small.step_s == small.serial_step_s
    assert small.tokens_per_s_per_gpu() == small.tokens_per_s_per_gpu(overlap=False)
    large = project(MIXTRAL_8X7B, H100_SXM, HGX_HOPPER, placement, batch=256, context=1024)
    assert large.pingpong_step_s < large.serial_step_s
    assert large.tokens_per_s_per_gpu() == pytest.approx(4 * 256 / large.pingpong_step_s / 8)


@pytest.mark.parametrize("gpu", [H100_SXM, H200_SXM])
def test_overlap_is_never_slower_and_more_bandwidth_is_never_slower(gpu):
    for m, n, k in [(1, 2, 1), (2, 4, 1), (4, 4, 1), (4, 8, 2), (2, 16, 3), (4, 16, 4)]:
        placement = Placement(coordinators=m, expert_gpus=n, nodes=k)
        for batch in (8, 64, 512):
            p = project(MIXTRAL_8X7B, gpu, HGX_HOPPER, placement, batch=batch, context=2048)
            assert p.tokens_per_s_per_gpu() >= p.tokens_per_s_per_gpu(overlap=False)
            faster = project(MIXTRAL_8X7B, replace(gpu, hbm_bytes_per_s=2 * gpu.hbm_bytes_per_s), HGX_HOPPER,
                             placement, batch=batch, context=2048)
            assert faster.step_s <= p.step_s
    assert project(MIXTRAL_8X7B, H200_SXM, HGX_HOPPER, Placement(coordinators=4, expert_gpus=4, nodes=1), batch=128,
                   context=2048).step_s < project(MIXTRAL_8X7B, H100_SXM, HGX_HOPPER,
                                                  Placement(coordinators=4, expert_gpus=4, nodes=1), batch=128,
                                                  context=2048).step_s


def test_memory_fit_counts_kv_and_weights():
    placement = Placement(coordinators=4, expert_gpus=4, nodes=1)
    assert project(MIXTRAL_8X7B, H100_SXM, HGX_HOPPER, placement, batch=128, context=2048).fits
    # 256 × 4096 tokens × 128 KiB = 137 GB of K/V
    assert not project(MIXTRAL_8X7B, H200_SXM, HGX_HOPPER, placement, batch=256, context=4096).fits
    # all 8 experts on 2 GPUs: 4 × 32 layers × 352 MB = 45 GB each
    assert project(MIXTRAL_8X7B, H100_SXM, HGX_HOPPER, Placement(coordinators=1, expert_gpus=2, nodes=1), batch=8,
                   context=128).fits
    tiny_gpu = replace(H100_SXM, memory_bytes=40e9)
    assert not project(MIXTRAL_8X7B, tiny_gpu, HGX_HOPPER, Placement(coordinators=1, expert_gpus=2, nodes=1), batch=8,
                       context=128).fits


def test_exchange_time_is_latency_plus_the_slower_link():
    fabric = Fabric(name="t", nvlink_bytes_per_s=100.0, rdma_bytes_per_s=10.0, latency_s=1.0)
    assert fabric.all_to_all_seconds(1000.0, 0.5, 0.5) == 1.0 + 50.0
    assert fabric.all_to_all_seconds(1000.0, 1.0, 0.0) == 1.0 + 10.0
    gpu = Gpu(name="g", peak_flops=10.0, hbm_bytes_per_s=10.0, memory_bytes=1.0, flops_efficiency=0.5,
              bandwidth_efficiency=1.0)
    assert gpu.seconds(10.0, 10.0) == 2.0 and gpu.seconds(1.0, 30.0) == 3.0


def test_the_exchange_formula_reproduces_deepeps_published_low_latency_table():
    rows = deepep_check()
    assert len(rows) == 12
    for ep, kind, published, model in rows:
        assert model == pytest.approx(published, rel=0.10), (ep, kind)


def _bench_json(tmp_path: Path, *, matmul: float = 1e11, bandwidth: float = 1e10) -> Path:
    run = {"engine": "ray", "workers": 1, "label": "Ray, 1 worker", "seconds": 11.0, "run_seconds": [10.0, 11.0, 12.0],
           "phase_seconds": {"attention": 2.0, "routing": 0.5, "dispatch": 1.0, "combine": 7.0},
           "worker_phase_seconds": [{"experts": 6.0}], "cpu_seconds": {"bench process": 0.5, "coordinator": 4.0,
                                                                        "worker 0": 13.5}}
    data = {"meta": {"logical_cpus": 2, "cpu": "test"}, "settings": {"threads_per_rank": "2", "dtype": "float32"},
            "model": {"hidden_size": 64, "intermediate_size": 128, "layers": 2, "experts": 8, "top_k": 2, "heads": 4,
                      "kv_heads": 2, "vocab_size": 100},
            "workload": {"num_prompts": 32, "input_len": 16, "output_len": 8},
            "compute_floor": {"matmul": {"best": matmul}}, "roofline_floor": {"bandwidth": {"best": bandwidth}},
            "runs": [{"engine": "in-process", "workers": None, "seconds": 9.0}, run]}
    path = tmp_path / "bench.json"
    path.write_text(json.dumps(data))
    return path


def test_cpu_run_is_read_and_bounded_by_the_schedule_and_the_cores(tmp_path):
    run = read_cpu_run(_bench_json(tmp_path))
    assert (run.wall_s, run.attention_s, run.experts_s, run.cpu_s, run.cores) == (11.0, 2.5, 6.0, 18.0, 2)
    assert run.exchange_s == pytest.approx(2.5 + 1.0 + 7.0 - 2.5 - 6.0)  # coordinator's layers less both computes
    assert run.other_s == pytest.approx(11.0 - 10.5) and run.in_process_median_s == 9.0
    bound = run_overlap_bound(run)
    # halves: attention 1.25, experts 3.0, hand-offs 2.0 kept whole: the chain 6.25 binds
    assert bound.schedule_s == pytest.approx(0.5 + 6.25)
    assert bound.cores_s == 9.0 and bound.projected_s == 9.0


def test_decode_layer_bound_on_two_shared_cores():
    linear = decode_layer_bound(W2_DECODE_LAYER, attention_scale=0.5, experts_scale=0.5, cores=2, threads_per_rank=2)
    assert linear.serial_s == pytest.approx(18.2e-3)
    assert linear.schedule_s == pytest.approx(11.8e-3)  # the worker does both halves of its 11.8 ms
    assert linear.cores_s == pytest.approx(4.3e-3 + 11.8e-3)  # both ranks' work over both cores: no idle left
    weights = decode_layer_bound(W2_DECODE_LAYER, attention_scale=0.5, experts_scale=0.8, cores=2,
                                 threads_per_rank=2)
    assert weights.projected_s > weights.serial_s  # reading the experts twice costs more than the overlap hides
    own_cores = decode_layer_bound(W2_DECODE_LAYER, attention_scale=0.5, experts_scale=0.5, cores=8,
                                   threads_per_rank=2)
    assert own_cores.projected_s == pytest.approx(11.8e-3)


def test_roofline_half_scales_follow_the_binding_rate(tmp_path):
    flop_bound = roofline_half_scales(_bench_json(tmp_path, matmul=1e6, bandwidth=math.inf))
    assert flop_bound == pytest.approx((0.5, 0.5))
    attention, experts = roofline_half_scales(_bench_json(tmp_path, matmul=math.inf, bandwidth=1e9))
    assert experts > 0.95  # 16 tokens still hit nearly all 8 experts: the weight reads stay
    assert 0.5 < attention < 1.0  # the weights stay, the K/V halves


def test_recorded_w2_run_gives_the_figures_docs_scaling_states():
    path = REPO / "benchmarks" / "w2_offline.json"
    run = read_cpu_run(path)
    bound = run_overlap_bound(run)
    assert run.wall_s == pytest.approx(11.58, abs=0.01) and run.cpu_s == pytest.approx(18.65, abs=0.01)
    assert bound.projected_s == pytest.approx(9.33, abs=0.01) and bound.projected_s == bound.cores_s
    attention, experts = roofline_half_scales(path)
    assert attention == pytest.approx(0.5) and experts == pytest.approx(0.76, abs=0.01)
