"""The attention rank's step: embed, then per layer attention → route → MoE → residual, then logits.

Knows nothing of requests, sampling or where experts live: the MoE stage is an injected
`MoEBackend` (in-process experts, or dispatch/combine over a process group).
Shapes: T tokens in the step, D model dim, K experts per token, V vocab.
"""

from __future__ import annotations

from typing import Protocol

import torch

from workers.model.attention import AttentionMetadata, SequenceChunk, build_attention_metadata
from workers.model.experts import local_moe
from workers.model.kv_cache import KVCachePool
from workers.model.transformer import DenseModel
from workers.model.weights import ExpertShard
from workers.runtime.fused_layers import FusedLayers
from workers.runtime.timing import StepTimings


class MoEBackend(Protocol):
    def moe(
        self, layer: int, x_TD: torch.Tensor, weights_TK: torch.Tensor, ids_TK: torch.Tensor, timings: StepTimings
    ) -> torch.Tensor:
        """dispatch → experts → combine for one layer; returns the weighted expert output [T, D]."""
        ...

    def begin_step(self, num_tokens: int) -> None: ...


class LocalExperts:
    """Every expert in this process (expert-parallel degree 1)."""

    def __init__(self, shard: ExpertShard) -> None:
        expected = tuple(range(len(shard.expert_ids)))
        assert shard.expert_ids == expected, f"local experts must be all experts, got {shard.expert_ids}"
        self.shard = shard

    def begin_step(self, num_tokens: int) -> None:
        pass

    def moe(
        self, layer: int, x_TD: torch.Tensor, weights_TK: torch.Tensor, ids_TK: torch.Tensor, timings: StepTimings
    ) -> torch.Tensor:
        with timings.phase("experts"):
            return local_moe(x_TD, weights_TK, ids_TK, self.shard.layers[layer])


class AttentionRank:
    def __init__(
        self, model: DenseModel, pool: KVCachePool, experts: MoEBackend, fused: FusedLayers | None = None
    ) -> None:
        """fused: compiled layers for small steps (in-process experts only); other steps run eagerly."""
        self.model = model
        self.pool = pool
        self.experts = experts
        self.fused = fused
        cfg = model.cfg
        # rows routed to each (layer, expert), counted on the device (no host sync per layer); whoever owns the
        # counter may replace it with another of the same shape on the same device
        self.routed_tokens_LE = torch.zeros(
            cfg.num_hidden_layers, cfg.num_local_experts, dtype=torch.int64, device=model.device
        )

    def forward(
        self, token_ids_T: torch.Tensor, chunks: list[SequenceChunk], timings: StepTimings
    ) -> torch.Tensor:
        """Runs the layer stack over the step's new tokens; returns final hidden states [T, D].

        Host syncs per layer (on CUDA the host waits for the device there; nothing else in the loop does):
          - LocalExperts: the rows per expert (`local_moe`'s bincount .tolist()), which size each expert's
            matmul or the padded batch;
          - DistributedExperts: the rows per receiving rank (`plan.input_splits`), which the all-to-all's
            split sizes need, and on the split-size path the received counts. Per step, not per layer: the
            attention metadata (built on the host, copied once) and the step header's broadcast."""
        assert token_ids_T.shape[0] == sum(c.num_new for c in chunks), (
            f"{token_ids_T.shape[0]} token ids for chunks totalling {sum(c.num_new for c in chunks)}"
        )
        with timings.phase("attention"):
            meta = build_attention_metadata(self.pool, chunks)
            rope = self.model.rope_tables(meta.positions_T)
            h_TD = self.model.embed(token_ids_T.to(self.model.device))
        fused = self.fused if self.fused is not None and self.fused.covers(token_ids_T.shape[0]) else None
        if fused is not None:
            return self._fused_forward(fused, h_TD, meta, rope, chunks, timings)
        self.experts.begin_step(token_ids_T.shape[0])
        for layer in range(self.model.cfg.num_hidden_layers):
            with timings.phase("attention"):
                kv = (self.pool.k_LBSHd[layer], self.pool.v_LBSHd[layer])
                h_TD = self.model.attention_block(layer, h_TD, meta, rope, kv)
            with timings.phase("routing"):
                x_TD, weights_TK, ids_TK = self.model.route(layer, h_TD)
                ids_N = ids_TK.reshape(-1)
                self.routed_tokens_LE[layer].index_add_(0, ids_N, torch.ones_like(ids_N))
            h_TD = h_TD + self.experts.moe(layer, x_TD, weights_TK, ids_TK, timings)
        _mark_cached(chunks)
        return h_TD

    def _fused_forward(
        self,
        fused: FusedLayers,
        h_TD: torch.Tensor,
        meta: AttentionMetadata,
        rope: tuple[torch.Tensor, torch.Tensor],
        chunks: list[SequenceChunk],
        timings: StepTimings,
    ) -> torch.Tensor:
        """Each layer as pre segment + attention (timed as attention), then the post segment: o_proj,
        routing, experts and both residuals (timed as experts)."""
        ids_per_layer = []
        for layer in range(self.model.cfg.num_hidden_layers):
            with timings.phase("attention"):
                kv = (self.pool.k_LBSHd[layer], self.pool.v_LBSHd[layer])
                attn_THd = fused.attention(layer, h_TD, meta, rope, kv)
            with timings.phase("experts"):
                h_TD, ids_TK = fused.rest_of_layer(layer, h_TD, attn_THd)
            ids_per_layer.append(ids_TK)
        with timings.phase("routing"):
            ids_LN = torch.stack(ids_per_layer).flatten(1)  # [L, T*K]
            self.routed_tokens_LE.scatter_add_(1, ids_LN, torch.ones_like(ids_LN))
        _mark_cached(chunks)
        return h_TD

    def logits(self, h_TD: torch.Tensor) -> torch.Tensor:
        return self.model.logits(h_TD)


def _mark_cached(chunks: list[SequenceChunk]) -> None:
    for chunk in chunks:
        chunk.blocks.num_cached = chunk.start + chunk.num_new
