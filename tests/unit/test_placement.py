"""Expert placement lives in `ParallelConfig`: contiguous blocks, local indices, ranks, and validation errors
that name the field."""

from __future__ import annotations

import dataclasses

import pytest

from workers.config import ConfigError, ParallelConfig


def _blocks(parallel: ParallelConfig) -> list[tuple[int, ...]]:
    return [parallel.experts_of_worker(w) for w in range(parallel.num_workers)]


def test_contiguous_even_split() -> None:
    parallel = ParallelConfig.contiguous(num_experts=8, num_workers=4)
    assert _blocks(parallel) == [(0, 1), (2, 3), (4, 5), (6, 7)]
    assert parallel.worker_of_expert == (0, 0, 1, 1, 2, 2, 3, 3)
    assert parallel.local_index_of_expert == (0, 1, 0, 1, 0, 1, 0, 1)
    assert parallel.rank_of_expert == (1, 1, 2, 2, 3, 3, 4, 4)
    assert (parallel.num_experts, parallel.num_workers, parallel.world_size) == (8, 4, 5)
    assert parallel.max_local_experts == 2


def test_contiguous_uneven_split_puts_the_extra_experts_first() -> None:
    parallel = ParallelConfig.contiguous(num_experts=8, num_workers=3)
    assert _blocks(parallel) == [(0, 1, 2), (3, 4, 5), (6, 7)]
    assert parallel.local_index_of_expert == (0, 1, 2, 0, 1, 2, 0, 1)
    assert parallel.max_local_experts == 3


@pytest.mark.parametrize(
    ("num_experts", "num_workers"), [(1, 1), (5, 2), (5, 3), (5, 5), (8, 3), (8, 5), (13, 2), (13, 5)]
)
def test_contiguous_blocks_cover_all_experts_evenly(num_experts: int, num_workers: int) -> None:
    parallel = ParallelConfig.contiguous(num_experts=num_experts, num_workers=num_workers)
    blocks = _blocks(parallel)
    assert [e for block in blocks for e in block] == list(range(num_experts))
    sizes = [len(block) for block in blocks]
    assert max(sizes) - min(sizes) <= 1
    assert sizes == sorted(sizes, reverse=True)
    assert parallel.num_workers == num_workers


def test_single_worker_holds_everything() -> None:
    parallel = ParallelConfig.contiguous(num_experts=8, num_workers=1)
    assert parallel.experts_of_worker(0) == tuple(range(8))
    assert parallel.local_index_of_expert == tuple(range(8))
    assert parallel.max_local_experts == 8


def test_contiguous_passes_the_other_fields_on() -> None:
    parallel = ParallelConfig.contiguous(num_experts=4, num_workers=2, collective_timeout_s=5.0,
                                         single_collective_max_bytes=0)
    assert (parallel.collective_timeout_s, parallel.single_collective_max_bytes) == (5.0, 0)


def test_explicit_placement_sorts_experts_per_worker() -> None:
    parallel = ParallelConfig(worker_of_expert=(1, 0, 1, 0))
    assert _blocks(parallel) == [(1, 3), (0, 2)]
    assert parallel.local_index_of_expert == (0, 0, 1, 1)


def test_placement_is_frozen_and_hashable() -> None:
    parallel = ParallelConfig.contiguous(num_experts=8, num_workers=2)
    with pytest.raises(dataclasses.FrozenInstanceError):
        parallel.worker_of_expert = (0,)  # type: ignore[misc]
    assert parallel == ParallelConfig.contiguous(num_experts=8, num_workers=2)
    assert hash(parallel) == hash(ParallelConfig.contiguous(num_experts=8, num_workers=2))


@pytest.mark.parametrize(
    ("worker_of_expert", "message"),
    [
        ((0, 1, 2, 5), r"worker_of_expert: workers \[3, 4\] of 0..5 hold no experts"),
        ((0, 1, -1, 0), "worker_of_expert: expert 2 is assigned to worker -1"),
        ((0, 1, True, 0), "worker_of_expert: expert 2 is assigned to worker True"),
        ((0, 0, 2, 2), r"workers \[1\] of 0..2 hold no experts"),
        ((), "worker_of_expert is empty"),
        ([0, 0], "worker_of_expert must be a tuple, got list"),
    ],
)
def test_invalid_placements_name_the_conflict(worker_of_expert: tuple[int, ...], message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        ParallelConfig(worker_of_expert=worker_of_expert)


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"collective_timeout_s": 0.0}, "collective_timeout_s must be positive"),
        ({"single_collective_max_bytes": -1}, "single_collective_max_bytes must be >= 0"),
    ],
)
def test_invalid_settings_name_the_field(change: dict, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        ParallelConfig(worker_of_expert=(0, 1), **change)


@pytest.mark.parametrize(
    ("num_experts", "num_workers", "message"),
    [
        (8, 9, r"num_workers \(9\) exceeds num_experts \(8\): every worker must hold at least one expert"),
        (0, 1, "num_experts must be a positive integer"),
        (2, 0, "num_workers must be a positive integer"),
    ],
)
def test_contiguous_rejects_impossible_counts(num_experts: int, num_workers: int, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        ParallelConfig.contiguous(num_experts=num_experts, num_workers=num_workers)


def test_worker_out_of_range_is_a_value_error() -> None:
    assert issubclass(ConfigError, ValueError)
    with pytest.raises(ConfigError, match=r"worker 3 is out of range \[0, 3\)"):
        ParallelConfig.contiguous(num_experts=8, num_workers=3).experts_of_worker(3)
