"""Expert placement: contiguous and round-robin maps, local indices, and validation errors."""

from __future__ import annotations

import pytest

from cluster.placement import (
    ExpertPlacement,
    PlacementError,
    contiguous_placement,
    round_robin_placement,
)


def _blocks(placement: ExpertPlacement) -> list[tuple[int, ...]]:
    return [placement.experts_of_worker(w) for w in range(placement.num_workers)]


def test_contiguous_even_split() -> None:
    placement = contiguous_placement(8, 4)
    assert _blocks(placement) == [(0, 1), (2, 3), (4, 5), (6, 7)]
    assert placement.worker_of_expert == (0, 0, 1, 1, 2, 2, 3, 3)
    assert placement.local_index_of_expert == (0, 1, 0, 1, 0, 1, 0, 1)
    assert placement.max_local_experts == 2


def test_contiguous_uneven_split_puts_the_extra_experts_first() -> None:
    placement = contiguous_placement(8, 3)
    assert _blocks(placement) == [(0, 1, 2), (3, 4, 5), (6, 7)]
    assert [placement.num_local_experts(w) for w in range(3)] == [3, 3, 2]
    assert placement.local_index_of_expert == (0, 1, 2, 0, 1, 2, 0, 1)
    assert placement.max_local_experts == 3


@pytest.mark.parametrize(
    ("num_experts", "num_workers"), [(1, 1), (5, 2), (5, 3), (5, 5), (8, 3), (8, 5), (13, 2), (13, 5)]
)
def test_contiguous_blocks_cover_all_experts_evenly(num_experts: int, num_workers: int) -> None:
    placement = contiguous_placement(num_experts, num_workers)
    blocks = _blocks(placement)
    assert [e for block in blocks for e in block] == list(range(num_experts))
    sizes = [len(block) for block in blocks]
    assert max(sizes) - min(sizes) <= 1
    assert sizes == sorted(sizes, reverse=True)


def test_single_worker_holds_everything() -> None:
    placement = contiguous_placement(8, 1)
    assert placement.experts_of_worker(0) == tuple(range(8))
    assert placement.local_index_of_expert == tuple(range(8))
    assert placement.max_local_experts == 8


def test_round_robin() -> None:
    placement = round_robin_placement(8, 3)
    assert _blocks(placement) == [(0, 3, 6), (1, 4, 7), (2, 5)]
    assert placement.local_index_of_expert == (0, 0, 0, 1, 1, 1, 2, 2)
    assert placement.max_local_experts == 3


def test_explicit_placement_sorts_experts_per_worker() -> None:
    placement = ExpertPlacement(num_experts=4, num_workers=2, worker_of_expert=(1, 0, 1, 0))
    assert _blocks(placement) == [(1, 3), (0, 2)]
    assert placement.local_index_of_expert == (0, 0, 1, 1)


def test_placement_is_frozen_and_hashable() -> None:
    placement = contiguous_placement(8, 2)
    with pytest.raises(AttributeError):
        placement.num_workers = 3  # type: ignore[misc]
    assert placement == contiguous_placement(8, 2)
    assert hash(placement) == hash(contiguous_placement(8, 2))


@pytest.mark.parametrize(
    ("num_experts", "num_workers", "worker_of_expert", "message"),
    [
        (8, 9, (0,) * 8, r"num_workers \(9\) exceeds num_experts \(8\): every worker must hold"),
        (4, 4, (0, 1, 2, 5), "expert 3 is assigned to worker 5 but num_workers is 4"),
        (4, 2, (0, 1, -1, 0), "expert 2 is assigned to worker -1"),
        (4, 2, (0, 1, 0), "worker_of_expert has 3 entries but num_experts is 4"),
        (4, 3, (0, 0, 2, 2), r"workers \[1\] hold no experts"),
        (0, 1, (), "num_experts must be a positive integer"),
        (2, 0, (0, 0), "num_workers must be a positive integer"),
        (2, 1, [0, 0], "worker_of_expert must be a tuple"),
    ],
)
def test_invalid_placements_name_the_conflict(
    num_experts: int, num_workers: int, worker_of_expert: tuple[int, ...], message: str
) -> None:
    with pytest.raises(PlacementError, match=message):
        ExpertPlacement(num_experts=num_experts, num_workers=num_workers, worker_of_expert=worker_of_expert)


def test_constructors_reject_more_workers_than_experts() -> None:
    with pytest.raises(PlacementError, match=r"num_workers \(9\) exceeds num_experts \(8\)"):
        contiguous_placement(8, 9)
    with pytest.raises(PlacementError, match="every worker must hold at least one expert"):
        round_robin_placement(2, 3)


def test_placement_error_is_a_value_error() -> None:
    assert issubclass(PlacementError, ValueError)
    with pytest.raises(PlacementError, match=r"worker 3 is out of range \[0, 3\)"):
        contiguous_placement(8, 3).experts_of_worker(3)
