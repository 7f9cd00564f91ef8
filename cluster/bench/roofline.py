"""The roofline floor: per step of an ideal engine, the larger of the step's matmul time at the measured
matmul rate and its memory time at the measured copy bandwidth (bytes read plus written per second, as
`scripts/gpu_check.sh` divides by), summed over the workload's steps.

The compute floor (`floor.py`) counts FLOPs only. A decode step multiplies few rows by every expert's
weights, so where memory is slow next to the matmul units (a 2-core VM: ~25 GB/s against ~340 GFLOP/s)
reading the weights, not multiplying them, bounds the step. The ideal engine here runs the N prompts in
batches of B = min(N, max_num_seqs): one prefill step of B·P tokens, then O−1 decode steps of B tokens.
A step reads each weight it uses once: attention projections, router, lm_head, and the experts its B·K
picks hit (expected under uniform routing, E·(1−(1−K/E)^B); an estimate, not a bound), plus the K/V of
its keys (sliding window applied). The prefill step's activations are not counted; its FLOPs dominate.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from cluster.bench.floor import ParamsPerToken, params_per_token
from cluster.bench.workload import Workload
from workers.config import ModelConfig

FORMULA = (
    "floor = Σ_steps max(FLOPs_step / matmul rate, bytes_step / copy bandwidth); per batch of B = min(N, max_num_seqs) "
    "prompts: 1 prefill step (B·P tokens) + O−1 decode steps (B tokens); bytes_step = s × (L × (D·(H+2·Hkv)·Dh + "
    "H·Dh·D + D·E + E_hit·3·D·F) + V·D + B × keys × L × 2·Hkv·Dh), E_hit = E·(1−(1−K/E)^tokens), "
    "keys = min(context, sliding window), s = bytes per element"
)
# Copied per bandwidth measurement: with its destination, 1 GiB moved, above any last-level cache we have met
COPY_BYTES = 512 << 20


@dataclass(frozen=True, kw_only=True)
class MemoryBandwidth:
    copy_bytes: int
    device: str
    threads: int
    bytes_per_s: tuple[float, ...]  # bytes read plus written per second by a copy; at the start and end of the run

    @property
    def best(self) -> float:
        return max(self.bytes_per_s)


@dataclass(frozen=True, kw_only=True)
class RooflineFloor:
    formula: str
    batch_sizes: tuple[int, ...]  # sequences per batch of the ideal schedule
    decode_steps: int  # over all batches
    prefill_seconds: float  # the prefill steps' share of the floor
    decode_seconds: float  # the decode steps' share
    decode_memory_bound_steps: int  # decode steps whose bytes, not FLOPs, set their time
    decode_bytes_per_step: float  # mean
    bandwidth: MemoryBandwidth
    floor_seconds: float


def experts_hit(cfg: ModelConfig, tokens: int) -> float:
    """Expected distinct experts of one layer that `tokens` tokens' top-K picks hit, under uniform routing."""
    e, k = cfg.num_local_experts, cfg.num_experts_per_tok
    return e * (1.0 - (1.0 - k / e) ** tokens)


def layer_elements(cfg: ModelConfig, params: ParamsPerToken, *, experts_per_layer: float,
                   keys_read: int) -> dict[str, float]:
    """Elements a step reads in its layers, by part: every layer's attention projections and router, the
    weights of `experts_per_layer` experts and `keys_read` K/V rows in each layer (the lm_head excluded)."""
    layers = params.layers
    return {
        "attention": layers * params.attention_projections,
        "router": layers * params.router,
        "experts": layers * experts_per_layer * 3 * cfg.hidden_size * cfg.intermediate_size,
        "kv_cache": layers * keys_read * 2 * cfg.num_key_value_heads * cfg.head_dim,
    }


def step_bytes(cfg: ModelConfig, params: ParamsPerToken, *, tokens: int, keys_read: int, element_size: int) -> float:
    """Bytes a step of `tokens` tokens reads: its weights once, plus `keys_read` K/V rows per layer."""
    parts = layer_elements(cfg, params, experts_per_layer=experts_hit(cfg, tokens), keys_read=keys_read)
    return element_size * (sum(parts.values()) + params.lm_head)


def roofline_floor(cfg: ModelConfig, workload: Workload, *, max_num_seqs: int, matmul_flops_per_s: float,
                   bandwidth: MemoryBandwidth, element_size: int) -> RooflineFloor:
    params = params_per_token(cfg)
    n, p, o = workload.num_prompts, workload.input_len, workload.output_len
    full = min(n, max_num_seqs)
    batches = (full,) * (n // full) + ((n % full,) if n % full else ())
    window = cfg.sliding_window or math.inf
    prefill = decode = 0.0
    memory_bound, decode_bytes = 0, 0.0
    for b in batches:
        prefill_flops = 2.0 * (b * p * params.per_forwarded_token + b * params.lm_head)
        prefill_bytes = step_bytes(cfg, params, tokens=b * p, keys_read=0, element_size=element_size)
        prefill += max(prefill_flops / matmul_flops_per_s, prefill_bytes / bandwidth.best)
        for j in range(1, o):  # input: output token j at position p + j - 1, attending to p + j keys
            keys = min(p + j, window)
            nbytes = step_bytes(cfg, params, tokens=b, keys_read=b * keys, element_size=element_size)
            compute_s = 2.0 * b * (params.per_forwarded_token + params.lm_head) / matmul_flops_per_s
            memory_s = nbytes / bandwidth.best
            decode += max(compute_s, memory_s)
            memory_bound += memory_s > compute_s
            decode_bytes += nbytes
    steps = len(batches) * (o - 1)
    return RooflineFloor(
        formula=FORMULA, batch_sizes=batches, decode_steps=steps, prefill_seconds=prefill, decode_seconds=decode,
        decode_memory_bound_steps=memory_bound, decode_bytes_per_step=decode_bytes / steps if steps else 0.0,
        bandwidth=bandwidth, floor_seconds=prefill + decode,
    )
