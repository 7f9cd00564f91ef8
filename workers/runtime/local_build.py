"""Builds an attention rank from a checkpoint directory, with in-process experts or injected ones."""

from __future__ import annotations

from pathlib import Path

import torch

from workers.config import ModelConfig
from workers.model.checkpoint import CheckpointReader
from workers.model.kv_cache import KVCachePool, KVCacheSpec
from workers.model.transformer import DenseModel
from workers.model.weights import DenseWeights, load_dense_weights, load_expert_shard
from workers.runtime.attention_rank import AttentionRank, LocalExperts, MoEBackend


def kv_cache_spec(
    cfg: ModelConfig, *, num_blocks: int, block_size: int, dtype: torch.dtype, device: torch.device
) -> KVCacheSpec:
    return KVCacheSpec(
        num_layers=cfg.num_hidden_layers, num_blocks=num_blocks, block_size=block_size,
        num_kv_heads=cfg.num_key_value_heads, head_dim=cfg.head_dim, sliding_window=cfg.sliding_window,
        dtype=dtype, device=device,
    )


def build_attention_rank(
    model_dir: str | Path,
    *,
    dtype: torch.dtype,
    device: torch.device,
    num_blocks: int,
    block_size: int,
    experts: MoEBackend | None = None,
) -> AttentionRank:
    """experts=None loads every expert in this process (expert-parallel degree 1)."""
    cfg = ModelConfig.from_model_dir(model_dir)
    reader = CheckpointReader(model_dir)
    dense = load_dense_weights(reader, cfg, dtype=dtype, device=device)
    if experts is None:
        all_experts = tuple(range(cfg.num_local_experts))
        experts = LocalExperts(load_expert_shard(reader, cfg, all_experts, dtype=dtype, device=device))
    return assemble_attention_rank(cfg, dense, experts, num_blocks=num_blocks, block_size=block_size)


def assemble_attention_rank(
    cfg: ModelConfig, dense: DenseWeights, experts: MoEBackend, *, num_blocks: int, block_size: int
) -> AttentionRank:
    spec = kv_cache_spec(
        cfg, num_blocks=num_blocks, block_size=block_size, dtype=dense.embed_VD.dtype, device=dense.embed_VD.device
    )
    return AttentionRank(DenseModel(cfg, dense), KVCachePool(spec), experts)
