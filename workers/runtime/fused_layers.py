"""The attention rank's compiled path for small steps with every expert in-process.

Holds each layer's weights as plain tensors (the compiled segments take them as arguments) and runs one
layer as pre segment → eager paged attention → post segment. See workers.model.fused_decode.
Shapes: T tokens, D model dim, K experts per token.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from workers.model.attention import AttentionMetadata, paged_attention
from workers.model.experts import LayerExperts
from workers.model.fused_decode import FusedSegments, LayerShape, worth_fusing
from workers.model.transformer import DenseModel
from workers.model.weights import ExpertShard


@dataclass(frozen=True)
class _LayerTensors:
    input_norm_D: torch.Tensor
    qkv_QD: torch.Tensor
    o_DHd: torch.Tensor
    post_norm_D: torch.Tensor
    gate_ED: torch.Tensor
    w13_E2FD: torch.Tensor
    w2_EDF: torch.Tensor


class FusedLayers:
    """Layers run as compiled segments for steps of at most `max_tokens` tokens."""

    def __init__(self, model: DenseModel, shard: ExpertShard, segments: FusedSegments) -> None:
        cfg = model.cfg
        assert all(isinstance(layer, LayerExperts) for layer in shard.layers), "fused layers need stacked experts"
        self.segments = segments
        self.shape = LayerShape(
            num_heads=cfg.num_attention_heads, num_kv_heads=cfg.num_key_value_heads, head_dim=cfg.head_dim,
            top_k=cfg.num_experts_per_tok, eps=cfg.rms_norm_eps,
        )
        self.layers = tuple(
            _LayerTensors(
                input_norm_D=w.input_norm_D, qkv_QD=w.qkv_proj.dense_weight(), o_DHd=w.o_proj.dense_weight(),
                post_norm_D=w.post_norm_D, gate_ED=w.gate_ED, w13_E2FD=e.w13_e2FD, w2_EDF=e.w2_eDF,
            )
            for w, e in zip(model.weights.layers, shard.layers, strict=True)
        )
        top_k = cfg.num_experts_per_tok
        tokens = 1 if worth_fusing(shard.layers[0], top_k) else 0
        while tokens and worth_fusing(shard.layers[0], 2 * tokens * top_k):
            tokens *= 2
        self.max_tokens = tokens  # the largest power of two whose rows stay under the fused-bytes limit (or 0)
        self.hidden_size = cfg.hidden_size
        self.dtype = model.dtype
        self.device = model.device

    def covers(self, num_tokens: int) -> bool:
        return num_tokens <= self.max_tokens

    def attention(
        self,
        layer: int,
        h_TD: torch.Tensor,
        meta: AttentionMetadata,
        rope: tuple[torch.Tensor, torch.Tensor],
        kv_cache: tuple[torch.Tensor, torch.Tensor],
    ) -> torch.Tensor:
        """The pre segment and the paged attention: attention out [T, H·Dh]; writes the step's K/V."""
        w = self.layers[layer]
        q, k, v = self.segments.pre(h_TD, w.input_norm_D, w.qkv_QD, rope[0], rope[1], self.shape)
        return paged_attention(q, k, v, kv_cache[0], kv_cache[1], meta)

    def rest_of_layer(
        self, layer: int, h_TD: torch.Tensor, attn_THd: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """The post segment: (h after the whole layer [T, D], topk ids [T, K])."""
        w = self.layers[layer]
        return self.segments.post(h_TD, attn_THd, w.o_DHd, w.post_norm_D, w.gate_ED, w.w13_E2FD, w.w2_EDF, self.shape)

    def warm_up(self) -> None:
        """Compiles every graph a step will use: one for a single token and one for any other count."""
        w, shape = self.layers[0], self.shape
        head_dim = shape.head_dim
        for num_tokens in sorted({min(n, self.max_tokens) for n in (1, 2, 3)}):  # a third size hits the dynamic graph
            h_TD = torch.zeros(num_tokens, self.hidden_size, dtype=self.dtype, device=self.device)
            # distinct cos and sin, as in a step: one tensor for both would compile a graph guarded on the alias
            cos_TDh = torch.ones(num_tokens, head_dim, dtype=self.dtype, device=self.device)
            sin_TDh = torch.zeros(num_tokens, head_dim, dtype=self.dtype, device=self.device)
            self.segments.pre(h_TD, w.input_norm_D, w.qkv_QD, cos_TDh, sin_TDh, shape)
            attn_THd = torch.zeros(num_tokens, shape.num_heads * head_dim, dtype=self.dtype, device=self.device)
            self.segments.post(h_TD, attn_THd, w.o_DHd, w.post_norm_D, w.gate_ED, w.w13_E2FD, w.w2_EDF, shape)
