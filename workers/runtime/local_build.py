"""Builds an attention rank from a checkpoint directory, with in-process experts or injected ones."""

from __future__ import annotations

from pathlib import Path

import torch

from workers.config import ModelConfig
from workers.model.checkpoint import CheckpointReader
from workers.model.experts import LayerExperts
from workers.model.fused_decode import CompileFailed, FusedSegments, compile_segments
from workers.model.kv_cache import KVCachePool, KVCacheSpec
from workers.model.transformer import DenseModel
from workers.model.weights import DenseWeights, load_dense_weights, load_expert_shard
from workers.runtime.attention_rank import AttentionRank, LocalExperts, MicroBatching, MoEBackend
from workers.runtime.fused_layers import FusedLayers


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
    compile_small_steps: bool = False,
) -> AttentionRank:
    """experts=None loads every expert in this process (expert-parallel degree 1); compile_small_steps:
    see `fused_layers_for`."""
    cfg = ModelConfig.from_model_dir(model_dir)
    reader = CheckpointReader(model_dir)
    dense = load_dense_weights(reader, cfg, dtype=dtype, device=device)
    if experts is None:
        all_experts = tuple(range(cfg.num_local_experts))
        experts = LocalExperts(load_expert_shard(reader, cfg, all_experts, dtype=dtype, device=device))
    return assemble_attention_rank(
        cfg, dense, experts, num_blocks=num_blocks, block_size=block_size, compile_small_steps=compile_small_steps
    )


def assemble_attention_rank(
    cfg: ModelConfig,
    dense: DenseWeights,
    experts: MoEBackend,
    *,
    num_blocks: int,
    block_size: int,
    compile_small_steps: bool = False,
    micro_batching: MicroBatching | None = None,
) -> AttentionRank:
    spec = kv_cache_spec(
        cfg, num_blocks=num_blocks, block_size=block_size, dtype=dense.embed_VD.dtype, device=dense.embed_VD.device
    )
    model = DenseModel(cfg, dense)
    fused = fused_layers_for(model, experts, compile_segments()) if compile_small_steps else None
    if fused is not None:
        try:
            fused.warm_up()
        except Exception as exc:  # inductor's errors are many types; all mean the same to the caller
            text = str(exc).strip()
            first_line = text.splitlines()[0] if text else type(exc).__name__
            raise CompileFailed(f"compile_small_steps: torch.compile failed ({first_line}); on a CPU it needs a "
                                "C++ compiler (g++), or run without --compile") from exc
    return AttentionRank(model, KVCachePool(spec), experts, fused, micro_batching)


def fused_layers_for(model: DenseModel, experts: MoEBackend, segments: FusedSegments) -> FusedLayers | None:
    """Compiled layers for small steps where they apply: every expert in this process, stacked (not packed:
    experts that big are read from memory at full rate already), and at least one token's rows under the
    fused-bytes limit. None where they do not apply; those engines run every step eagerly."""
    if not isinstance(experts, LocalExperts):
        return None
    if not all(isinstance(layer, LayerExperts) for layer in experts.shard.layers):
        return None
    fused = FusedLayers(model, experts.shard, segments)
    return fused if fused.max_tokens > 0 else None
