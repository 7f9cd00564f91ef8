"""Dispatch from one source rank in a single collective: the per-expert counts travel with the rows.

`dispatch_rows` exchanges split sizes first, then the rows: two collectives. In this engine only the
attention rank sends rows (the expert ranks only receive them and send them back), and the attention rank
decides each step's capacity once (`fixed_capacity_rows`, at most T * K rows) and sends it to every rank
in the step header. The source then sends each receiving rank one byte buffer of fixed size: a header of
e_max int64 counts (rows per local expert), then room for `capacity` rows of which the first sum(counts)
are real. Every split is known in advance, so one `all_to_all_single` carries counts and rows; `combine`
is unchanged (the plan returned here is the one `dispatch_rows` would have made).

The price is padding: every receiver is sent room for `capacity` rows. With a single receiver there is
none (all rows go to it); with several, `fixed_capacity_rows` admits the step only while the padded
bytes stay small.

Shape legend:
    D  model dim
    N  rows the source sends (T tokens * K top-k), at most `capacity`
    M  rows this rank receives
    R  ranks in the group
    e  local experts on one rank; e_max the maximum over ranks
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from workers.comm.dispatch import _all_to_all, _check_device, _check_rows, dispatch_rows
from workers.comm.errors import DispatchError
from workers.comm.plan import DispatchPlan, plan_sends

_COUNT_BYTES = 8  # int64


def fixed_capacity_rows(
    *, num_tokens: int, top_k: int, row_bytes: int, num_receivers: int, max_padded_bytes: int
) -> int:
    """The capacity in rows if a step of num_tokens goes through `dispatch_from_source`, else 0 (split sizes
    first). Only the sender calls it; the step header carries the answer to every other rank.

    max_padded_bytes 0 turns the single-collective path off; a single receiver always takes it (it carries
    no padding)."""
    capacity = num_tokens * top_k
    if max_padded_bytes <= 0 or capacity == 0:
        return 0
    if num_receivers == 1 or num_receivers * capacity * row_bytes <= max_padded_bytes:
        return capacity
    return 0


def dispatch_from_source(
    x_ND: torch.Tensor,
    dest_rank_N: torch.Tensor,
    dest_local_expert_N: torch.Tensor,
    *,
    group: dist.ProcessGroup,
    num_local_experts_max: int,
    capacity: int,
    receivers: tuple[int, ...],
    source: int = 0,
) -> tuple[torch.Tensor, DispatchPlan]:
    """Returns (recv_x_MD, plan): the rows and plan `dispatch_rows` would return.

    Every rank calls it with the same capacity, receivers and source. The source passes its rows; every
    other rank passes zero rows (of the right D and dtype) and no destinations."""
    _check_device("x_ND", x_ND, group)
    rank, num_ranks = dist.get_rank(group), dist.get_world_size(group)
    if source in receivers or not receivers or any(not 0 <= r < num_ranks for r in receivers):
        raise DispatchError(f"receivers {receivers} must be ranks of the group of {num_ranks} other than {source}")
    device, (num_rows, width) = x_ND.device, x_ND.shape
    header_bytes, slot_bytes = slot_layout(num_local_experts_max, capacity, width * x_ND.element_size())
    permutation_N = torch.empty(0, dtype=torch.int64, device=device)
    send_counts_RE = torch.zeros(num_ranks, num_local_experts_max, dtype=torch.int64, device=device)
    send_BYTES = torch.empty(0, dtype=torch.uint8, device=device)
    if rank == source:
        if num_rows > capacity:
            raise DispatchError(f"x_ND has {num_rows} rows, more than the step's capacity of {capacity}")
        permutation_N, send_counts_RE = plan_sends(
            dest_rank_N.to(device), dest_local_expert_N.to(device), num_ranks=num_ranks,
            num_local_experts_max=num_local_experts_max,
        )
        _check_rows("x_ND", x_ND, permutation_N.shape[0])
        if int(send_counts_RE[[r for r in range(num_ranks) if r not in receivers]].sum()):
            raise DispatchError(f"rows are routed to ranks outside the receivers {receivers}")
        send_BYTES = pack_slots(x_ND, permutation_N, send_counts_RE, receivers, slot_bytes, header_bytes)
    elif num_rows:
        raise DispatchError(f"only the source rank {source} sends rows; rank {rank} got {num_rows}")
    input_splits = [slot_bytes if rank == source and r in receivers else 0 for r in range(num_ranks)]
    output_splits = [slot_bytes if rank in receivers and r == source else 0 for r in range(num_ranks)]
    recv_BYTES = torch.empty(sum(output_splits), dtype=torch.uint8, device=device)
    _all_to_all(recv_BYTES, send_BYTES, output_splits=tuple(output_splits), input_splits=tuple(input_splits),
                group=group, what="dispatch counts + rows")
    recv_counts_RE = torch.zeros(num_ranks, num_local_experts_max, dtype=torch.int64, device=device)
    recv_x_MD = x_ND.new_empty((0, width))
    if rank in receivers:
        counts_e = recv_BYTES[:header_bytes].view(torch.int64)  # [e_max]
        num_received = int(counts_e.sum())
        if counts_e.min() < 0 or num_received > capacity:
            raise DispatchError(f"received counts {counts_e.tolist()} do not fit the capacity of {capacity} rows")
        recv_counts_RE[source] = counts_e
        rows = recv_BYTES[header_bytes : header_bytes + num_received * width * x_ND.element_size()]
        recv_x_MD = rows.view(x_ND.dtype).view(num_received, width)  # [M, D], a view of the received bytes
    plan = DispatchPlan(
        permutation_N=permutation_N, send_counts_RE=send_counts_RE, recv_counts_RE=recv_counts_RE,
        input_splits=tuple(send_counts_RE.sum(1).tolist()), output_splits=tuple(recv_counts_RE.sum(1).tolist()),
    )
    return recv_x_MD, plan


def dispatch_step(
    x_ND: torch.Tensor,
    dest_rank_N: torch.Tensor,
    dest_local_expert_N: torch.Tensor,
    *,
    group: dist.ProcessGroup,
    num_local_experts_max: int,
    capacity: int,
    receivers: tuple[int, ...],
) -> tuple[torch.Tensor, DispatchPlan]:
    """The step's dispatch as every rank must run it alike: (recv_x_MD, plan) from `dispatch_from_source`
    when the step header carries a capacity, from `dispatch_rows` (split sizes first) when it carries 0."""
    if capacity == 0:
        return dispatch_rows(x_ND, dest_rank_N, dest_local_expert_N, group=group,
                             num_local_experts_max=num_local_experts_max)
    return dispatch_from_source(x_ND, dest_rank_N, dest_local_expert_N, group=group,
                                num_local_experts_max=num_local_experts_max, capacity=capacity, receivers=receivers)


def slot_layout(num_local_experts_max: int, capacity: int, row_bytes: int) -> tuple[int, int]:
    """(header bytes, slot bytes) of one receiver's slot: e_max int64 counts, then room for `capacity` rows,
    padded to 8 bytes."""
    header_bytes = num_local_experts_max * _COUNT_BYTES
    return header_bytes, -(-(header_bytes + capacity * row_bytes) // _COUNT_BYTES) * _COUNT_BYTES


def pack_slots(
    x_ND: torch.Tensor, permutation_N: torch.Tensor, send_counts_RE: torch.Tensor, receivers: tuple[int, ...],
    slot_bytes: int, header_bytes: int,
) -> torch.Tensor:
    """One slot per receiver, in rank order: [counts of its local experts | its rows, sorted | padding]."""
    width, row_bytes = x_ND.shape[1], x_ND.shape[1] * x_ND.element_size()
    send_BYTES = torch.empty(len(receivers) * slot_bytes, dtype=torch.uint8, device=x_ND.device)
    rows_per_rank = send_counts_RE.sum(1).tolist()  # [R]
    starts = [sum(rows_per_rank[:r]) for r in range(len(rows_per_rank))]  # rows sorted by rank come first
    for slot, r in enumerate(sorted(receivers)):
        base = slot * slot_bytes
        send_BYTES[base : base + header_bytes].view(torch.int64).copy_(send_counts_RE[r])
        count = rows_per_rank[r]
        out_rows = send_BYTES[base + header_bytes : base + header_bytes + count * row_bytes]
        rows_index = permutation_N[starts[r] : starts[r] + count]
        torch.index_select(x_ND, 0, rows_index, out=out_rows.view(x_ND.dtype).view(count, width))
    return send_BYTES
