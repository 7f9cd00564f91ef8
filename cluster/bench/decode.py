"""Decode-step benchmark of a few full-size Mixtral layers on one device: mixserve's attention rank with
in-process experts against transformers' `MixtralModel` holding the same weights, and the bandwidth floor.

transformers creates the random weights once, on the device, in the benchmark dtype; mixserve's weight
dataclasses are views of the same tensors (the fused qkv is the only copy), so both route identically
and memory holds one model. Device-agnostic: the GPU run and the CPU dry run differ only in `device` and
shapes. Imports torch, transformers and workers only (no Ray).
Shapes: B sequences, C context tokens, D model dim, F expert ffn dim, E experts, L layers.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from cluster.bench.floor import params_per_token
from cluster.bench.roofline import layer_elements
from workers.config import ModelConfig
from workers.model.experts import LayerExperts
from workers.model.linear import prepare_linear
from workers.model.weights import DenseWeights, ExpertShard, LayerWeights
from workers.runtime.attention_rank import AttentionRank, LocalExperts
from workers.runtime.local_build import assemble_attention_rank


@dataclass(frozen=True, kw_only=True)
class DecodeShapes:
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_experts: int
    top_k: int
    num_heads: int
    num_kv_heads: int
    vocab_size: int
    context_len: int  # prompt tokens cached before the timed decode steps
    warmup_steps: int
    timed_steps: int
    batches: tuple[int, ...]


SHAPES = {
    "mixtral-8x7b-2layers": DecodeShapes(hidden_size=4096, intermediate_size=14336, num_layers=2, num_experts=8,
                                         top_k=2, num_heads=32, num_kv_heads=8, vocab_size=32000, context_len=128,
                                         warmup_steps=3, timed_steps=20, batches=(1, 16, 64)),
    "dry-run": DecodeShapes(hidden_size=64, intermediate_size=128, num_layers=2, num_experts=8, top_k=2, num_heads=4,
                            num_kv_heads=2, vocab_size=256, context_len=16, warmup_steps=1, timed_steps=3,
                            batches=(1, 4)),
}


@dataclass(frozen=True, kw_only=True)
class DecodePoint:
    batch: int
    context_len: int
    mixserve_step_s: float  # median over the timed steps
    transformers_step_s: float
    speedup_vs_transformers: float  # transformers step time ÷ mixserve step time
    mixserve_tok_s: float
    transformers_tok_s: float
    experts_touched_per_layer: float  # mean over layers and timed steps (mixserve's routing)
    bytes_per_step: dict[str, int]  # attention, router, experts (touched), kv cache reads, total
    floor_s: float  # total bytes ÷ measured copy bandwidth
    mixserve_floor_fraction: float  # floor ÷ mixserve step time
    transformers_floor_fraction: float
    first_step_rel_error: float  # mixserve vs transformers final hidden states on the first decode step


def hf_config(s: DecodeShapes):
    from transformers import MixtralConfig

    return MixtralConfig(vocab_size=s.vocab_size, hidden_size=s.hidden_size, intermediate_size=s.intermediate_size,
                         num_hidden_layers=s.num_layers, num_attention_heads=s.num_heads,
                         num_key_value_heads=s.num_kv_heads, num_local_experts=s.num_experts,
                         num_experts_per_tok=s.top_k, max_position_embeddings=4096, sliding_window=None,
                         bos_token_id=1, eos_token_id=2, tie_word_embeddings=True)


def build_transformers(s: DecodeShapes, device: torch.device, dtype: torch.dtype):
    from transformers import MixtralModel

    torch.manual_seed(0)
    with torch.device(device):
        return MixtralModel._from_config(hf_config(s), dtype=dtype).eval()


def _one(t: dict[str, torch.Tensor], prefix: str, suffix: str) -> torch.Tensor:
    """The tensor named prefix…suffix, whatever transformers 5.x calls the MoE block in between."""
    names = [n for n in t if n.startswith(prefix) and n.endswith(suffix)]
    assert len(names) == 1, f"expected one tensor {prefix}*{suffix}, found {names}"
    return t[names[0]]


def mixserve_weights(hf_model, num_layers: int, num_experts: int) -> tuple[DenseWeights, ExpertShard]:
    """mixserve's weight dataclasses over transformers' tensors (views; the fused qkv is concatenated).
    transformers keeps each layer's experts fused: gate_up_proj [E, 2F, D] (gate rows, then up) and
    down_proj [E, D, F], which are exactly mixserve's w13_e2FD and w2_eDF."""
    t = hf_model.state_dict(keep_vars=False)
    layers, experts = [], []
    for i in range(num_layers):
        p = f"layers.{i}."
        wqkv_QD = torch.cat([t[f"{p}self_attn.{n}_proj.weight"] for n in "qkv"]).contiguous()
        layers.append(LayerWeights(input_norm_D=t[f"{p}input_layernorm.weight"], qkv_proj=prepare_linear(wqkv_QD),
                                   o_proj=prepare_linear(t[f"{p}self_attn.o_proj.weight"]),
                                   post_norm_D=t[f"{p}post_attention_layernorm.weight"],
                                   gate_ED=_one(t, p, ".gate.weight")))
        experts.append(LayerExperts(w13_e2FD=_one(t, p, "experts.gate_up_proj"),
                                    w2_eDF=_one(t, p, "experts.down_proj")))
    embed_VD = t["embed_tokens.weight"]
    dense = DenseWeights(embed_VD=embed_VD, layers=tuple(layers), final_norm_D=t["norm.weight"],
                         lm_head=prepare_linear(embed_VD),
                         tensor_names=())
    return dense, ExpertShard(expert_ids=tuple(range(num_experts)), layers=tuple(experts), tensor_names=())


def build_rank(hf_model, s: DecodeShapes, block_size: int = 16) -> AttentionRank:
    cfg = ModelConfig.from_hf_dict(hf_model.config.to_dict())
    dense, shard = mixserve_weights(hf_model, s.num_layers, s.num_experts)
    tokens = s.context_len + s.warmup_steps + s.timed_steps + 1
    num_blocks = max(s.batches) * (-(-tokens // block_size) + 1)
    return assemble_attention_rank(cfg, dense, LocalExperts(shard), num_blocks=num_blocks, block_size=block_size)


def step_bytes(cfg: ModelConfig, batch: int, context: int, experts_touched: float, itemsize: int) -> dict[str, int]:
    """Bytes a decode step of `batch` sequences reads in the layers (no lm_head here), by part, and the total."""
    parts = layer_elements(cfg, params_per_token(cfg), experts_per_layer=experts_touched, keys_read=batch * context)
    out = {k: int(int(v) * itemsize) for k, v in parts.items()}
    return out | {"total": sum(out.values())}
