"""Which checkpoint tensors make up the dense (attention-side) weights and an expert shard.

The coordinator loads `DenseWeights` (never an expert tensor); an expert rank loads `ExpertShard`
for its own experts only. Shapes: V vocab, D model dim, Q = (H + 2 Hkv) Dh fused qkv rows,
E experts, e local experts, F expert ffn dim.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from workers.config import ModelConfig
from workers.model.checkpoint import CheckpointReader, expert_tensor_name
from workers.model.experts import ExpertWeights, LayerExperts, PackedLayerExperts, pack_experts, packs_experts
from workers.model.linear import Linear, prepare_linear


@dataclass(frozen=True)
class LayerWeights:
    input_norm_D: torch.Tensor
    qkv_proj: Linear  # [Q, D]: q, k, v rows fused
    o_proj: Linear  # [D, H·Dh]
    post_norm_D: torch.Tensor
    gate_ED: torch.Tensor


@dataclass(frozen=True)
class DenseWeights:
    embed_VD: torch.Tensor
    layers: tuple[LayerWeights, ...]
    final_norm_D: torch.Tensor
    lm_head: Linear  # [V, D]
    tensor_names: tuple[str, ...]


@dataclass(frozen=True)
class ExpertShard:
    expert_ids: tuple[int, ...]
    layers: tuple[ExpertWeights, ...]
    tensor_names: tuple[str, ...]


def dense_tensor_shapes(cfg: ModelConfig) -> dict[str, tuple[int, ...]]:
    d, dh = cfg.hidden_size, cfg.head_dim
    shapes: dict[str, tuple[int, ...]] = {"model.embed_tokens.weight": (cfg.vocab_size, d)}
    for i in range(cfg.num_hidden_layers):
        p = f"model.layers.{i}"
        shapes |= {
            f"{p}.input_layernorm.weight": (d,),
            f"{p}.self_attn.q_proj.weight": (cfg.num_attention_heads * dh, d),
            f"{p}.self_attn.k_proj.weight": (cfg.num_key_value_heads * dh, d),
            f"{p}.self_attn.v_proj.weight": (cfg.num_key_value_heads * dh, d),
            f"{p}.self_attn.o_proj.weight": (d, cfg.num_attention_heads * dh),
            f"{p}.post_attention_layernorm.weight": (d,),
            f"{p}.block_sparse_moe.gate.weight": (cfg.num_local_experts, d),
        }
    shapes["model.norm.weight"] = (d,)
    if not cfg.tie_word_embeddings:
        shapes["lm_head.weight"] = (cfg.vocab_size, d)
    return shapes


def expert_tensor_shapes(cfg: ModelConfig, expert_ids: tuple[int, ...]) -> dict[str, tuple[int, ...]]:
    d, f = cfg.hidden_size, cfg.intermediate_size
    shapes: dict[str, tuple[int, ...]] = {}
    for layer in range(cfg.num_hidden_layers):
        for expert in expert_ids:
            shapes[expert_tensor_name(layer, expert, "w1")] = (f, d)
            shapes[expert_tensor_name(layer, expert, "w3")] = (f, d)
            shapes[expert_tensor_name(layer, expert, "w2")] = (d, f)
    return shapes


def load_dense_weights(
    reader: CheckpointReader, cfg: ModelConfig, *, dtype: torch.dtype, device: torch.device | str
) -> DenseWeights:
    """Matmul weights in oneDNN's layout where the device supports it (see workers.model.linear)."""
    shapes = dense_tensor_shapes(cfg)
    t = reader.load(shapes, dtype=dtype, device=device)
    layers = []
    for i in range(cfg.num_hidden_layers):
        p = f"model.layers.{i}"
        wqkv = torch.cat([t[f"{p}.self_attn.{n}_proj.weight"] for n in "qkv"], dim=0).contiguous()
        layers.append(
            LayerWeights(
                input_norm_D=t[f"{p}.input_layernorm.weight"],
                qkv_proj=prepare_linear(wqkv),
                o_proj=prepare_linear(t[f"{p}.self_attn.o_proj.weight"]),
                post_norm_D=t[f"{p}.post_attention_layernorm.weight"],
                gate_ED=t[f"{p}.block_sparse_moe.gate.weight"],
            )
        )
    embed = t["model.embed_tokens.weight"]
    return DenseWeights(
        embed_VD=embed,
        layers=tuple(layers),
        final_norm_D=t["model.norm.weight"],
        lm_head=prepare_linear(embed if cfg.tie_word_embeddings else t["lm_head.weight"]),
        tensor_names=tuple(shapes),
    )


def load_expert_shard(
    reader: CheckpointReader,
    cfg: ModelConfig,
    expert_ids: tuple[int, ...],
    *,
    dtype: torch.dtype,
    device: torch.device | str,
) -> ExpertShard:
    """One oneDNN-packed linear per expert where the device supports it and they are big enough to gain,
    else stacked tensors."""
    bad = [e for e in expert_ids if not 0 <= e < cfg.num_local_experts]
    if bad:
        raise ValueError(f"expert id {bad[0]} is outside [0, {cfg.num_local_experts})")
    shapes = expert_tensor_shapes(cfg, expert_ids)
    t = reader.load(shapes, dtype=dtype, device=device)
    packed = packs_experts(device, dtype, cfg.hidden_size * cfg.intermediate_size)
    layers: list[ExpertWeights] = []
    for layer in range(cfg.num_hidden_layers):
        w13 = [
            torch.cat([t.pop(expert_tensor_name(layer, e, "w1")), t.pop(expert_tensor_name(layer, e, "w3"))], dim=0)
            for e in expert_ids
        ]
        w2 = [t.pop(expert_tensor_name(layer, e, "w2")) for e in expert_ids]
        if packed:
            layers.append(pack_experts(w13, w2))
        else:
            layers.append(LayerExperts(w13_e2FD=torch.stack(w13).contiguous(), w2_eDF=torch.stack(w2).contiguous()))
    return ExpertShard(expert_ids=tuple(expert_ids), layers=tuple(layers), tensor_names=tuple(shapes))


def reshard(
    shard: ExpertShard,
    reader: CheckpointReader,
    cfg: ModelConfig,
    expert_ids: tuple[int, ...],
    *,
    dtype: torch.dtype,
    device: torch.device | str,
) -> ExpertShard:
    """The shard of `expert_ids` (sorted) built from `shard`: the experts it already holds are reused (packed
    linears shared, stacked rows copied), only the others are read from the checkpoint. A balancer move reads
    just the copies that move to this worker."""
    held = {e: i for i, e in enumerate(shard.expert_ids)}
    fresh_ids = tuple(e for e in expert_ids if e not in held)
    fresh = load_expert_shard(reader, cfg, fresh_ids, dtype=dtype, device=device) if fresh_ids else None
    source = {e: (shard, i) for e, i in held.items()} | {e: (fresh, i) for i, e in enumerate(fresh_ids)}
    layers: list[ExpertWeights] = []
    for layer in range(cfg.num_hidden_layers):
        parts = [(s.layers[layer], i) for s, i in (source[e] for e in expert_ids)]
        if all(isinstance(w, PackedLayerExperts) for w, _ in parts):
            layers.append(PackedLayerExperts(w13_e=tuple(w.w13_e[i] for w, i in parts),
                                             w2_e=tuple(w.w2_e[i] for w, i in parts)))
        else:  # stacked (the packing decision is the model's and device's, so both shards agree)
            layers.append(LayerExperts(w13_e2FD=torch.stack([w.w13_e2FD[i] for w, i in parts]).contiguous(),
                                       w2_eDF=torch.stack([w.w2_eDF[i] for w, i in parts]).contiguous()))
    return ExpertShard(expert_ids=tuple(expert_ids), layers=tuple(layers),
                       tensor_names=tuple(expert_tensor_shapes(cfg, expert_ids)))
