"""The attention rank's step: embed, then per layer attention → route → MoE → residual, then logits.

Knows nothing of requests, sampling or where experts live: the MoE stage is an injected
`MoEBackend` (in-process experts, or dispatch/combine over a process group).

Ping-pong: when the experts run elsewhere (`MoEBackend.overlaps`), a step of enough tokens is split into
micro-batches of whole sequence chunks, pipelined layer by layer: the rank starts micro-batch A's MoE, runs
attention and routing for B while the expert ranks compute A, then waits for A only when A's next layer
needs it (vLLM's dual-batch overlap, SGLang's two-batch overlap, MegaScale-Infer's ping-pong). Each token's
arithmetic is the same as in one batch: the step's tokens do not depend on the split.
Shapes: T tokens in the step, D model dim, K experts per token, V vocab.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

import torch

from workers.model.attention import AttentionMetadata, SequenceChunk, build_attention_metadata
from workers.model.experts import local_moe
from workers.model.kv_cache import KVCachePool
from workers.model.transformer import DenseModel
from workers.model.weights import ExpertShard
from workers.runtime.fused_layers import FusedLayers
from workers.runtime.step_header import MAX_MICRO_BATCHES
from workers.runtime.timing import StepTimings


class PendingOutput(Protocol):
    def wait(self, timings: StepTimings) -> torch.Tensor:
        """The weighted expert output [T, D] of a started MoE stage."""
        ...


class MoEBackend(Protocol):
    overlaps: bool  # start_moe returns before the experts ran: micro-batches can overlap them

    def begin_step(self, micro_batch_tokens: tuple[int, ...]) -> int:
        """Returns the step's micro-batch count: more than asked when a peer coordinator asked for more."""
        ...

    def start_empty(self, layer: int, micro_batch: int) -> PendingOutput:
        """A micro-batch with no tokens (a peer coordinator's step has more micro-batches than this one's)."""
        ...

    def start_moe(
        self, layer: int, micro_batch: int, x_TD: torch.Tensor, weights_TK: torch.Tensor, ids_TK: torch.Tensor,
        timings: StepTimings,
    ) -> PendingOutput:
        """dispatch → experts → combine for one micro-batch of one layer."""
        ...


@dataclass(eq=False)
class DoneMoE:
    y_TD: torch.Tensor

    def wait(self, timings: StepTimings) -> torch.Tensor:
        return self.y_TD


class LocalExperts:
    """Every expert in this process (expert-parallel degree 1): start_moe computes at once."""

    overlaps = False

    def __init__(self, shard: ExpertShard) -> None:
        expected = tuple(range(len(shard.expert_ids)))
        assert shard.expert_ids == expected, f"local experts must be all experts, got {shard.expert_ids}"
        self.shard = shard

    def begin_step(self, micro_batch_tokens: tuple[int, ...]) -> int:
        return len(micro_batch_tokens)

    def start_empty(self, layer: int, micro_batch: int) -> DoneMoE:
        raise AssertionError("in-process experts never run a peer's micro-batch")

    def start_moe(
        self, layer: int, micro_batch: int, x_TD: torch.Tensor, weights_TK: torch.Tensor, ids_TK: torch.Tensor,
        timings: StepTimings,
    ) -> DoneMoE:
        with timings.phase("experts"):
            return DoneMoE(local_moe(x_TD, weights_TK, ids_TK, self.shard.layers[layer]))


@dataclass(frozen=True, kw_only=True)
class MicroBatching:
    """How a step is split for ping-pong: into at most `micro_batches` parts of whole sequence chunks, each
    at least `min_tokens` tokens (smaller steps run as one batch: their experts' weight reads, not their
    compute, set the time, and a split would read them twice)."""

    micro_batches: int = 1
    min_tokens: int = 256

    def __post_init__(self) -> None:
        if not 1 <= self.micro_batches <= MAX_MICRO_BATCHES:
            raise ValueError(f"micro_batches must be in [1, {MAX_MICRO_BATCHES}], got {self.micro_batches}")
        if self.min_tokens < 1:
            raise ValueError(f"min_tokens must be >= 1, got {self.min_tokens}")

    def split(self, chunks: list[SequenceChunk]) -> list[list[SequenceChunk]]:
        """Consecutive runs of `chunks` with about equal token counts (a run ends once it reaches its share)."""
        total = sum(c.num_new for c in chunks)
        parts = max(1, min(self.micro_batches, total // self.min_tokens, len(chunks)))
        runs: list[list[SequenceChunk]] = [[]]
        done = 0
        for chunk in chunks:
            if runs[-1] and len(runs) < parts and done >= total * len(runs) / parts:
                runs.append([])
            runs[-1].append(chunk)
            done += chunk.num_new
        return runs


class AttentionRank:
    def __init__(
        self, model: DenseModel, pool: KVCachePool, experts: MoEBackend, fused: FusedLayers | None = None,
        micro_batching: MicroBatching | None = None,
    ) -> None:
        """fused: compiled layers for small steps (in-process experts only); other steps run eagerly.
        micro_batching: the ping-pong split, used when the experts overlap (default: none)."""
        self.model = model
        self.pool = pool
        self.experts = experts
        self.fused = fused
        self.micro_batching = micro_batching or MicroBatching()
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
          - DistributedExperts: the rows per receiving rank (workers.comm.overlap), which the all-to-all's
            split sizes need; once per micro-batch. Per step, not per layer: the attention metadata (built on
            the host, copied once per micro-batch) and the step header's broadcast."""
        assert token_ids_T.shape[0] == sum(c.num_new for c in chunks), (
            f"{token_ids_T.shape[0]} token ids for chunks totalling {sum(c.num_new for c in chunks)}"
        )
        fused = self.fused if self.fused is not None and self.fused.covers(token_ids_T.shape[0]) else None
        if fused is not None:
            with timings.phase("attention"):
                meta = build_attention_metadata(self.pool, chunks)
                rope = self.model.rope_tables(meta.positions_T)
                h_TD = self.model.embed(token_ids_T.to(self.model.device))
            return self._fused_forward(fused, h_TD, meta, rope, chunks, timings)
        runs = self.micro_batching.split(chunks) if self.experts.overlaps else [chunks]
        batches, first = [], 0
        for run in runs:
            num_tokens = sum(c.num_new for c in run)
            with timings.phase("attention"):
                meta = build_attention_metadata(self.pool, run)
                rope = self.model.rope_tables(meta.positions_T)
                h_tD = self.model.embed(token_ids_T[first : first + num_tokens].to(self.model.device))
            batches.append(_MicroBatch(meta, rope, h_tD))
            first += num_tokens
        micro_batches = self.experts.begin_step(tuple(b.h_tD.shape[0] for b in batches))
        empty: dict[int, PendingOutput] = {}  # micro-batches a peer coordinator's step has and this one lacks
        for layer in range(self.model.cfg.num_hidden_layers):
            kv = (self.pool.k_LBSHd[layer], self.pool.v_LBSHd[layer])
            for index in range(micro_batches):  # the order the expert ranks serve them in
                if index >= len(batches):
                    if index in empty:
                        empty[index].wait(timings)
                    empty[index] = self.experts.start_empty(layer, index)
                    continue
                batch = batches[index]
                batch.add_moe_output(timings)
                with timings.phase("attention"):
                    batch.h_tD = self.model.attention_block(layer, batch.h_tD, batch.meta, batch.rope, kv)
                with timings.phase("routing"):
                    x_tD, weights_tK, ids_tK = self.model.route(layer, batch.h_tD)
                    ids_n = ids_tK.reshape(-1)
                    self.routed_tokens_LE[layer].index_add_(0, ids_n, torch.ones_like(ids_n))
                batch.moe = self.experts.start_moe(layer, index, x_tD, weights_tK, ids_tK, timings)
        for batch in batches:
            batch.add_moe_output(timings)
        for pending in empty.values():
            pending.wait(timings)
        _mark_cached(chunks)
        return batches[0].h_tD if len(batches) == 1 else torch.cat([b.h_tD for b in batches])

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


@dataclass(eq=False)
class _MicroBatch:
    """One micro-batch's state through the layers (t of the step's T tokens)."""

    meta: AttentionMetadata
    rope: tuple[torch.Tensor, torch.Tensor]
    h_tD: torch.Tensor  # the residual stream after the latest attention block (plus every MoE output added)
    moe: PendingOutput | None = None  # the latest layer's MoE output, on its way

    def add_moe_output(self, timings: StepTimings) -> None:
        if self.moe is not None:
            self.h_tD = self.h_tD + self.moe.wait(timings)
            self.moe = None


def _mark_cached(chunks: list[SequenceChunk]) -> None:
    for chunk in chunks:
        chunk.blocks.num_cached = chunk.start + chunk.num_new
