"""The roofline floor's arithmetic: its FLOPs are the compute floor's, its bytes follow the stated formula,
and each step takes the slower of the two; and the machine rates it divides by. No engine runs."""

from __future__ import annotations

import math

import pytest
import torch

from cluster.bench.machine import (
    MatmulRate,
    MemoryBandwidth,
    compute_floor,
    copy_bandwidth,
    experts_hit,
    measure_matmul_flops,
    roofline_floor,
)
from cluster.bench.workload import Workload
from workers.config import ModelConfig

CFG = ModelConfig(vocab_size=1000, hidden_size=64, intermediate_size=96, num_hidden_layers=3, num_attention_heads=4,
                  num_key_value_heads=2, head_dim=16, num_local_experts=8, num_experts_per_tok=2, rms_norm_eps=1e-5,
                  rope_theta=1e6, sliding_window=None, max_position_embeddings=256)
WORKLOAD = Workload(num_prompts=5, input_len=7, output_len=4)


def bandwidth(bytes_per_s: float) -> MemoryBandwidth:
    return MemoryBandwidth(copy_bytes=1, device="cpu", threads=1, bytes_per_s=(bytes_per_s / 2, bytes_per_s))


def floor(cfg: ModelConfig = CFG, *, flops_per_s: float, bytes_per_s: float, max_num_seqs: int = 32,
          workload: Workload = WORKLOAD):
    return roofline_floor(cfg, workload, max_num_seqs=max_num_seqs, matmul_flops_per_s=flops_per_s,
                          bandwidth=bandwidth(bytes_per_s), element_size=4)


def test_with_free_memory_it_is_the_compute_floor():
    rate = MatmulRate(size=1, dtype="float32", device="cpu", threads=1, flops_per_s=(1e9,))
    roof = floor(flops_per_s=1e9, bytes_per_s=math.inf)
    assert roof.floor_seconds == pytest.approx(compute_floor(CFG, WORKLOAD, rate).floor_seconds)
    assert roof.decode_memory_bound_steps == 0
    assert roof.batch_sizes == (5,) and roof.decode_steps == 3


def test_with_free_flops_it_is_the_bytes_of_the_stated_formula():
    roof = floor(flops_per_s=math.inf, bytes_per_s=1.0)
    d, f, e, layers = CFG.hidden_size, CFG.intermediate_size, CFG.num_local_experts, CFG.num_hidden_layers
    weights = d * (4 + 2 * 2) * 16 + 4 * 16 * d + d * e
    kv_row = 2 * 2 * 16

    def step(tokens: int, keys: int) -> float:
        hit = e * (1 - (1 - 2 / e) ** tokens)
        return 4 * (layers * (weights + hit * 3 * d * f + keys * kv_row) + CFG.vocab_size * d)

    prefill = step(5 * 7, 0)
    decode = [step(5, 5 * (7 + j)) for j in range(1, 4)]
    assert roof.prefill_seconds == pytest.approx(prefill)
    assert roof.decode_seconds == pytest.approx(sum(decode))
    assert roof.decode_bytes_per_step == pytest.approx(sum(decode) / 3)
    assert roof.decode_memory_bound_steps == 3
    assert roof.bandwidth.best == 1.0, "the better of the two measurements sets the floor"


def test_each_step_takes_the_slower_of_compute_and_memory():
    fast_memory = floor(flops_per_s=1e9, bytes_per_s=1e15)
    slow_memory = floor(flops_per_s=1e9, bytes_per_s=1e6)
    assert slow_memory.floor_seconds > fast_memory.floor_seconds
    assert slow_memory.decode_seconds == pytest.approx(floor(flops_per_s=math.inf, bytes_per_s=1e6).decode_seconds)


def test_batches_follow_max_num_seqs_and_the_window_caps_the_keys():
    roof = floor(flops_per_s=math.inf, bytes_per_s=1.0, max_num_seqs=2)
    assert roof.batch_sizes == (2, 2, 1) and roof.decode_steps == 9
    windowed = ModelConfig(**{**CFG.__dict__, "sliding_window": 8})
    assert (floor(windowed, flops_per_s=math.inf, bytes_per_s=1.0).decode_seconds
            < floor(flops_per_s=math.inf, bytes_per_s=1.0).decode_seconds)


def test_experts_hit_grows_to_every_expert():
    assert experts_hit(CFG, 1) == pytest.approx(2.0)
    assert 2.0 < experts_hit(CFG, 4) < experts_hit(CFG, 32) < 8.0
    assert experts_hit(CFG, 4096) == pytest.approx(8.0)


def test_machine_rates_are_measured():
    rate = copy_bandwidth(torch.device("cpu"), 1 << 20, reps=2)
    assert math.isfinite(rate) and rate > 1e6, "a copy moves more than 1 MB/s"
    flops = measure_matmul_flops(torch.float32, torch.device("cpu"), size=64, reps=2)
    assert math.isfinite(flops) and flops > 1e6, "a matmul runs faster than 1 MFLOP/s"
