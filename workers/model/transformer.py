"""The dense (non-expert) half of a Mixtral layer stack: embed, attention, routing, final logits.

Knows nothing of where the experts run: the caller routes, moves rows to experts and adds the result
back, so route → dispatch → experts → combine stay visible at the call site.
Shapes: T tokens, D model dim, V vocab, K experts per token.
"""

from __future__ import annotations

import torch

from workers.config import ModelConfig
from workers.model.attention import AttentionMetadata, paged_attention, split_qkv_with_rope
from workers.model.norm import rms_norm
from workers.model.rope import rope_cos_sin
from workers.model.router import route
from workers.model.weights import DenseWeights


class DenseModel:
    def __init__(self, cfg: ModelConfig, weights: DenseWeights) -> None:
        self.cfg = cfg
        self.weights = weights
        self.dtype = weights.embed_VD.dtype
        self.device = weights.embed_VD.device

    def embed(self, token_ids_T: torch.Tensor) -> torch.Tensor:
        return self.weights.embed_VD[token_ids_T]  # [T, D]

    def rope_tables(self, positions_T: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return rope_cos_sin(positions_T, head_dim=self.cfg.head_dim, theta=self.cfg.rope_theta, dtype=self.dtype)

    def attention_block(
        self,
        layer: int,
        h_TD: torch.Tensor,
        meta: AttentionMetadata,
        rope: tuple[torch.Tensor, torch.Tensor],
        kv_cache: tuple[torch.Tensor, torch.Tensor],
    ) -> torch.Tensor:
        """h + attention(norm(h)); also writes this step's K/V into the layer's cache."""
        w = self.weights.layers[layer]
        cfg = self.cfg
        x_TD = rms_norm(h_TD, w.input_norm_D, cfg.rms_norm_eps)
        q, k, v = split_qkv_with_rope(
            w.qkv_proj(x_TD), num_heads=cfg.num_attention_heads, num_kv_heads=cfg.num_key_value_heads,
            head_dim=cfg.head_dim, cos_TDh=rope[0], sin_TDh=rope[1],
        )
        attn_THd = paged_attention(q, k, v, kv_cache[0], kv_cache[1], meta)
        return h_TD + w.o_proj(attn_THd)

    def route(self, layer: int, h_TD: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """The MoE input and its routing: (x_TD, topk_weights_TK fp32, topk_ids_TK)."""
        w = self.weights.layers[layer]
        x_TD = rms_norm(h_TD, w.post_norm_D, self.cfg.rms_norm_eps)
        weights_TK, ids_TK = route(x_TD, w.gate_ED, self.cfg.num_experts_per_tok)
        return x_TD, weights_TK, ids_TK

    def logits(self, h_TD: torch.Tensor) -> torch.Tensor:
        x_TD = rms_norm(h_TD, self.weights.final_norm_D, self.cfg.rms_norm_eps)
        return self.weights.lm_head(x_TD).float()  # [T, V]
