"""Routing bookkeeping for expert-parallel dispatch: the frozen `DispatchPlan` and the sorts behind it.

Pure tensor math, no collectives: this module decides the order rows travel in and how many go where;
`workers.comm.overlap` sends them (the attention ranks), `workers.comm.dispatch` and
`workers.comm.single_source` receive them and send them back (the expert ranks). It knows nothing about experts'
weights or about which global expert a local index stands for.

Shape legend:
    D  model dim (any trailing row width)
    N  rows this rank sends (T tokens * K top-k)
    M  rows this rank receives
    R  ranks in the group
    e  local experts on one rank; e_max the maximum over ranks
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from workers.comm.errors import DispatchError


@dataclass(frozen=True, eq=False)
class DispatchPlan:
    """What a dispatch did, so that `combine` can send every row back to its original position."""

    permutation_N: torch.Tensor  # [N] int64: x_ND[permutation_N] is sorted by (dest rank, local expert)
    send_counts_RE: torch.Tensor  # [R, e_max] int64: rows this rank sends to each (rank, local expert)
    recv_counts_RE: torch.Tensor  # [R, e_max] int64: rows received from each source, per local expert
    input_splits: tuple[int, ...]  # [R] rows sent to each rank
    output_splits: tuple[int, ...]  # [R] rows received from each rank

    @property
    def num_ranks(self) -> int:
        return len(self.input_splits)

    @property
    def num_sent(self) -> int:
        return sum(self.input_splits)

    @property
    def num_received(self) -> int:
        return sum(self.output_splits)


def plan_sends(
    dest_rank_N: torch.Tensor,
    dest_local_expert_N: torch.Tensor,
    *,
    num_ranks: int,
    num_local_experts_max: int,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Returns (permutation_N, send_counts_RE): a stable sort of the rows by (dest rank, local expert)."""
    check_destinations(
        dest_rank_N, dest_local_expert_N, num_ranks=num_ranks, num_local_experts_max=num_local_experts_max
    )
    key_N = dest_rank_N.long() * num_local_experts_max + dest_local_expert_N.long()  # [N]
    permutation_N = torch.argsort(key_N, stable=True)  # [N]
    send_counts_RE = torch.bincount(key_N, minlength=num_ranks * num_local_experts_max)
    return permutation_N, send_counts_RE.view(num_ranks, num_local_experts_max)


def receiver_plan(recv_counts_RE: torch.Tensor) -> DispatchPlan:
    """The plan of a rank that sends no rows and received recv_counts_RE[s, j] rows from source rank s for
    its local expert j: an expert rank's, whichever way its rows arrived."""
    return DispatchPlan(
        permutation_N=torch.empty(0, dtype=torch.int64, device=recv_counts_RE.device),
        send_counts_RE=torch.zeros_like(recv_counts_RE),
        recv_counts_RE=recv_counts_RE,
        input_splits=(0,) * recv_counts_RE.shape[0],
        output_splits=tuple(recv_counts_RE.sum(1).tolist()),
    )


def check_destinations(
    dest_rank_N: torch.Tensor,
    dest_local_expert_N: torch.Tensor,
    *,
    num_ranks: int,
    num_local_experts_max: int,
) -> None:
    if num_local_experts_max < 1:
        raise DispatchError(f"num_local_experts_max must be at least 1, got {num_local_experts_max}")
    for name, tensor in (("dest_rank_N", dest_rank_N), ("dest_local_expert_N", dest_local_expert_N)):
        if tensor.dim() != 1 or tensor.dtype.is_floating_point or tensor.dtype == torch.bool:
            raise DispatchError(
                f"{name} must be a 1-D integer tensor, got {tensor.dtype} of shape {tuple(tensor.shape)}"
            )
    if dest_rank_N.shape != dest_local_expert_N.shape:
        raise DispatchError(
            f"dest_rank_N has {dest_rank_N.numel()} rows "
            f"but dest_local_expert_N has {dest_local_expert_N.numel()}"
        )
    if dest_rank_N.numel() == 0:
        return
    bad_N = (dest_rank_N < 0) | (dest_rank_N >= num_ranks)  # [N]
    bad_N |= (dest_local_expert_N < 0) | (dest_local_expert_N >= num_local_experts_max)
    if bool(bad_N.any()):
        row = int(bad_N.nonzero()[0, 0])
        raise DispatchError(
            f"row {row} is routed to rank {int(dest_rank_N[row])}, local expert "
            f"{int(dest_local_expert_N[row])}, outside {num_ranks} ranks x "
            f"{num_local_experts_max} local experts"
        )


def counts_if_grouped(plan: DispatchPlan, *, num_local_experts: int) -> list[int] | None:
    """Rows per local expert when the received rows are already grouped by local expert, else None.

    Rows arrive by source rank, then by local expert; when only one rank sent rows (in this engine only
    the attention rank sends), they are grouped already and need no regrouping gather (nor its inverse
    afterwards): for a W2 prefill layer that is two [8192, 1024] copies."""
    sources = [r for r, count in enumerate(plan.output_splits) if count]
    if len(sources) > 1:
        return None
    if not sources:
        return [0] * num_local_experts
    counts = plan.recv_counts_RE[sources[0]].tolist()
    if any(counts[num_local_experts:]):
        raise DispatchError(
            f"received rows for local experts {[e for e, c in enumerate(counts) if c and e >= num_local_experts]} "
            f"but this rank holds {num_local_experts} experts"
        )
    return counts[:num_local_experts]


def unpermute(sorted_ND: torch.Tensor, permutation_N: torch.Tensor) -> torch.Tensor:
    """Inverse of `x_ND[permutation_N]`: puts row i of `sorted_ND` back at position permutation_N[i]."""
    out_ND = torch.empty_like(sorted_ND)
    out_ND[permutation_N] = sorted_ND
    return out_ND
