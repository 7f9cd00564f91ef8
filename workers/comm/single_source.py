"""Dispatch from one source rank in a single collective: the per-expert counts travel with the rows.

Exchanging split sizes first, then the rows, takes two collectives. With one attention rank (rank 0) only
it sends rows (the expert ranks only receive them and send them back), and it decides each step's capacity
once (`fixed_capacity_rows`, at most T * K rows) and sends it to every rank in the step header. The source
then sends each receiving rank one byte buffer of fixed size, a slot: a header of e_max int64 counts (rows
per local expert), then room for `capacity` rows of which the first sum(counts) are real. Every split is
known in advance, so one `all_to_all_single` carries counts and rows. The source packs the slots
(`pack_slots`, from `workers.comm.overlap.send_from_source`), the receivers unpack theirs
(`receive_from_source`); the plan a receiver gets is the one the split-size exchange would give it, and
`combine` sends the rows back either way.

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

from workers.comm.dispatch import _all_to_all, _check_device, receive_rows
from workers.comm.errors import DispatchError
from workers.comm.plan import DispatchPlan, receiver_plan

_COUNT_BYTES = 8  # int64
_SOURCE = 0  # the one attention rank: with several, every step exchanges split sizes first


def fixed_capacity_rows(
    *, num_tokens: int, top_k: int, row_bytes: int, num_receivers: int, max_padded_bytes: int
) -> int:
    """The capacity in rows if a step of num_tokens goes in a single collective, else 0 (split sizes first).
    Only the sender calls it; the step header carries the answer to every other rank.

    max_padded_bytes 0 turns the single-collective path off; a single receiver always takes it (it carries
    no padding)."""
    capacity = num_tokens * top_k
    if max_padded_bytes <= 0 or capacity == 0:
        return 0
    if num_receivers == 1 or num_receivers * capacity * row_bytes <= max_padded_bytes:
        return capacity
    return 0


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
    """An expert rank's half of the step's dispatch: (recv_x_MD, plan) from `receive_from_source` when the
    step header carries a capacity, from `receive_rows` (split sizes first) when it carries 0.

    The expert rank sends nothing: x_ND and the destinations have no rows (x_ND gives D, dtype and device).
    The attention ranks send with `send_from_source`, the same capacity and receivers."""
    rank = dist.get_rank(group)
    if x_ND.dim() != 2 or x_ND.shape[0] or dest_rank_N.numel() or dest_local_expert_N.numel():
        raise DispatchError(
            f"an expert rank sends no rows (the attention ranks send with send_from_source); rank {rank} got x_ND "
            f"of shape {tuple(x_ND.shape)} and {dest_rank_N.numel()}, {dest_local_expert_N.numel()} destinations"
        )
    if rank not in receivers:
        raise DispatchError(f"rank {rank} receives rows but is not among the receivers {receivers}")
    _check_device("x_ND", x_ND, group)
    if capacity == 0:
        return receive_rows(x_ND, group=group, num_local_experts_max=num_local_experts_max)
    return receive_from_source(x_ND, group=group, num_local_experts_max=num_local_experts_max, capacity=capacity,
                               receivers=receivers)


def receive_from_source(
    nothing_0D: torch.Tensor, *, group: dist.ProcessGroup, num_local_experts_max: int, capacity: int,
    receivers: tuple[int, ...],
) -> tuple[torch.Tensor, DispatchPlan]:
    """(recv_x_MD, plan): this receiver's slot from the source, unpacked. Its rows are a view of the received
    bytes. `nothing_0D` (no rows) gives D and dtype; `dispatch_step` has checked it."""
    num_ranks, width = dist.get_world_size(group), nothing_0D.shape[1]
    if _SOURCE in receivers or any(not 0 <= r < num_ranks for r in receivers):
        raise DispatchError(f"receivers {receivers} must be ranks of the group of {num_ranks} other than {_SOURCE}")
    row_bytes = width * nothing_0D.element_size()
    header_bytes, slot_bytes = slot_layout(num_local_experts_max, capacity, row_bytes)
    recv_BYTES = torch.empty(slot_bytes, dtype=torch.uint8, device=nothing_0D.device)
    output_splits = tuple(slot_bytes if r == _SOURCE else 0 for r in range(num_ranks))
    _all_to_all(recv_BYTES, recv_BYTES.new_empty(0), output_splits=output_splits, input_splits=(0,) * num_ranks,
                group=group, what="dispatch counts + rows")
    counts_e = recv_BYTES[:header_bytes].view(torch.int64)  # [e_max]
    num_received = int(counts_e.sum())
    if counts_e.min() < 0 or num_received > capacity:
        raise DispatchError(f"received counts {counts_e.tolist()} do not fit the capacity of {capacity} rows")
    recv_counts_RE = torch.zeros(num_ranks, num_local_experts_max, dtype=torch.int64, device=nothing_0D.device)
    recv_counts_RE[_SOURCE] = counts_e
    rows = recv_BYTES[header_bytes : header_bytes + num_received * row_bytes]
    recv_x_MD = rows.view(nothing_0D.dtype).view(num_received, width)  # [M, D]
    return recv_x_MD, receiver_plan(recv_counts_RE)


def slot_layout(num_local_experts_max: int, capacity: int, row_bytes: int) -> tuple[int, int]:
    """(header bytes, slot bytes) of one receiver's slot: e_max int64 counts, then room for `capacity` rows,
    padded to 8 bytes."""
    header_bytes = num_local_experts_max * _COUNT_BYTES
    return header_bytes, -(-(header_bytes + capacity * row_bytes) // _COUNT_BYTES) * _COUNT_BYTES


def pack_slots(
    x_ND: torch.Tensor, permutation_N: torch.Tensor, send_counts_RE: torch.Tensor, receivers: tuple[int, ...],
    slot_bytes: int, header_bytes: int,
) -> torch.Tensor:
    """The source's send buffer: one slot per receiver, in rank order: [counts of its local experts | its rows,
    sorted | padding]."""
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
