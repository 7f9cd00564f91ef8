"""The KV cache's budget (explicit, the CPU default, or what a CUDA device has free) and where a device is
checked: here for in-process ranks, on their own node for Ray ranks."""

from __future__ import annotations

import math

import pytest
import torch
from safetensors import safe_open

from cluster.engine_factory import kv_cache_bytes, num_kv_blocks, weight_bytes
from cluster.settings import DEFAULT_CPU_KV_CACHE_BYTES, EngineSettings, resolve_device
from workers.config import ModelConfig

GIB = 2**30


def _settings(device: str, **kw) -> EngineSettings:
    return EngineSettings(model_dir="unused", device=torch.device(device), dtype=torch.bfloat16, **kw)


def test_an_explicit_budget_wins_and_cpu_has_a_default():
    assert kv_cache_bytes(_settings("cuda", kv_cache_bytes=123 * 2**20), device_memory=(1, 2)) == 123 * 2**20
    assert kv_cache_bytes(_settings("cpu")) == DEFAULT_CPU_KV_CACHE_BYTES


def test_cuda_gets_what_is_free_beyond_the_reserve_after_the_weights():
    settings = _settings("cuda", gpu_memory_utilization=0.9)
    budget = kv_cache_bytes(settings, weights_to_load_bytes=30 * GIB, device_memory=(130 * GIB, 140 * GIB))
    assert budget == 130 * GIB - 30 * GIB - 14 * GIB
    with pytest.raises(ValueError, match=r"gpu_memory_utilization 0\.5 leaves no room"):
        kv_cache_bytes(_settings("cuda", gpu_memory_utilization=0.5), weights_to_load_bytes=60 * GIB,
                       device_memory=(130 * GIB, 140 * GIB))


def test_weight_bytes_are_the_checkpoints(tiny8):
    cfg = ModelConfig.from_model_dir(tiny8)
    with safe_open(tiny8 / "model.safetensors", "pt") as f:
        elements = sum(math.prod(f.get_slice(name).get_shape()) for name in f.keys())  # noqa: SIM118 (safe_open is not iterable)
    assert weight_bytes(cfg, torch.float32) == elements * 4
    assert num_kv_blocks(_settings("cpu"), cfg, DEFAULT_CPU_KV_CACHE_BYTES) > 0


def test_cuda_ranks_may_run_elsewhere_but_not_in_a_process_without_cuda():
    assert resolve_device("cuda", ranks_run_here=False).type == "cuda"
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="--device cuda: CUDA is not available"):
            resolve_device("cuda", ranks_run_here=True)
