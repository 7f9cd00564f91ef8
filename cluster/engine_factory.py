"""Builds an engine from settings: in-process experts for 0 workers, Ray expert workers otherwise."""

from __future__ import annotations

from cluster.engine import LLMEngine
from cluster.scheduler import SchedulerConfig
from cluster.settings import EngineSettings
from workers.config import ModelConfig
from workers.runtime.local_build import build_attention_rank, kv_cache_spec


def num_kv_blocks(settings: EngineSettings, cfg: ModelConfig) -> int:
    spec = kv_cache_spec(
        cfg, num_blocks=1, block_size=settings.block_size, dtype=settings.dtype, device=settings.device
    )
    blocks = settings.kv_cache_bytes // spec.bytes_per_block
    if blocks < 1:
        raise ValueError(f"kv_cache_bytes ({settings.kv_cache_bytes}) is below one block ({spec.bytes_per_block})")
    return blocks


def build_local_engine(settings: EngineSettings, scheduler: SchedulerConfig | None = None) -> LLMEngine:
    cfg = ModelConfig.from_model_dir(settings.model_dir)
    rank = build_attention_rank(
        settings.model_dir, dtype=settings.dtype, device=settings.device,
        num_blocks=num_kv_blocks(settings, cfg), block_size=settings.block_size,
        compile_small_steps=settings.compile_small_steps,
    )
    return LLMEngine(rank, scheduler)
