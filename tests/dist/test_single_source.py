"""The single-collective dispatch on real gloo ranks: one collective, and exactly what the split-size
exchange delivers.

Rank 0, the attention rank, sends rank-encoded rows to the expert ranks (one of them idle when there are
three) with `send_from_source` and a capacity; the expert ranks receive them with `dispatch_step` at the
same capacity, and each side is checked against the Python oracle of tests/dist/test_dispatch_combine.py
(the one the split-size path is held to), then `combine` brings the rows back. The policy
(`fixed_capacity_rows`) is pure and only the sender runs it: an expert rank takes each step's capacity
from the step header, whatever it is.
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
    _check_dispatch_combine,
    _count_collectives,
    _join,
    _spawn,
)
from workers.comm import DispatchError, dispatch_step, fixed_capacity_rows, send_from_source
from workers.config import ParallelConfig
from workers.model.experts import LayerExperts, weight_and_sum
from workers.model.reference_moe import reference_moe
from workers.model.router import route
from workers.model.weights import ExpertShard
from workers.runtime.expert_rank import ExpertRank
from workers.runtime.step_header import Command, StepHeader, exchange_headers


def _scenarios(world_size: int) -> list[Scenario]:
    workers = world_size - 1
    base, extra = divmod(8, workers)
    experts = (0, *(base + (w < extra) for w in range(workers)))
    idle_worker = (2,) if world_size >= 4 else ()
    routed_to = tuple(r for r in range(1, world_size) if r not in idle_worker)
    decode = Scenario(name="decode-like", seed=11, experts_per_rank=experts,
                      rows_per_rank=(64, *(0 for _ in range(workers))), routed_to=routed_to)
    return [
        decode,
        replace(decode, name="float32, few rows", seed=12, rows_per_rank=(5, *decode.rows_per_rank[1:]),
                dtype=torch.float32),
        replace(decode, name="bfloat16 (2-byte rows)", seed=13, dtype=torch.bfloat16),
        replace(decode, name="no rows at all", seed=14, rows_per_rank=(0, *decode.rows_per_rank[1:])),
    ]


def _check_rejected(rank: int, group: dist.ProcessGroup) -> None:
    """Rejected before any collective, so the other ranks need not take part."""
    world_size = dist.get_world_size(group)
    no_ids_N = torch.zeros(0, dtype=torch.int64)
    if rank == 0:
        with pytest.raises(DispatchError, match="more than the step's capacity of 2"):
            send_from_source(torch.zeros(3, D), torch.ones(3, dtype=torch.int64), torch.zeros(3, dtype=torch.int64),
                             group=group, num_local_experts_max=1, capacity=2, receivers=tuple(range(1, world_size)))
        with pytest.raises(DispatchError, match="other than 0"):
            send_from_source(torch.zeros(0, D), no_ids_N, no_ids_N, group=group, num_local_experts_max=1, capacity=2,
                             receivers=(0, 1))
    else:  # a receiver told the source is a receiver too
        with pytest.raises(DispatchError, match="other than 0"):
            dispatch_step(torch.zeros(0, D), no_ids_N, no_ids_N, group=group, num_local_experts_max=1, capacity=2,
                          receivers=(0, *range(1, world_size)))


def _rank_main(rank: int, world_size: int, port: int) -> None:
    handle = _join(rank, world_size, port, GROUP_TIMEOUT_S)
    try:
        for scenario in _scenarios(world_size):
            exact = scenario.rows_per_rank[0]
            for capacity in {max(exact, 1), exact + 7}:  # no padding, and padding after the real rows
                _check_dispatch_combine(scenario, rank, handle.group, capacity)
        _check_rejected(rank, handle.group)
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
    assert fixed_capacity_rows(num_tokens=65, **small) == 0


def test_zero_bytes_or_no_tokens_never_take_it():
    assert fixed_capacity_rows(num_tokens=8, top_k=2, row_bytes=64, num_receivers=1, max_padded_bytes=0) == 0
    assert fixed_capacity_rows(num_tokens=0, top_k=2, row_bytes=64, num_receivers=1, max_padded_bytes=1 << 20) == 0


# ---- the step header's capacity drives the expert ranks ----

CPU = torch.device("cpu")
TOKENS, TOP_K, WIDTH, FFN, EXPERTS, LAYERS = 5, 2, 8, 12, 8, 2
# T*K = 10 rows a step. 13: more room than the rows need, a capacity `fixed_capacity_rows` never gives;
# 0: split sizes first, though the step is small enough for one collective; 10: the rows exactly.
HEADER_CAPACITIES = (13, 0, 10)


def _layer_experts(layer: int) -> LayerExperts:
    gen = torch.Generator().manual_seed(50 + layer)
    return LayerExperts(w13_e2FD=torch.randn(EXPERTS, 2 * FFN, WIDTH, generator=gen) * 0.3,
                        w2_eDF=torch.randn(EXPERTS, WIDTH, FFN, generator=gen) * 0.3)


def _drive_steps(group: dist.ProcessGroup, parallel: ParallelConfig, layers: list[LayerExperts]) -> None:
    """Rank 0: one step per header capacity, each layer checked against the reference loop, then STOP."""
    rank_of_expert_E = torch.tensor(parallel.rank_of_expert)
    local_index_E = torch.tensor(parallel.local_index_of_expert)
    gen = torch.Generator().manual_seed(7)
    for capacity in HEADER_CAPACITIES:
        header = StepHeader(command=Command.STEP, num_tokens=TOKENS, capacities=(capacity,))
        exchange_headers(header, group=group, device=CPU, num_coordinators=1)
        for layer, experts in enumerate(layers):
            x_TD = torch.randn(TOKENS, WIDTH, generator=gen)
            weights_TK, ids_TK = route(x_TD, torch.randn(EXPERTS, WIDTH, generator=gen), TOP_K)
            ids_N = ids_TK.reshape(-1)
            rows = send_from_source(
                x_TD.repeat_interleave(TOP_K, dim=0), rank_of_expert_E[ids_N], local_index_E[ids_N], group=group,
                num_local_experts_max=parallel.max_local_experts, capacity=capacity,
                receivers=tuple(range(1, parallel.world_size)),
            )
            y_TD = weight_and_sum(rows.wait(), weights_TK)
            torch.testing.assert_close(y_TD, reference_moe(x_TD, weights_TK, ids_TK, experts), rtol=1e-5, atol=1e-5,
                                       msg=lambda m, c=capacity, la=layer: f"capacity {c}, layer {la}: {m}")
    exchange_headers(StepHeader(command=Command.STOP), group=group, device=CPU, num_coordinators=1)


def _header_main(rank: int, world_size: int, port: int) -> None:
    handle = _join(rank, world_size, port, GROUP_TIMEOUT_S)
    try:
        parallel = ParallelConfig.contiguous(num_experts=EXPERTS, num_workers=world_size - 1)
        layers = [_layer_experts(layer) for layer in range(LAYERS)]
        if rank == 0:
            _drive_steps(handle.group, parallel, layers)
            return
        mine = parallel.experts_of_worker(rank - 1)
        shard = ExpertShard(expert_ids=mine, tensor_names=(), layers=tuple(
            LayerExperts(w13_e2FD=e.w13_e2FD[list(mine)], w2_eDF=e.w2_eDF[list(mine)]) for e in layers
        ))
        expert_rank = ExpertRank(shard, group=handle.group, device=CPU, max_local_experts=parallel.max_local_experts,
                                 hidden_size=WIDTH, num_coordinators=1, num_experts=parallel.num_experts)
        with _count_collectives() as calls:
            expert_rank.run()
        # per layer: a one-collective dispatch (capacity > 0) or split sizes + rows (0), then the combine
        expected = LAYERS * sum(2 if capacity else 3 for capacity in HEADER_CAPACITIES)
        assert calls["all_to_all_single"] == expected, f"rank {rank}: {calls}, expected {expected} all_to_all_single"
        assert expert_rank.steps == len(HEADER_CAPACITIES)
    finally:
        handle.destroy()


@pytest.mark.timeout(120)
@pytest.mark.parametrize("world_size", [2, 3])
def test_expert_ranks_follow_the_capacity_the_header_carries(world_size: int) -> None:
    _spawn(_header_main, world_size)
