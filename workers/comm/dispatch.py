"""The expert ranks' half of expert-parallel dispatch and combine over `torch.distributed.all_to_all_single`.

Only the attention ranks send rows, and each starts its dispatch and the combine that brings the rows back
in one go (`workers.comm.overlap.send_from_source`). An expert rank sends no rows in the dispatch: it
receives them (`receive_rows` here when split sizes go first, `workers.comm.single_source` when the counts
travel with the rows), runs its experts and sends the rows back with `combine`. Collectives per call:
`receive_rows` 2 (split sizes, then rows), `combine` 1 (rows), whichever way the rows arrived.

The process group is always passed in. Tensors must live on the group's device (CPU for gloo, this
rank's GPU for NCCL); the device is taken from the tensors passed in. This module knows nothing about
expert weights or about which global expert a local index stands for: that is the placement's business.

Shape legend:
    D  model dim
    M  rows this rank receives
    R  ranks in the group
    e  local experts on one rank; e_max the maximum over ranks
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from workers.comm.errors import CollectiveError, DispatchError
from workers.comm.plan import DispatchPlan, receiver_plan


def receive_rows(
    nothing_0D: torch.Tensor, *, group: dist.ProcessGroup, num_local_experts_max: int
) -> tuple[torch.Tensor, DispatchPlan]:
    """Returns (recv_x_MD, plan) after the split-size exchange, in which this rank sends zero counts.

    `nothing_0D` (no rows) gives D, dtype and device; `dispatch_step` has checked it. Rows arrive ordered by
    source rank, then by local expert; rows from one source for one expert keep the order they had at that
    source. The rows per (source, local expert) are `plan.recv_counts_RE` (the expert rank reads its
    per-expert counts there)."""
    num_ranks = dist.get_world_size(group)
    nothing_RE = torch.zeros(num_ranks, num_local_experts_max, dtype=torch.int64, device=nothing_0D.device)
    recv_counts_RE = torch.empty_like(nothing_RE)  # [R, e_max]: the split sizes, per local expert
    _all_to_all(recv_counts_RE.view(-1), nothing_RE.view(-1), group=group, what="split sizes")
    plan = receiver_plan(recv_counts_RE)
    recv_x_MD = nothing_0D.new_empty((plan.num_received, nothing_0D.shape[1]))
    _all_to_all(recv_x_MD, nothing_0D, output_splits=plan.output_splits, input_splits=plan.input_splits,
                group=group, what="dispatch rows")
    return recv_x_MD, plan


def combine(y_MD: torch.Tensor, plan: DispatchPlan, *, group: dist.ProcessGroup) -> None:
    """Sends an expert rank's processed rows back to the ranks they came from.

    `y_MD` must be in the order the rows were received. The attention ranks' side of this collective is
    the combine `send_from_source` started with their dispatch."""
    _check_rows("y_MD", y_MD, plan.num_received)
    _check_device("y_MD", y_MD, group)
    num_ranks = dist.get_world_size(group)
    if num_ranks != plan.num_ranks:
        raise DispatchError(f"plan was made for {plan.num_ranks} ranks but the group has {num_ranks}")
    assert plan.num_sent == 0, f"combine runs on a rank that received rows, not one that sent {plan.num_sent}"
    _all_to_all(
        y_MD.new_empty((0, y_MD.shape[1])),
        y_MD.contiguous(),
        output_splits=plan.input_splits,
        input_splits=plan.output_splits,
        group=group,
        what="combine rows",
    )


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
