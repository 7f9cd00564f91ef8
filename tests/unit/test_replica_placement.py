"""Redundant experts in `ParallelConfig`: physical copies spread evenly and deterministically over the workers,
never two copies of one expert on a worker, workers may outnumber experts only with enough copies, and the
replica tables (rank and local index of every copy) agree with what each worker holds."""

from __future__ import annotations

import pytest

from workers.config import ConfigError, ParallelConfig


def _blocks(parallel: ParallelConfig) -> list[tuple[int, ...]]:
    return [parallel.experts_of_worker(w) for w in range(parallel.num_workers)]


def test_two_redundant_experts_on_four_workers() -> None:
    parallel = ParallelConfig.contiguous(num_experts=8, num_workers=4, redundant_experts=2)
    assert _blocks(parallel) == [(0, 1, 2), (3, 4, 5), (6, 7), (0, 1)]
    assert parallel.redundant_copies == ((0, 3), (1, 3))
    assert parallel.workers_of_expert[:3] == ((0, 3), (0, 3), (0,))
    assert parallel.copies_of_expert == (2, 2, 1, 1, 1, 1, 1, 1)
    assert parallel.replica_ranks[:2] == ((1, 4), (1, 4))
    assert parallel.replica_local_indices[:3] == ((0, 0), (1, 1), (2,))
    assert parallel.rank_of_expert == (1, 1, 1, 2, 2, 2, 3, 3)  # the first copies
    assert (parallel.num_workers, parallel.world_size, parallel.max_local_experts) == (4, 5, 3)
    assert parallel.replicated


def test_a_copy_sorts_among_the_workers_own_experts() -> None:
    parallel = ParallelConfig.contiguous(num_experts=8, num_workers=3, redundant_experts=1)
    assert _blocks(parallel) == [(0, 1, 2), (3, 4, 5), (0, 6, 7)]
    assert parallel.workers_of_expert[0] == (0, 2)
    assert parallel.replica_local_indices[0] == (0, 0)
    assert parallel.replica_local_indices[6] == (1,)


def test_as_many_redundant_experts_as_experts_doubles_every_one() -> None:
    parallel = ParallelConfig.contiguous(num_experts=8, num_workers=4, redundant_experts=8)
    assert _blocks(parallel) == [(0, 1, 2, 3), (4, 5, 6, 7), (0, 1, 2, 3), (4, 5, 6, 7)]
    assert parallel.copies_of_expert == (2,) * 8


def test_workers_may_outnumber_experts_with_enough_copies() -> None:
    parallel = ParallelConfig.contiguous(num_experts=8, num_workers=12, redundant_experts=4)
    assert _blocks(parallel) == [(e,) for e in range(8)] + [(0,), (1,), (2,), (3,)]
    assert parallel.workers_of_expert[0] == (0, 8)
    assert parallel.max_local_experts == 1


def test_no_redundant_experts_is_the_plain_contiguous_placement() -> None:
    parallel = ParallelConfig.contiguous(num_experts=8, num_workers=3, redundant_experts=0)
    assert parallel == ParallelConfig(worker_of_expert=(0, 0, 0, 1, 1, 1, 2, 2))
    assert parallel.redundant_copies == () and not parallel.replicated
    assert parallel.workers_of_expert == tuple((w,) for w in parallel.worker_of_expert)


@pytest.mark.parametrize(
    ("num_experts", "num_workers", "redundant"),
    [(8, 2, 1), (8, 2, 8), (8, 3, 1), (8, 3, 5), (8, 3, 16), (8, 4, 2), (8, 4, 8), (8, 4, 24), (8, 5, 3),
     (8, 9, 1), (8, 16, 8), (4, 5, 2), (4, 6, 5), (6, 4, 7), (1, 3, 2), (13, 5, 20)],
)
def test_copies_cover_every_expert_evenly(num_experts: int, num_workers: int, redundant: int) -> None:
    parallel = ParallelConfig.contiguous(num_experts=num_experts, num_workers=num_workers,
                                         redundant_experts=redundant)
    assert parallel.num_workers == num_workers and parallel.num_experts == num_experts
    copies = parallel.copies_of_expert
    assert sum(copies) == num_experts + redundant
    assert min(copies) >= 1 and max(copies) - min(copies) <= 1  # uniform: experts 0.. get the extra copies
    assert list(copies) == sorted(copies, reverse=True)
    for expert, workers in enumerate(parallel.workers_of_expert):
        assert len(set(workers)) == len(workers), f"expert {expert} twice on one worker: {workers}"
        for copy, worker in enumerate(workers):
            local = parallel.replica_local_indices[expert][copy]
            assert parallel.experts_of_worker(worker)[local] == expert
            assert parallel.replica_ranks[expert][copy] == worker + parallel.num_coordinators
    held = [len(parallel.experts_of_worker(w)) for w in range(num_workers)]
    assert sum(held) == num_experts + redundant  # a worker's copies are distinct experts
    assert min(held) >= 1 and max(held) - min(held) <= 1


def test_placement_is_deterministic() -> None:
    first, second = (ParallelConfig.contiguous(num_experts=8, num_workers=3, redundant_experts=5) for _ in range(2))
    assert first == second and hash(first) == hash(second)


@pytest.mark.parametrize(
    ("num_experts", "num_workers", "redundant", "message"),
    [
        (8, 10, 1, r"num_workers \(10\) exceeds num_experts \(8\) \+ redundant_experts \(1\)"),
        (8, 9, 0, r"num_workers \(9\) exceeds num_experts \(8\): every worker must hold at least one expert"),
        (8, 2, 9, r"redundant_experts \(9\) exceeds 8: a worker holds at most one copy of an expert"),
        (8, 1, 1, r"redundant_experts \(1\) exceeds 0"),
        (8, 2, -1, r"redundant_experts must be an integer >= 0, got -1"),
    ],
)
def test_impossible_replica_counts_name_the_conflict(num_experts: int, num_workers: int, redundant: int,
                                                     message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        ParallelConfig.contiguous(num_experts=num_experts, num_workers=num_workers, redundant_experts=redundant)


@pytest.mark.parametrize(
    ("redundant_copies", "message"),
    [
        (((0, 0),), "redundant_copies: worker 0 would hold expert 0 twice"),
        (((2, 1), (2, 1)), "redundant_copies: worker 1 would hold expert 2 twice"),
        (((4, 1),), r"redundant_copies: expert 4 is outside \[0, 4\)"),
        (((0, -1),), r"redundant_copies: \(0, -1\) is not an \(expert, worker\) pair"),
        (((0,),), r"redundant_copies: \(0,\) is not an \(expert, worker\) pair"),
        ([(0, 1)], "redundant_copies must be a tuple, got list"),
        (((0, 3),), r"workers \[2\] of 0..3 hold no experts"),
    ],
)
def test_invalid_redundant_copies_name_the_conflict(redundant_copies, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        ParallelConfig(worker_of_expert=(0, 0, 1, 1), redundant_copies=redundant_copies)


def test_an_explicit_copy_adds_a_worker() -> None:
    parallel = ParallelConfig(worker_of_expert=(0, 0, 1, 1), redundant_copies=((3, 2), (0, 1)))
    assert _blocks(parallel) == [(0, 1), (0, 2, 3), (3,)]
    assert parallel.workers_of_expert == ((0, 1), (0,), (1,), (1, 2))
    assert parallel.replica_local_indices == ((0, 0), (1,), (1,), (2, 0))


def test_on_workers_keeps_exactly_the_survivors_copies_renumbered():
    full = ParallelConfig.contiguous(num_experts=8, num_workers=3, redundant_experts=8, num_coordinators=2)
    group = full.on_workers((0, 2))
    assert (group.num_workers, group.num_coordinators) == (2, 2)
    assert [group.experts_of_worker(i) for i in range(2)] == [full.experts_of_worker(0), full.experts_of_worker(2)]
    # each expert's first copy is its first survivor in replica order; the others follow in order
    assert group.workers_of_expert == ((0,), (0,), (0,), (0, 1), (0, 1), (0, 1), (1,), (1,))
    assert full.on_workers((0, 1, 2)) == full


def test_on_workers_names_the_experts_left_with_no_copy():
    full = ParallelConfig.contiguous(num_experts=8, num_workers=3, redundant_experts=4)  # [0..3], [4..7], [0..3]
    assert full.covered_by([0, 1]) and full.covered_by([1, 2]) and not full.covered_by([0, 2])
    with pytest.raises(ConfigError, match=r"experts \[4, 5, 6, 7\] have no copy on workers \[0, 2\]"):
        full.on_workers((0, 2))
    with pytest.raises(ConfigError, match="not distinct workers"):
        full.on_workers((1, 1))
    with pytest.raises(ConfigError, match="not distinct workers"):
        full.on_workers((3,))
