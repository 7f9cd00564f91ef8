"""SwiGLU expert math over rows already grouped by expert; no routing, no communication.

The raw expert computation, with one fast path per situation (the reference loop in
`workers.model.reference_moe` is the oracle all of them are tested against):
  - one matmul pair per expert over its rows: packed CPU experts always, stacked experts when padding
    would waste too much (prefill, uneven routing);
  - one padded batched matmul pair over all experts: stacked experts with few, even rows (decode);
  - the compiled fused layer for small in-process steps lives in `workers.model.fused_decode`.
Shapes: N rows, D model dim, F expert ffn dim, e local experts.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from workers.model.linear import Linear, PackedLinear, PlainLinear, can_pack, worth_packing


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

    def linears(self, expert: int) -> tuple[Linear, Linear]:
        """(w13 [2F, D], w2 [D, F]) of one local expert, as views of the stacked tensors."""
        return PlainLinear(self.w13_e2FD[expert]), PlainLinear(self.w2_eDF[expert])


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

    def linears(self, expert: int) -> tuple[Linear, Linear]:
        return self.w13_e[expert], self.w2_e[expert]


ExpertWeights = LayerExperts | PackedLayerExperts


def packs_experts(device: torch.device | str, dtype: torch.dtype, expert_w2_elements: int) -> bool:
    """Packed experts run one matmul pair per expert: worth it once each expert's weights are large."""
    return can_pack(device, dtype) and worth_packing(expert_w2_elements)


def pack_experts(w13_e2FD: Sequence[torch.Tensor], w2_eDF: Sequence[torch.Tensor]) -> PackedLayerExperts:
    """One packed linear per expert from its [2F, D] and [D, F] weights (where packs_experts allows)."""
    return PackedLayerExperts(w13_e=tuple(map(PackedLinear, w13_e2FD)), w2_e=tuple(map(PackedLinear, w2_eDF)))


PAD_WASTE_LIMIT = 2.0  # pad to one batched matmul while padding at most doubles the rows


def run_grouped_experts(x_ND: torch.Tensor, counts_e: list[int], experts: ExpertWeights) -> torch.Tensor:
    """Rows of x_ND are grouped by local expert: the first counts_e[0] rows go to expert 0, and so on."""
    assert len(counts_e) == experts.num_experts, (
        f"got row counts for {len(counts_e)} experts, the layer holds {experts.num_experts}"
    )
    num_rows = x_ND.shape[0]
    assert sum(counts_e) == num_rows, f"counts sum to {sum(counts_e)}, got {num_rows} rows"
    padded = isinstance(experts, LayerExperts) and num_rows > 0
    if padded and experts.num_experts * max(counts_e) <= PAD_WASTE_LIMIT * num_rows:
        return _padded_experts(x_ND, counts_e, experts)
    return _expert_by_expert(x_ND, counts_e, experts)


def _expert_by_expert(x_ND: torch.Tensor, counts_e: list[int], experts: ExpertWeights) -> torch.Tensor:
    """One matmul pair per expert over its rows. Serves packed experts (oneDNN reads each packed weight once:
    one W2 layer's 8 experts at 8 rows, 14 ms against 28-52 ms for sgemm; docs/PERFORMANCE.md) and stacked
    experts whose rows are too many or too uneven to pad."""
    out_ND = torch.empty_like(x_ND)
    start = 0
    for local_expert, count in enumerate(counts_e):
        if count:
            w13, w2 = experts.linears(local_expert)
            gate_NF, up_NF = w13(x_ND[start : start + count]).chunk(2, dim=-1)  # [count, F] each
            out_ND[start : start + count] = w2(F.silu(gate_NF) * up_NF)  # [count, D]
        start += count
    return out_ND


def _padded_experts(x_ND: torch.Tensor, counts_e: list[int], experts: LayerExperts) -> torch.Tensor:
    """One batched matmul pair over all experts, rows padded to the largest group: stacked experts (CUDA, and
    CPU experts under 2^18 weights) at decode's few rows per expert, where one call beats e small ones."""
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
    top_k = topk_ids_TK.shape[1]
    flat_ids_N = topk_ids_TK.reshape(-1)  # [N = T*K]
    order_N = torch.argsort(flat_ids_N, stable=True)
    counts_e = torch.bincount(flat_ids_N, minlength=experts.num_experts).tolist()
    x_sorted_ND = x_TD[order_N // top_k]  # row n of the sorted order comes from token order[n] // K
    y_sorted_ND = run_grouped_experts(x_sorted_ND, counts_e, experts)
    y_ND = torch.empty_like(y_sorted_ND)
    y_ND[order_N] = y_sorted_ND  # back to (token, k) order
    return weight_and_sum(y_ND, topk_weights_TK)


def weight_and_sum(y_ND: torch.Tensor, topk_weights_TK: torch.Tensor) -> torch.Tensor:
    """Rows in (token, k) order: weight each of a token's K rows by its router weight, sum over K."""
    num_tokens, top_k = topk_weights_TK.shape
    y_TKD = y_ND.view(num_tokens, top_k, -1)
    weighted_TKD = y_TKD * topk_weights_TK[:, :, None]  # fp32 weights, like the reference
    return weighted_TKD.sum(dim=1).to(y_ND.dtype)  # [T, D]
