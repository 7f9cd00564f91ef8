"""The compute floor: the workload's matmul FLOPs over the machine's measured matmul rate.

Counts the weights each token multiplies (attention projections, router, its top-k experts) and the
lm_head on sampled positions only; attention scores (QKᵀ, PV), norms, RoPE and softmax are left out.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import torch

from cluster.bench.workload import Workload
from workers.config import ModelConfig

FORMULA = (
    "FLOPs = 2 × (T_fwd × L × (D·(H+2·Hkv)·Dh + H·Dh·D + D·E + K·3·D·F) + T_sampled × V·D), "
    "T_fwd = N·(P+O−1) tokens through the layers, T_sampled = N·O lm_head rows; "
    "attention scores (QKᵀ, PV), norms, RoPE and softmax excluded"
)


@dataclass(frozen=True, kw_only=True)
class ParamsPerToken:
    attention_projections: int  # per layer
    router: int  # per layer
    experts_top_k: int  # per layer
    layers: int
    lm_head: int  # per sampled position

    @property
    def per_forwarded_token(self) -> int:
        return self.layers * (self.attention_projections + self.router + self.experts_top_k)


@dataclass(frozen=True, kw_only=True)
class MatmulRate:
    size: int
    dtype: str
    device: str
    threads: int
    flops_per_s: tuple[float, ...]  # one per measurement (start and end of the run)

    @property
    def best(self) -> float:
        return max(self.flops_per_s)


@dataclass(frozen=True, kw_only=True)
class ComputeFloor:
    formula: str
    params: ParamsPerToken
    forwarded_tokens: int
    sampled_positions: int
    flops: float
    matmul: MatmulRate
    floor_seconds: float  # flops / the best measured matmul rate


def params_per_token(cfg: ModelConfig) -> ParamsPerToken:
    d, dh, f = cfg.hidden_size, cfg.head_dim, cfg.intermediate_size
    heads, kv_heads = cfg.num_attention_heads, cfg.num_key_value_heads
    return ParamsPerToken(
        attention_projections=d * (heads + 2 * kv_heads) * dh + heads * dh * d,
        router=d * cfg.num_local_experts,
        experts_top_k=cfg.num_experts_per_tok * 3 * d * f,
        layers=cfg.num_hidden_layers,
        lm_head=cfg.vocab_size * d,
    )


def workload_flops(cfg: ModelConfig, workload: Workload) -> tuple[ParamsPerToken, float]:
    params = params_per_token(cfg)
    sampled = workload.output_tokens
    return params, 2.0 * (workload.forwarded_tokens * params.per_forwarded_token + sampled * params.lm_head)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def measure_matmul_flops(dtype: torch.dtype, device: torch.device, *, size: int = 2048, reps: int = 5) -> float:
    """The best rate of `reps` timed [size, size] @ [size, size] products after two warm-ups, in FLOP/s."""
    gen = torch.Generator(device=device).manual_seed(0)
    a = torch.randn(size, size, generator=gen, device=device).to(dtype)
    b = torch.randn(size, size, generator=gen, device=device).to(dtype)
    best = float("inf")
    for i in range(reps + 2):
        _sync(device)
        start = time.perf_counter()
        torch.matmul(a, b)
        _sync(device)
        if i >= 2:
            best = min(best, time.perf_counter() - start)
    return 2.0 * size**3 / best


def compute_floor(cfg: ModelConfig, workload: Workload, rate: MatmulRate) -> ComputeFloor:
    params, flops = workload_flops(cfg, workload)
    return ComputeFloor(
        formula=FORMULA, params=params, forwarded_tokens=workload.forwarded_tokens,
        sampled_positions=workload.output_tokens, flops=flops, matmul=rate, floor_seconds=flops / rate.best,
    )
