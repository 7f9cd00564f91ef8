"""The source's dispatch and combine issued together, without waiting: ping-pong overlap.

In this engine only the attention rank sends rows and it receives none in the dispatch, so it knows every
split of both collectives as soon as it has routed: the rows it sends each rank (`plan.input_splits`) come
back to it in the combine. `send_from_source` therefore starts the dispatch (one collective, or split sizes
then rows) and the combine at once as asynchronous collectives (`async_op=True`) and returns a
`PendingRows`; the attention rank computes the next micro-batch's attention while the experts work, and
calls `wait()` only when it needs the rows back. The expert ranks run their halves blocking
(`dispatch_step`, then `combine`); the collectives pair up because every rank issues them in the same order
(gloo and NCCL match collectives by issue order, not by completion).

Host syncs: the rows per receiving rank (`.tolist()`), which the collectives' split sizes need.

Shape legend:
    D  model dim
    N  rows the source sends (T tokens * K top-k)
    R  ranks in the group
    e  local experts on one rank; e_max the maximum over ranks
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist

from workers.comm.dispatch import _check_device, _check_rows
from workers.comm.errors import CollectiveError, DispatchError
from workers.comm.plan import DispatchPlan, plan_sends, unpermute
from workers.comm.single_source import pack_slots, slot_layout


@dataclass(eq=False)
class PendingRows:
    """Rows on their way to the experts and back. `wait()` returns the experts' rows in x_ND's order."""

    works: tuple[dist.Work, ...]  # in issue order; the combine's last
    sorted_y_ND: torch.Tensor  # where the combine writes the rows back, sorted by (rank, local expert)
    plan: DispatchPlan
    send_buffers: tuple[torch.Tensor, ...]  # kept alive until the collectives that read them finish
    where: str  # for errors: "rank r of R"

    def wait(self) -> torch.Tensor:
        for work in self.works:
            try:
                work.wait()
            except RuntimeError as exc:  # gloo: RuntimeError; NCCL: DistBackendError (a RuntimeError)
                raise CollectiveError(f"asynchronous dispatch/combine failed on {self.where}: {exc}") from exc
        self.send_buffers = ()
        return unpermute(self.sorted_y_ND, self.plan.permutation_N)


def send_from_source(
    x_ND: torch.Tensor,
    dest_rank_N: torch.Tensor,
    dest_local_expert_N: torch.Tensor,
    *,
    group: dist.ProcessGroup,
    num_local_experts_max: int,
    capacity: int,
    receivers: tuple[int, ...],
) -> PendingRows:
    """Starts this step's dispatch of x_ND from this rank (the source, which is not a receiver) and the
    combine that brings the rows back. The receivers run `dispatch_step(..., capacity=capacity)` and
    `combine` for it; capacity > 0 packs counts and rows in one collective, 0 exchanges split sizes first."""
    _check_device("x_ND", x_ND, group)
    rank, num_ranks = dist.get_rank(group), dist.get_world_size(group)
    if rank in receivers or not receivers or any(not 0 <= r < num_ranks for r in receivers):
        raise DispatchError(f"receivers {receivers} must be ranks of the group of {num_ranks} other than {rank}")
    device, width = x_ND.device, x_ND.shape[1]
    permutation_N, send_counts_RE = plan_sends(
        dest_rank_N.to(device), dest_local_expert_N.to(device), num_ranks=num_ranks,
        num_local_experts_max=num_local_experts_max,
    )
    _check_rows("x_ND", x_ND, permutation_N.shape[0])
    rows_per_rank = send_counts_RE.sum(1).tolist()  # [R]; host sync: the split sizes
    if any(rows_per_rank[r] for r in range(num_ranks) if r not in receivers):
        raise DispatchError(f"rows are routed to ranks outside the receivers {receivers}")
    plan = DispatchPlan(
        permutation_N=permutation_N, send_counts_RE=send_counts_RE,
        recv_counts_RE=torch.zeros_like(send_counts_RE), input_splits=tuple(rows_per_rank),
        output_splits=(0,) * num_ranks,
    )
    nothing = [0] * num_ranks
    works: list[dist.Work] = []
    where = f"rank {rank} of {num_ranks}"
    if capacity > 0:
        if plan.num_sent > capacity:
            raise DispatchError(f"x_ND has {plan.num_sent} rows, more than the step's capacity of {capacity}")
        header_bytes, slot_bytes = slot_layout(num_local_experts_max, capacity, width * x_ND.element_size())
        send_BYTES = pack_slots(x_ND, permutation_N, send_counts_RE, receivers, slot_bytes, header_bytes)
        splits = [slot_bytes if r in receivers else 0 for r in range(num_ranks)]
        works.append(_start(send_BYTES.new_empty(0), send_BYTES, nothing, splits, group, where, "dispatch"))
        send_buffers: tuple[torch.Tensor, ...] = (send_BYTES,)
    else:
        counts_flat = send_counts_RE.contiguous().view(-1)  # [R * e_max]: the split-size exchange
        works.append(_start(torch.empty_like(counts_flat), counts_flat, None, None, group, where, "split sizes"))
        sorted_x_ND = x_ND[permutation_N]
        works.append(_start(x_ND.new_empty(0, width), sorted_x_ND, nothing, rows_per_rank, group, where, "rows"))
        send_buffers = (counts_flat, sorted_x_ND)
    sorted_y_ND = x_ND.new_empty((plan.num_sent, width))
    works.append(_start(sorted_y_ND, x_ND.new_empty(0, width), rows_per_rank, nothing, group, where, "combine"))
    return PendingRows(tuple(works), sorted_y_ND, plan, send_buffers, where)


def _start(
    recv: torch.Tensor, send: torch.Tensor, output_splits: list[int] | None, input_splits: list[int] | None,
    group: dist.ProcessGroup, where: str, what: str,
) -> dist.Work:
    try:
        work = dist.all_to_all_single(recv, send, output_split_sizes=output_splits, input_split_sizes=input_splits,
                                      group=group, async_op=True)
    except RuntimeError as exc:
        raise CollectiveError(f"all_to_all_single ({what}) failed to start on {where}: {exc}") from exc
    assert work is not None
    return work
