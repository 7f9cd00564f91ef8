"""Builds an engine from settings: in-process experts for 0 workers, Ray expert workers otherwise."""

from __future__ import annotations

import math

import torch

from cluster.engine import LLMEngine
from cluster.scheduler import SchedulerConfig
from cluster.settings import DEFAULT_CPU_KV_CACHE_BYTES, EngineSettings
from workers.config import ModelConfig
from workers.model.weights import dense_tensor_shapes, expert_tensor_shapes
from workers.runtime.local_build import build_attention_rank, kv_cache_spec


def kv_cache_bytes(
    settings: EngineSettings, *, weights_to_load_bytes: int = 0, device_memory: tuple[int, int] | None = None
) -> int:
    """The KV pool's budget: settings.kv_cache_bytes when given, DEFAULT_CPU_KV_CACHE_BYTES on CPU, and on
    CUDA what the device has free beyond (1 - gpu_memory_utilization) of its memory (left to activations and
    other processes), less the weights this process has still to load. Called in the process that will hold
    the cache. device_memory: (free, total) bytes, read from the device when None."""
    if settings.kv_cache_bytes is not None:
        return settings.kv_cache_bytes
    if settings.device.type != "cuda":
        return DEFAULT_CPU_KV_CACHE_BYTES
    free, total = device_memory or torch.cuda.mem_get_info(settings.device)
    budget = free - weights_to_load_bytes - math.ceil((1 - settings.gpu_memory_utilization) * total)
    if budget <= 0:
        raise ValueError(
            f"gpu_memory_utilization {settings.gpu_memory_utilization} leaves no room for a KV cache: "
            f"{free / 2**30:.2f} GiB free of {total / 2**30:.2f} GiB, {weights_to_load_bytes / 2**30:.2f} GiB of "
            "weights still to load (raise --gpu-memory-utilization or set --kv-cache-mib)"
        )
    return budget


def weight_bytes(cfg: ModelConfig, dtype: torch.dtype) -> int:
    """Bytes of every weight tensor of the model (dense and all experts) in dtype."""
    shapes = dense_tensor_shapes(cfg) | expert_tensor_shapes(cfg, tuple(range(cfg.num_local_experts)))
    return sum(math.prod(shape) for shape in shapes.values()) * dtype.itemsize


def num_kv_blocks(settings: EngineSettings, cfg: ModelConfig, budget_bytes: int) -> int:
    spec = kv_cache_spec(
        cfg, num_blocks=1, block_size=settings.block_size, dtype=settings.dtype, device=settings.device
    )
    blocks = budget_bytes // spec.bytes_per_block
    if blocks < 1:
        raise ValueError(f"the KV cache budget ({budget_bytes} bytes) is below one block ({spec.bytes_per_block})")
    return blocks


def build_local_engine(settings: EngineSettings, scheduler: SchedulerConfig | None = None) -> LLMEngine:
    cfg = ModelConfig.from_model_dir(settings.model_dir)
    budget = kv_cache_bytes(settings, weights_to_load_bytes=weight_bytes(cfg, settings.dtype))
    rank = build_attention_rank(
        settings.model_dir, dtype=settings.dtype, device=settings.device,
        num_blocks=num_kv_blocks(settings, cfg, budget), block_size=settings.block_size,
        compile_small_steps=settings.compile_small_steps,
    )
    return LLMEngine(rank, scheduler)
