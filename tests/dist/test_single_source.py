"""dispatch_from_source on real gloo ranks: one collective, and exactly what `dispatch` delivers.

Rank 0 sends rank-encoded rows to the expert ranks (one of them idle when there are three); every rank
runs `dispatch` and `dispatch_from_source` on the same inputs and compares rows, local experts and plans,
then `combine` round-trips with the single-collective plan. The policy (`fixed_capacity_rows`) is pure.
"""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch
import torch.distributed as dist

from tests.dist.test_dispatch_combine import (
    GROUP_TIMEOUT_S,
    D,
    Scenario,
    _count_collectives,
    _join,
    _make_input,
    _spawn,
)
from workers.comm import DispatchError, combine, dispatch, dispatch_from_source, fixed_capacity_rows
from workers.comm.plan import received_local_experts


def _scenarios(world_size: int) -> list[Scenario]:
    workers = world_size - 1
    base, extra = divmod(8, workers)
    experts = (0, *(base + (w < extra) for w in range(workers)))
    idle_worker = (2,) if world_size >= 4 else ()
    routed_to = tuple(r for r in range(1, world_size) if r not in idle_worker)
    decode = Scenario(name="decode-like", seed=11, experts_per_rank=experts,
                      rows_per_rank=(64, *(0 for _ in range(workers))), receivers=routed_to)
    return [
        decode,
        replace(decode, name="float32, few rows", seed=12, rows_per_rank=(5, *decode.rows_per_rank[1:]),
                dtype=torch.float32),
        replace(decode, name="bfloat16 (2-byte rows)", seed=13, dtype=torch.bfloat16),
        replace(decode, name="no rows at all", seed=14, rows_per_rank=(0, *decode.rows_per_rank[1:])),
    ]


def _check_against_dispatch(scenario: Scenario, rank: int, group: dist.ProcessGroup, capacity: int) -> None:
    where = f"[{scenario.name}, capacity {capacity}] rank {rank}"
    inp = _make_input(scenario, rank)
    receivers = tuple(range(1, dist.get_world_size(group)))
    args = (inp.x_ND, inp.dest_rank_N, inp.dest_local_expert_N)
    expected_x, expected_local, expected_plan = dispatch(
        *args, group=group, num_local_experts_max=scenario.num_local_experts_max
    )
    with _count_collectives() as calls:
        recv_x, plan = dispatch_from_source(
            *args, group=group, num_local_experts_max=scenario.num_local_experts_max, capacity=capacity,
            receivers=receivers,
        )
    assert calls == {**dict.fromkeys(calls, 0), "all_to_all_single": 1}, f"{where}: ran {calls}"
    assert recv_x.dtype == scenario.dtype and torch.equal(recv_x, expected_x), (
        f"{where}: received\n{recv_x}\nexpected\n{expected_x}"
    )
    recv_local = received_local_experts(plan.recv_counts_RE, num_received=plan.num_received)
    assert torch.equal(recv_local, expected_local), f"{where}: local experts {recv_local} vs {expected_local}"
    assert torch.equal(plan.permutation_N, expected_plan.permutation_N), f"{where}: permutation"
    assert torch.equal(plan.send_counts_RE, expected_plan.send_counts_RE), f"{where}: send counts"
    assert torch.equal(plan.recv_counts_RE, expected_plan.recv_counts_RE), f"{where}: recv counts"
    assert (plan.input_splits, plan.output_splits) == (expected_plan.input_splits, expected_plan.output_splits)

    y_MD = recv_x * 2 + rank  # this receiver's "expert"
    y_ND = combine(y_MD, plan, group=group)
    expected_y_ND = inp.x_ND * 2 + inp.dest_rank_N[:, None].to(scenario.dtype)
    assert torch.equal(y_ND, expected_y_ND), f"{where}: combined\n{y_ND}\nexpected\n{expected_y_ND}"


def _rank_main(rank: int, world_size: int, port: int) -> None:
    handle = _join(rank, world_size, port, GROUP_TIMEOUT_S)
    try:
        for scenario in _scenarios(world_size):
            exact = scenario.rows_per_rank[0]
            for capacity in {max(exact, 1), exact + 7}:  # no padding, and padding after the real rows
                _check_against_dispatch(scenario, rank, handle.group, capacity)
        if rank == 0:  # rejected before any collective, so the other ranks need not take part
            with pytest.raises(DispatchError, match="more than the step's capacity of 2"):
                dispatch_from_source(torch.zeros(3, D), torch.ones(3, dtype=torch.int64),
                                     torch.zeros(3, dtype=torch.int64), group=handle.group, num_local_experts_max=1,
                                     capacity=2, receivers=tuple(range(1, world_size)))
            with pytest.raises(DispatchError, match="other than 0"):
                dispatch_from_source(torch.zeros(0, D), torch.ones(0, dtype=torch.int64),
                                     torch.zeros(0, dtype=torch.int64), group=handle.group, num_local_experts_max=1,
                                     capacity=2, receivers=(0, 1))
    finally:
        handle.destroy()


@pytest.mark.timeout(120)
@pytest.mark.parametrize("world_size", [2, 4])
def test_single_collective_dispatch_matches_dispatch(world_size: int) -> None:
    _spawn(_rank_main, world_size)


def test_one_receiver_always_takes_the_single_collective():
    assert fixed_capacity_rows(num_tokens=4096, top_k=2, row_bytes=4096, num_receivers=1, max_padded_bytes=1) == 8192


def test_several_receivers_take_it_while_the_padding_is_small():
    small = {"top_k": 2, "row_bytes": 4096, "num_receivers": 2, "max_padded_bytes": 1 << 20}
    assert fixed_capacity_rows(num_tokens=64, **small) == 128  # 2 x 128 rows x 4 KiB = 1 MiB
    assert fixed_capacity_rows(num_tokens=65, **small) is None


def test_zero_bytes_or_no_tokens_never_take_it():
    assert fixed_capacity_rows(num_tokens=8, top_k=2, row_bytes=64, num_receivers=1, max_padded_bytes=0) is None
    assert fixed_capacity_rows(num_tokens=0, top_k=2, row_bytes=64, num_receivers=1, max_padded_bytes=1 << 20) is None
