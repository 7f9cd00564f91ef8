"""The EP=1 path: the same sort / unsort as `dispatch` and `combine`, in-process, with no collective.

Used when there are no expert workers and as the oracle for the distributed path: with a single rank,
`local_dispatch` returns exactly what `dispatch` would (rows grouped by local expert, original order
kept inside each expert) and a `DispatchPlan` with R = 1.

Shape legend:
    D  model dim
    N  rows routed (T tokens * K top-k); M = N here
    e  local experts (all experts, on this one rank)
"""

from __future__ import annotations

import torch

from workers.comm.errors import DispatchError
from workers.comm.plan import DispatchPlan, plan_sends, received_local_experts, unpermute


def local_dispatch(
    x_ND: torch.Tensor,
    dest_rank_N: torch.Tensor,
    dest_local_expert_N: torch.Tensor,
    *,
    num_local_experts_max: int,
) -> tuple[torch.Tensor, torch.Tensor, DispatchPlan]:
    """Returns (sorted_x_ND, local_expert_N, plan); every `dest_rank_N` entry must be 0."""
    device = x_ND.device
    permutation_N, counts_RE = plan_sends(
        dest_rank_N.to(device),
        dest_local_expert_N.to(device),
        num_ranks=1,
        num_local_experts_max=num_local_experts_max,
    )
    if x_ND.dim() != 2 or x_ND.shape[0] != permutation_N.shape[0]:
        raise DispatchError(f"x_ND must have shape [{permutation_N.shape[0]}, D], got {tuple(x_ND.shape)}")
    num_rows = permutation_N.shape[0]
    plan = DispatchPlan(
        permutation_N=permutation_N,
        send_counts_RE=counts_RE,
        recv_counts_RE=counts_RE,
        input_splits=(num_rows,),
        output_splits=(num_rows,),
    )
    return x_ND[permutation_N], received_local_experts(counts_RE, num_received=num_rows), plan


def local_combine(y_MD: torch.Tensor, plan: DispatchPlan) -> torch.Tensor:
    """Returns y_ND in the original order of the `x_ND` given to `local_dispatch`."""
    if plan.num_ranks != 1:
        raise DispatchError(f"local_combine needs a single-rank plan, got one for {plan.num_ranks} ranks")
    if y_MD.dim() != 2 or y_MD.shape[0] != plan.num_received:
        raise DispatchError(f"y_MD must have shape [{plan.num_received}, D], got {tuple(y_MD.shape)}")
    return unpermute(y_MD, plan.permutation_N.to(y_MD.device))


class LocalDispatcher:
    """`local_dispatch` / `local_combine` behind the same interface as `AllToAllDispatcher`."""

    def dispatch(
        self,
        x_ND: torch.Tensor,
        dest_rank_N: torch.Tensor,
        dest_local_expert_N: torch.Tensor,
        *,
        num_local_experts_max: int,
    ) -> tuple[torch.Tensor, torch.Tensor, DispatchPlan]:
        return local_dispatch(
            x_ND, dest_rank_N, dest_local_expert_N, num_local_experts_max=num_local_experts_max
        )

    def combine(self, y_MD: torch.Tensor, plan: DispatchPlan) -> torch.Tensor:
        return local_combine(y_MD, plan)
