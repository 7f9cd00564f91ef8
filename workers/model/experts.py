"""SwiGLU expert math over rows already grouped by expert; no routing, no communication.

The raw expert computation: each local expert runs one matmul pair over all of its rows.
Shapes: N rows, D model dim, F expert ffn dim, e local experts.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from workers.model.linear import Linear, PackedLinear, can_pack, worth_packing


@dataclass(frozen=True)
class LayerExperts:
    """One layer's weights for a set of local experts, stacked and contiguous."""

    w13_e2FD: torch.Tensor  # [e, 2F, D]  gate (w1) rows then up (w3) rows
    w2_eDF: torch.Tensor  # [e, D, F]    down projection

    @property
    def num_experts(self) -> int:
        return self.w13_e2FD.shape[0]

    @property
    def dtype(self) -> torch.dtype:
        return self.w13_e2FD.dtype


@dataclass(frozen=True)
class PackedLayerExperts:
    """The same weights, one prepared linear per expert (oneDNN's layout on CPU); no stacked copy is kept."""

    w13_e: tuple[Linear, ...]  # each [2F, D]
    w2_e: tuple[Linear, ...]  # each [D, F]

    @property
    def num_experts(self) -> int:
        return len(self.w13_e)

    @property
    def dtype(self) -> torch.dtype:
        return self.w13_e[0].dtype

    def unpacked(self) -> LayerExperts:
        return LayerExperts(
            w13_e2FD=torch.stack([w.dense_weight() for w in self.w13_e]),
            w2_eDF=torch.stack([w.dense_weight() for w in self.w2_e]),
        )


ExpertWeights = LayerExperts | PackedLayerExperts


def prepare_layer_experts(layer: LayerExperts, *, pack: bool = True, force: bool = False) -> ExpertWeights:
    """Packed per-expert linears where the device supports it and the experts are big enough to gain (or
    force is set); the stacked tensors (padded bmm) otherwise."""
    if not (pack and packs_experts(layer.w13_e2FD.device, layer.dtype, layer.w2_eDF[0].numel(), force=force)):
        return layer
    return pack_experts(layer.w13_e2FD.unbind(0), layer.w2_eDF.unbind(0))


def packs_experts(
    device: torch.device | str, dtype: torch.dtype, expert_w2_elements: int, *, force: bool = False
) -> bool:
    """Packed experts run one matmul pair per expert: worth it once each expert's weights are large."""
    return can_pack(device, dtype) and (force or worth_packing(expert_w2_elements))


def pack_experts(w13_e2FD: Sequence[torch.Tensor], w2_eDF: Sequence[torch.Tensor]) -> PackedLayerExperts:
    """One packed linear per expert from its [2F, D] and [D, F] weights (where packs_experts allows)."""
    return PackedLayerExperts(w13_e=tuple(map(PackedLinear, w13_e2FD)), w2_e=tuple(map(PackedLinear, w2_eDF)))


def swiglu_expert(x_ND: torch.Tensor, w13_2FD: torch.Tensor, w2_DF: torch.Tensor) -> torch.Tensor:
    """w2(silu(w1 x) * w3 x) for the rows of one expert."""
    gate_NF, up_NF = (x_ND @ w13_2FD.t()).chunk(2, dim=-1)  # [N, F] each
    return (F.silu(gate_NF) * up_NF) @ w2_DF.t()  # [N, D]


PAD_WASTE_LIMIT = 2.0  # pad to one batched matmul while padding at most doubles the rows


def run_grouped_experts(x_ND: torch.Tensor, counts_e: list[int], experts: ExpertWeights) -> torch.Tensor:
    """Rows of x_ND are grouped by local expert: the first counts_e[0] rows go to expert 0, and so on.

    Packed experts: one packed matmul pair per expert over its rows. Stacked experts with few rows per
    expert (decode): one batched matmul pair over all experts, rows padded to the largest group; many or
    very uneven rows: one matmul pair per expert over its rows.
    """
    assert len(counts_e) == experts.num_experts, (
        f"got row counts for {len(counts_e)} experts, the layer holds {experts.num_experts}"
    )
    num_rows = x_ND.shape[0]
    assert sum(counts_e) == num_rows, f"counts sum to {sum(counts_e)}, got {num_rows} rows"
    if isinstance(experts, PackedLayerExperts):
        return _packed_experts(x_ND, counts_e, experts)
    if num_rows and experts.num_experts * max(counts_e) <= PAD_WASTE_LIMIT * num_rows:
        return _padded_experts(x_ND, counts_e, experts)
    out_ND = torch.empty_like(x_ND)
    start = 0
    for local_expert, count in enumerate(counts_e):
        if count:
            rows = slice(start, start + count)
            out_ND[rows] = swiglu_expert(x_ND[rows], experts.w13_e2FD[local_expert], experts.w2_eDF[local_expert])
        start += count
    return out_ND


def _packed_experts(x_ND: torch.Tensor, counts_e: list[int], experts: PackedLayerExperts) -> torch.Tensor:
    outputs = []
    start = 0
    for local_expert, count in enumerate(counts_e):
        if count:
            gate_NF, up_NF = experts.w13_e[local_expert](x_ND[start : start + count]).chunk(2, dim=-1)
            outputs.append(experts.w2_e[local_expert](F.silu(gate_NF) * up_NF))  # [count, D]
        start += count
    return torch.cat(outputs) if outputs else torch.empty_like(x_ND)


def _padded_experts(x_ND: torch.Tensor, counts_e: list[int], experts: LayerExperts) -> torch.Tensor:
    num_experts, longest = experts.num_experts, max(counts_e)
    counts = torch.tensor(counts_e, device=x_ND.device)
    expert_N = torch.repeat_interleave(torch.arange(num_experts, device=x_ND.device), counts)  # [N]
    starts_e = torch.cumsum(counts, 0) - counts
    offset_N = torch.arange(x_ND.shape[0], device=x_ND.device) - starts_e[expert_N]  # [N]
    x_eRD = x_ND.new_zeros(num_experts, longest, x_ND.shape[1])
    x_eRD[expert_N, offset_N] = x_ND
    gate_eRF, up_eRF = torch.bmm(x_eRD, experts.w13_e2FD.transpose(1, 2)).chunk(2, dim=-1)
    y_eRD = torch.bmm(F.silu(gate_eRF) * up_eRF, experts.w2_eDF.transpose(1, 2))
    return y_eRD[expert_N, offset_N]  # [N, D]


def local_moe(
    x_TD: torch.Tensor, topk_weights_TK: torch.Tensor, topk_ids_TK: torch.Tensor, experts: ExpertWeights
) -> torch.Tensor:
    """The EP=1 path: all experts are local. Sort the T*K rows by expert, run, unsort, weight, sum."""
    num_tokens, top_k = topk_ids_TK.shape
    flat_ids_N = topk_ids_TK.reshape(-1)  # [N = T*K]
    order_N = torch.argsort(flat_ids_N, stable=True)
    counts_e = torch.bincount(flat_ids_N, minlength=experts.num_experts).tolist()
    x_sorted_ND = x_TD[order_N // top_k]  # row n of the sorted order comes from token order[n] // K
    y_sorted_ND = run_grouped_experts(x_sorted_ND, counts_e, experts)
    return weighted_combine(y_sorted_ND, order_N, topk_weights_TK, num_tokens)


def weighted_combine(
    y_sorted_ND: torch.Tensor, order_N: torch.Tensor, topk_weights_TK: torch.Tensor, num_tokens: int
) -> torch.Tensor:
    """Undo the sort, then weight and sum each token's K rows."""
    y_ND = torch.empty_like(y_sorted_ND)
    y_ND[order_N] = y_sorted_ND
    return weight_and_sum(y_ND, topk_weights_TK)


def weight_and_sum(y_ND: torch.Tensor, topk_weights_TK: torch.Tensor) -> torch.Tensor:
    """Rows in (token, k) order: weight each of a token's K rows by its router weight, sum over K."""
    num_tokens, top_k = topk_weights_TK.shape
    y_TKD = y_ND.view(num_tokens, top_k, -1)
    weighted_TKD = y_TKD * topk_weights_TK[:, :, None]  # fp32 weights, like the reference
    return weighted_TKD.sum(dim=1).to(y_ND.dtype)  # [T, D]
