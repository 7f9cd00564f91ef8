"""Expert-parallel token dispatch and combine over `torch.distributed.all_to_all_single`.

`dispatch_rows` sends every row to the (rank, local expert) the router chose; `combine` sends the processed
rows back and restores their original order. Any rank may send rows to any rank, itself included;
ranks with nothing to send or receive still call both, with zero-row tensors. Collectives per call:
`dispatch_rows` 2 (split sizes, then rows), `combine` 1 (rows). Steps small enough to pad go through
`workers.comm.single_source` instead (1 collective); `combine` serves both.

The process group is always passed in. Tensors must live on the group's device (CPU for gloo, this
rank's GPU for NCCL); the device is taken from `x_ND`. This module knows nothing about expert weights
or about which global expert a local index stands for: that is the placement's business.

Shape legend:
    D  model dim
    N  rows this rank sends (T tokens * K top-k)
    M  rows this rank receives
    R  ranks in the group
    e  local experts on one rank; e_max the maximum over ranks
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from workers.comm.errors import CollectiveError, DispatchError
from workers.comm.plan import DispatchPlan, plan_sends, unpermute


def exchange_counts(send_counts_RE: torch.Tensor, *, group: dist.ProcessGroup) -> torch.Tensor:
    """The split-size exchange: one `all_to_all_single` over the flattened [R * e_max] counts.

    `send_counts_RE[r, j]` rows go from this rank to local expert j of rank r; the result's
    `[s, j]` entry is how many rows source rank s sends to local expert j of this rank.
    """
    num_ranks = dist.get_world_size(group)
    if send_counts_RE.dim() != 2 or send_counts_RE.shape[0] != num_ranks:
        raise DispatchError(
            f"send_counts_RE must have shape [R={num_ranks}, e_max], got {tuple(send_counts_RE.shape)}"
        )
    send_flat = send_counts_RE.to(torch.int64).contiguous().view(-1)  # [R * e_max]
    recv_flat = torch.empty_like(send_flat)  # [R * e_max]
    _all_to_all(recv_flat, send_flat, group=group, what="split sizes")
    return recv_flat.view(send_counts_RE.shape)  # [R, e_max]


def dispatch_rows(
    x_ND: torch.Tensor,
    dest_rank_N: torch.Tensor,
    dest_local_expert_N: torch.Tensor,
    *,
    group: dist.ProcessGroup,
    num_local_experts_max: int,
) -> tuple[torch.Tensor, DispatchPlan]:
    """Returns (recv_x_MD, plan): rows received are ordered by source rank, then by local expert; rows from
    one source for one expert keep the order they had in that source's `x_ND`. Each received row's local
    expert follows from `plan.recv_counts_RE` (the expert rank reads its per-expert counts there)."""
    _check_device("x_ND", x_ND, group)
    device = x_ND.device
    permutation_N, send_counts_RE = plan_sends(
        dest_rank_N.to(device),
        dest_local_expert_N.to(device),
        num_ranks=dist.get_world_size(group),
        num_local_experts_max=num_local_experts_max,
    )
    _check_rows("x_ND", x_ND, permutation_N.shape[0])
    recv_counts_RE = exchange_counts(send_counts_RE, group=group)
    input_splits, output_splits = torch.stack([send_counts_RE.sum(1), recv_counts_RE.sum(1)]).tolist()
    plan = DispatchPlan(
        permutation_N=permutation_N,
        send_counts_RE=send_counts_RE,
        recv_counts_RE=recv_counts_RE,
        input_splits=tuple(input_splits),
        output_splits=tuple(output_splits),
    )
    recv_x_MD = x_ND.new_empty((plan.num_received, x_ND.shape[1]))
    _all_to_all(
        recv_x_MD,
        x_ND[permutation_N],
        output_splits=plan.output_splits,
        input_splits=plan.input_splits,
        group=group,
        what="dispatch rows",
    )
    return recv_x_MD, plan


def combine(y_MD: torch.Tensor, plan: DispatchPlan, *, group: dist.ProcessGroup) -> torch.Tensor:
    """Sends processed rows back to where they came from; returns y_ND in the original order of x_ND.

    `y_MD` must be in the order the rows were received.
    """
    _check_rows("y_MD", y_MD, plan.num_received)
    _check_device("y_MD", y_MD, group)
    num_ranks = dist.get_world_size(group)
    if num_ranks != plan.num_ranks:
        raise DispatchError(f"plan was made for {plan.num_ranks} ranks but the group has {num_ranks}")
    sorted_y_ND = y_MD.new_empty((plan.num_sent, y_MD.shape[1]))
    _all_to_all(
        sorted_y_ND,
        y_MD.contiguous(),
        output_splits=plan.input_splits,
        input_splits=plan.output_splits,
        group=group,
        what="combine rows",
    )
    return unpermute(sorted_y_ND, plan.permutation_N.to(y_MD.device))


def _check_rows(name: str, rows: torch.Tensor, expected: int) -> None:
    if rows.dim() != 2 or rows.shape[0] != expected:
        raise DispatchError(f"{name} must have shape [{expected}, D], got {tuple(rows.shape)}")


def _check_device(name: str, rows: torch.Tensor, group: dist.ProcessGroup) -> None:
    backend = dist.get_backend(group)
    if backend == "nccl" and rows.device.type != "cuda":
        raise DispatchError(f"{name} is on {rows.device}, but the {backend} group needs CUDA tensors")
    if backend == "gloo" and rows.device.type != "cpu":
        raise DispatchError(f"{name} is on {rows.device}, but the {backend} group needs CPU tensors")


def _all_to_all(
    recv: torch.Tensor,
    send: torch.Tensor,
    *,
    group: dist.ProcessGroup,
    what: str,
    output_splits: tuple[int, ...] | None = None,
    input_splits: tuple[int, ...] | None = None,
) -> None:
    try:
        dist.all_to_all_single(
            recv,
            send,
            output_split_sizes=None if output_splits is None else list(output_splits),
            input_split_sizes=None if input_splits is None else list(input_splits),
            group=group,
        )
    except RuntimeError as exc:  # gloo reports timeouts as plain RuntimeError, NCCL as DistBackendError
        rank, size = dist.get_rank(group), dist.get_world_size(group)
        raise CollectiveError(f"all_to_all_single ({what}) failed on rank {rank} of {size}: {exc}") from exc
