"""The dispatcher's split of a replicated expert's rows (workers.runtime.replicas): deterministic, balanced by
count within a micro-batch, rotated by the caller's rotation, and every row sent to a copy of its own expert."""

from __future__ import annotations

import pytest
import torch

from cluster.gateway.metrics import GatewayMetrics
from workers.config import ParallelConfig
from workers.runtime.replicas import ReplicaTable, occurrence_index, replica_of_rows

CPU = torch.device("cpu")


def test_occurrence_counts_earlier_rows_of_the_same_expert():
    ids_N = torch.tensor([3, 1, 3, 3, 0, 1])
    assert occurrence_index(ids_N, 4).tolist() == [0, 0, 1, 2, 0, 1]
    assert occurrence_index(torch.empty(0, dtype=torch.int64), 4).tolist() == []


def test_rows_are_dealt_out_in_turn():
    ids_N = torch.tensor([0, 1, 0, 0, 2, 0, 1])
    copies_E = torch.tensor([2, 3, 1])
    assert replica_of_rows(ids_N, copies_E, rotation=0).tolist() == [0, 0, 1, 0, 0, 1, 1]
    assert replica_of_rows(ids_N, copies_E, rotation=1).tolist() == [1, 1, 0, 1, 0, 0, 2]


@pytest.mark.parametrize("rotation", [0, 1, 5])
@pytest.mark.parametrize("seed", range(4))
def test_split_is_deterministic_and_balanced(seed: int, rotation: int):
    gen = torch.Generator().manual_seed(seed)
    copies_E = torch.randint(1, 4, (8,), generator=gen)
    ids_N = torch.randint(0, 8, (257,), generator=gen)
    replica_N = replica_of_rows(ids_N, copies_E, rotation=rotation)
    assert torch.equal(replica_N, replica_of_rows(ids_N.clone(), copies_E, rotation=rotation))
    for expert in range(8):
        mine = replica_N[ids_N == expert]
        counts = torch.bincount(mine, minlength=int(copies_E[expert])).tolist()
        assert len(counts) == copies_E[expert], f"expert {expert} sent rows to copies {counts} of {copies_E[expert]}"
        assert max(counts) - min(counts) <= 1, f"expert {expert}: rows per copy {counts}"


def test_a_single_row_moves_between_copies_with_the_rotation():
    ids_N, copies_E = torch.tensor([5]), torch.tensor([1] * 5 + [2])
    assert [int(replica_of_rows(ids_N, copies_E, rotation=r)[0]) for r in range(4)] == [0, 1, 0, 1]


@pytest.mark.parametrize(
    ("num_workers", "redundant", "coordinators"), [(4, 2, 1), (3, 1, 2), (4, 8, 2), (12, 4, 1), (2, 0, 1)]
)
def test_every_row_goes_to_a_copy_of_its_expert(num_workers: int, redundant: int, coordinators: int):
    parallel = ParallelConfig.contiguous(num_experts=8, num_workers=num_workers, redundant_experts=redundant,
                                         num_coordinators=coordinators)
    table = ReplicaTable.from_parallel(parallel, CPU)
    assert table.replicated == bool(redundant)
    ids_N = torch.randint(0, 8, (300,), generator=torch.Generator().manual_seed(num_workers))
    rank_N, local_N = table.destinations(ids_N, rotation=3)
    held = {}  # (rank, local index) -> expert
    for w in range(num_workers):
        for local, expert in enumerate(parallel.experts_of_worker(w)):
            held[(w + coordinators, local)] = expert
    assert [held[(r, j)] for r, j in zip(rank_N.tolist(), local_N.tolist(), strict=True)] == ids_N.tolist()
    for expert, ranks in enumerate(parallel.replica_ranks):  # every copy of every expert got rows
        assert set(rank_N[ids_N == expert].tolist()) == set(ranks)
    if not redundant:
        assert rank_N.tolist() == [parallel.rank_of_expert[e] for e in ids_N.tolist()]
        assert local_N.tolist() == [parallel.local_index_of_expert[e] for e in ids_N.tolist()]


def _copy_rows(metrics: GatewayMetrics, layer: int, expert: int, worker: int) -> float | None:
    labels = {"layer": str(layer), "expert": str(expert), "worker": str(worker)}
    return metrics.registry.get_sample_value("mixserve_expert_replica_rows_total", labels)


def test_per_copy_rows_per_worker_rows_and_the_imbalance_come_from_the_workers_own_counts():
    """Expert 0 has copies on workers 0 and 1; worker 0 holds experts (0, 2), worker 1 (0, 1): each reports rows
    [layer][expert] for the experts it holds."""
    metrics = GatewayMetrics(num_layers=2, num_experts=3, num_workers=2)

    def imbalance(layer: int) -> float | None:
        return metrics.registry.get_sample_value("mixserve_expert_worker_imbalance_ratio", {"layer": str(layer)})

    def worker_rows(worker: int) -> float | None:
        return metrics.registry.get_sample_value("mixserve_worker_routed_tokens_total", {"worker": str(worker)})

    metrics.set_worker_rows([[[3, 0, 1], [2, 0, 2]], [[4, 4, 0], [2, 2, 0]]])
    assert [_copy_rows(metrics, 0, e, w) for e, w in ((0, 0), (2, 0), (0, 1), (1, 1))] == [3, 1, 4, 4]
    assert _copy_rows(metrics, 0, 1, 0) is None  # no series for a copy that never ran rows
    assert imbalance(0) == pytest.approx(8 * 2 / 12) and imbalance(1) == pytest.approx(1.0)
    assert (worker_rows(0), worker_rows(1)) == (8, 12)
    metrics.set_worker_rows([[[3, 0, 1], [2, 0, 2]], [[4, 10, 0], [2, 2, 0]]])  # only worker 1 gained, in layer 0
    assert _copy_rows(metrics, 0, 1, 1) == 10 and imbalance(0) == pytest.approx(2.0)
    assert imbalance(1) == pytest.approx(1.0) and worker_rows(1) == 18
    metrics.set_worker_rows([[[3, 0, 1], [2, 0, 2]], [[1, 0, 0], [0, 0, 0]]])  # worker 1 replaced: counts from zero
    assert _copy_rows(metrics, 0, 0, 1) == 5 and worker_rows(1) == 19


def test_rows_after_a_move_count_for_the_copy_that_ran_them():
    """Worker 0 held expert 0 and then (after a move) expert 1: its reading keeps both, each copy's series grows
    only while the worker holds it."""
    metrics = GatewayMetrics(num_layers=1, num_experts=2, num_workers=1)
    metrics.set_worker_rows([[[5, 0]]])
    metrics.set_worker_rows([[[5, 7]]])
    assert (_copy_rows(metrics, 0, 0, 0), _copy_rows(metrics, 0, 1, 0)) == (5, 7)
