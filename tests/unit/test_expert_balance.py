"""The expert load balancer's policy: routing profiles on disk, the sliding load window over cumulative counters,
the predicted cost of a placement, and planned placements that stay valid (same workers, same copies per worker,
every expert held, no worker holding an expert twice) whatever the loads."""

from __future__ import annotations

import itertools
import json
import random
from pathlib import Path

import pytest

from cluster.expert_balance import (
    LoadWindow,
    Proposal,
    RoutingProfile,
    RoutingProfileError,
    _assign_copies,
    _completable,
    moved_copies,
    placement_cost,
    plan_placement,
    propose,
)
from workers.config import ParallelConfig


def _blocks(parallel: ParallelConfig) -> list[set[int]]:
    return [set(parallel.experts_of_worker(w)) for w in range(parallel.num_workers)]


def _random_placement(rng: random.Random, num_experts: int, num_workers: int) -> ParallelConfig:
    """Any valid placement, slot counts as uneven as chance makes them."""
    held_W: list[set[int]] = [{rng.randrange(num_experts)} for _ in range(num_workers)]
    for expert in range(num_experts):
        if not any(expert in held for held in held_W):
            held_W[rng.randrange(num_workers)].add(expert)
    for _ in range(rng.randrange(num_experts * num_workers)):
        held_W[rng.randrange(num_workers)].add(rng.randrange(num_experts))
    workers_E = [[w for w, held in enumerate(held_W) if e in held] for e in range(num_experts)]
    return ParallelConfig(
        worker_of_expert=tuple(ws[0] for ws in workers_E),
        redundant_copies=tuple((e, w) for e, ws in enumerate(workers_E) for w in ws[1:]),
    )


def _random_loads(rng: random.Random, num_layers: int, num_experts: int) -> list[list[int]]:
    hot = rng.sample(range(num_experts), rng.randint(0, num_experts))
    return [
        [rng.randrange(1000) * (50 if e in hot else 1) * rng.randint(0, 1) for e in range(num_experts)]
        for _ in range(num_layers)
    ]


def _assert_valid_plan(planned: ParallelConfig, current: ParallelConfig) -> None:
    assert planned.num_workers == current.num_workers
    assert [len(b) for b in _blocks(planned)] == [len(b) for b in _blocks(current)]
    assert sum(planned.copies_of_expert) == sum(current.copies_of_expert)
    assert all(c >= 1 for c in planned.copies_of_expert)
    assert planned.redundant_copies == tuple(sorted(planned.redundant_copies)) or planned is current
    for field in ("num_coordinators", "collective_timeout_s", "single_collective_max_bytes"):
        assert getattr(planned, field) == getattr(current, field)


# routing profiles


def test_profile_round_trips_through_json(tmp_path: Path) -> None:
    profile = RoutingProfile.from_rows([[1, 2, 0], [0, 0, 7]])
    assert (profile.num_layers, profile.num_experts, profile.total) == (2, 3, 10)
    path = tmp_path / "profile.json"
    profile.save(path)
    document = json.loads(path.read_text())
    assert document == {
        "format": "mixserve-routing-profile", "version": 1, "num_layers": 2, "num_experts": 3,
        "rows": [[1, 2, 0], [0, 0, 7]],
    }
    assert RoutingProfile.load(path, num_layers=2, num_experts=3) == profile
    assert [p.name for p in tmp_path.iterdir()] == ["profile.json"]  # no temporary file left behind
    profile.save(path)  # over an existing one
    assert RoutingProfile.load(path, num_layers=2, num_experts=3).rows_LE == ((1, 2, 0), (0, 0, 7))


def _document(**changes: object) -> dict[str, object]:
    return {"format": "mixserve-routing-profile", "version": 1, "num_layers": 2, "num_experts": 2,
            "rows": [[1, 2], [3, 4]]} | changes


@pytest.mark.parametrize(
    ("content", "message"),
    [
        ("{not json", "is not valid JSON"),
        (json.dumps([1, 2]), "has format 'list', expected 'mixserve-routing-profile'"),
        (json.dumps(_document(format="eplb")), "has format 'eplb', expected 'mixserve-routing-profile'"),
        (json.dumps(_document(version=2)), "has version 2, this build reads 1"),
        (json.dumps(_document(num_layers=3, num_experts=2, rows=[[1, 2]] * 3)),
         "is 3 layers x 2 experts, the model is 2 layers x 2 experts"),
        (json.dumps(_document(num_experts=3)), "header says 2 layers x 3 experts, its rows are 2 x 2"),
        (json.dumps(_document(rows=[[1, 2.5], [3, 4]])), "rows[0][1] is 2.5, not an integer count >= 0"),
        (json.dumps(_document(rows=[[1, 2], ["3", 4]])), "rows[1][0] is '3', not an integer count >= 0"),
        (json.dumps(_document(rows=[[1, True], [3, 4]])), "rows[0][1] is True, not an integer count >= 0"),
        (json.dumps(_document(rows=[[1, 2], [3, -4]])), "rows[1][1] is -4, not an integer count >= 0"),
        (json.dumps(_document(rows=[[0, 0], [0, 0]])), "no rows were routed (every count is 0)"),
        (json.dumps(_document(rows="many")), "rows must be a non-empty list"),
    ],
)
def test_a_bad_profile_names_its_path_and_problem(tmp_path: Path, content: str, message: str) -> None:
    path = tmp_path / "profile.json"
    path.write_text(content)
    with pytest.raises(RoutingProfileError) as info:
        RoutingProfile.load(path, num_layers=2, num_experts=2)
    assert str(path) in str(info.value)
    assert message in str(info.value)


def test_a_missing_or_unreadable_profile_names_its_path(tmp_path: Path) -> None:
    with pytest.raises(RoutingProfileError, match=r"routing profile .*absent\.json does not exist"):
        RoutingProfile.load(tmp_path / "absent.json", num_layers=1, num_experts=1)
    with pytest.raises(RoutingProfileError, match=rf"routing profile {tmp_path} cannot be read"):
        RoutingProfile.load(tmp_path, num_layers=1, num_experts=1)  # a directory


def test_from_rows_checks_like_load() -> None:
    with pytest.raises(RoutingProfileError, match=r"rows\[1\] has 1 experts, rows\[0\] has 2"):
        RoutingProfile.from_rows([[1, 2], [3]])
    with pytest.raises(RoutingProfileError, match="non-empty"):
        RoutingProfile.from_rows([])
    with pytest.raises(RoutingProfileError, match=r"rows\[0\]\[0\] is -1"):
        RoutingProfile.from_rows([[-1, 2]])
    with pytest.raises(RoutingProfileError, match="every count is 0"):
        RoutingProfile.from_rows([[0, 0]])
    with pytest.raises(RoutingProfileError, match="tuple of tuples"):
        RoutingProfile(rows_LE=[[1]])  # type: ignore[arg-type]


# the load window


def test_window_subtracts_the_oldest_reading_within_it() -> None:
    window = LoadWindow(max_window_s=60)
    assert window.rows(10) is None
    window.add(0.0, [[0, 0], [0, 0]])
    assert window.rows(10) is None  # one reading
    window.add(5.0, [[1, 2], [3, 4]])
    window.add(10.0, [[5, 2], [3, 10]])
    assert window.rows(10) == [[5, 2], [3, 10]]  # 10 - 0
    assert window.rows(7) == [[4, 0], [0, 6]]  # from t=5 on
    assert window.rows(4) is None  # only the newest reading within 4 s
    window.add(12.0, ((6, 2), (3, 10)))
    assert window.rows(4) == [[1, 0], [0, 0]]


def test_window_keeps_only_readings_it_can_use() -> None:
    window = LoadWindow(max_window_s=10)
    for t in range(1000):
        window.add(float(t), [[t, 2 * t]])
    assert len(window) == 11  # t = 989 .. 999
    assert window.rows(10) == [[10, 20]]
    with pytest.raises(ValueError, match="window_s"):
        window.rows(11)


def test_window_restarts_at_a_counter_reset_or_a_new_shape() -> None:
    window = LoadWindow(max_window_s=60)
    window.add(0.0, [[10, 10]])
    window.add(1.0, [[20, 10]])
    window.add(2.0, [[25, 9]])  # expert 1's worker was replaced: its counter restarted
    assert window.rows(60) is None
    window.add(3.0, [[30, 19]])
    assert window.rows(60) == [[5, 10]]
    window.add(4.0, [[30, 19], [0, 0]])  # another layer
    assert len(window) == 1 and window.rows(60) is None
    with pytest.raises(ValueError, match="older than"):
        window.add(3.5, [[30, 19], [0, 0]])
    window.clear()
    assert len(window) == 0


# the predicted cost


def test_all_rows_on_one_workers_experts_cost_the_worker_count() -> None:
    contiguous = ParallelConfig.contiguous(num_experts=8, num_workers=4)  # [0,1] [2,3] [4,5] [6,7]
    loads_LE = [[0, 0, 100, 100, 0, 0, 0, 0]]
    assert placement_cost(loads_LE, contiguous) == 4.0
    spread = ParallelConfig(worker_of_expert=(0, 1, 0, 1, 2, 3, 2, 3), redundant_copies=((2, 2), (3, 3)))
    assert _blocks(spread) == [{0, 2}, {1, 3}, {2, 4, 6}, {3, 5, 7}]
    assert placement_cost(loads_LE, spread) == 1.0  # 50 rows on each worker
    half = ParallelConfig.contiguous(num_experts=8, num_workers=4, redundant_experts=4)  # 2 and 3 on workers 1, 3
    assert placement_cost(loads_LE, half) == 2.0


def test_cost_sums_layers_and_skips_empty_ones() -> None:
    parallel = ParallelConfig.contiguous(num_experts=8, num_workers=4)
    loads_LE = [[100, 0, 0, 0, 0, 0, 0, 0], [10] * 8, [0] * 8]
    assert placement_cost(loads_LE, parallel) == pytest.approx((100 + 20) / (25 + 20))
    assert placement_cost([[10] * 8], parallel) == 1.0
    assert placement_cost([[0] * 8, [0] * 8], parallel) == 1.0
    assert placement_cost([[7] * 8], ParallelConfig.contiguous(num_experts=8, num_workers=3)) == pytest.approx(
        21 / (56 / 3)
    )


def test_loads_that_do_not_fit_the_placement_are_refused() -> None:
    parallel = ParallelConfig.contiguous(num_experts=4, num_workers=2)
    with pytest.raises(RoutingProfileError, match=r"loads_LE\[1\] has 3 experts, the placement has 4"):
        placement_cost([[1, 2, 3, 4], [1, 2, 3]], parallel)
    with pytest.raises(RoutingProfileError, match=r"loads_LE\[0\]\[2\] is -3"):
        plan_placement([[1, 2, -3, 4]], parallel)


# planning


def test_plans_are_valid_for_any_loads_on_contiguous_placements() -> None:
    rng = random.Random(1234)
    checked = 0
    for num_workers in range(1, 9):
        for num_experts in range(2, 9):
            for redundant in range(max(0, num_workers - num_experts), num_experts * (num_workers - 1) + 1):
                current = ParallelConfig.contiguous(
                    num_experts=num_experts, num_workers=num_workers, redundant_experts=redundant,
                    num_coordinators=2, collective_timeout_s=7.5, single_collective_max_bytes=123,
                )
                loads_LE = _random_loads(rng, rng.randint(1, 3), num_experts)
                planned = plan_placement(loads_LE, current)
                _assert_valid_plan(planned, current)
                assert placement_cost(loads_LE, planned) <= placement_cost(loads_LE, current)
                checked += 1
    assert checked > 500


def test_plans_are_valid_on_uneven_placements() -> None:
    rng = random.Random(99)
    for _ in range(400):
        current = _random_placement(rng, rng.randint(1, 7), rng.randint(1, 6))
        loads_LE = _random_loads(rng, 2, current.num_experts)
        planned = plan_placement(loads_LE, current)
        _assert_valid_plan(planned, current)
        assert placement_cost(loads_LE, planned) <= placement_cost(loads_LE, current)


def test_full_workers_force_copies_of_cold_experts() -> None:
    """Workers 0 and 1 hold every expert, so each needs two copies: the hot expert cannot take them all."""
    current = ParallelConfig(worker_of_expert=(0, 0, 0, 0), redundant_copies=((0, 1), (1, 1), (2, 1), (3, 1), (3, 2)))
    assert [len(b) for b in _blocks(current)] == [4, 4, 1]
    planned = plan_placement([[1000, 0, 0, 0]], current)
    _assert_valid_plan(planned, current)
    assert planned.copies_of_expert == (3, 2, 2, 2)


def test_a_stuck_copy_is_placed_by_moving_others() -> None:
    """Expert 2's second copy finds the only free slot on worker 0, which holds it already: expert 1 moves there
    from worker 1, and the copy takes its place."""
    held_W = _assign_copies([1, 2, 2], [60, 100, 70], [3, 1, 1], [{0, 1, 2}, {1}, {2}])
    assert held_W == [{0, 1, 2}, {2}, {1}]


def test_every_placeable_copy_count_is_placed() -> None:
    """Against brute force over every 0/1 matrix: _completable says exactly which copy counts fit the slots, and
    the assignment places any that do, however it orders them."""
    rng = random.Random(7)
    for num_workers, num_experts in itertools.product(range(1, 4), range(1, 4)):
        fits = {}
        for bits in itertools.product((0, 1), repeat=num_workers * num_experts):
            rows = [bits[w * num_experts:(w + 1) * num_experts] for w in range(num_workers)]
            slots = tuple(map(sum, rows))
            copies = tuple(sum(row[e] for row in rows) for e in range(num_experts))
            if min(slots) >= 1 and min(copies) >= 1:
                fits[slots, copies] = True
        for slots in itertools.product(range(1, num_experts + 1), repeat=num_workers):
            for copies in itertools.product(range(1, num_workers + 1), repeat=num_experts):
                if sum(copies) != sum(slots):
                    continue
                assert _completable(list(copies), 0, list(slots)) == fits.get((slots, copies), False)
                if fits.get((slots, copies)):
                    load_E = [rng.randrange(100) for _ in copies]
                    held_W = _assign_copies(list(copies), load_E, list(slots), [set() for _ in slots])
                    assert list(map(len, held_W)) == list(slots)
                    assert [sum(e in h for h in held_W) for e in range(num_experts)] == list(copies)


def test_skewed_experts_get_more_copies_and_a_lower_cost() -> None:
    current = ParallelConfig.contiguous(num_experts=8, num_workers=4, redundant_experts=4, collective_timeout_s=3.0)
    loads_LE = [[10, 10, 10, 400, 10, 10, 300, 10]] * 4
    planned = plan_placement(loads_LE, current)
    _assert_valid_plan(planned, current)
    assert planned.copies_of_expert[3] >= 2 and planned.copies_of_expert[6] >= 2
    assert planned.copies_of_expert[3] > current.copies_of_expert[3]
    assert placement_cost(loads_LE, planned) < placement_cost(loads_LE, current)
    proposal = propose(loads_LE, current, threshold=0.1)
    assert isinstance(proposal, Proposal)
    assert proposal.parallel == planned
    assert proposal.cost_after == placement_cost(loads_LE, planned) < proposal.cost_before * 0.9
    assert proposal.moved == moved_copies(current, planned) >= 1
    assert propose(loads_LE, current, threshold=0.99) is None


def test_balanced_loads_keep_the_current_placement() -> None:
    uniform_LE = [[100] * 8] * 3
    for redundant in (0, 8, 16, 24):  # every expert equally often
        current = ParallelConfig.contiguous(num_experts=8, num_workers=4, redundant_experts=redundant)
        assert propose(uniform_LE, current, threshold=0.0) is None
        assert plan_placement([[0] * 8] * 3, current) is current
    # experts 0..3 twice: [0,1,2] [3,4,5] [0,6,7] [1,2,3] gives workers 1 and 2 two whole experts each
    uneven = ParallelConfig.contiguous(num_experts=8, num_workers=4, redundant_experts=4)
    proposal = propose(uniform_LE, uneven, threshold=0.1)
    assert proposal is not None and (proposal.cost_before, proposal.cost_after) == (1.25, 1.0)
    current = ParallelConfig.contiguous(num_experts=8, num_workers=4)
    assert plan_placement([[100] * 8], current) is current
    with pytest.raises(ValueError, match="threshold"):
        propose([[100] * 8], current, threshold=1.0)


def test_a_balanced_plan_moves_little() -> None:
    """Experts 0 and 1 each take one worker; the rest stay where they were when they can."""
    current = ParallelConfig.contiguous(num_experts=8, num_workers=4)  # [0,1] [2,3] [4,5] [6,7]
    planned = plan_placement([[300, 300, 50, 50, 50, 50, 50, 50]], current)
    assert placement_cost([[300, 300, 50, 50, 50, 50, 50, 50]], planned) < 2.0
    assert moved_copies(current, planned) <= 4


def test_plans_are_deterministic() -> None:
    rng = random.Random(5)
    for _ in range(50):
        current = _random_placement(rng, rng.randint(2, 8), rng.randint(1, 6))
        loads_LE = _random_loads(rng, 3, current.num_experts)
        assert plan_placement(loads_LE, current) == plan_placement([list(r) for r in loads_LE], current)


def test_moved_copies_counts_what_must_be_loaded() -> None:
    old = ParallelConfig.contiguous(num_experts=4, num_workers=2)  # [0,1] [2,3]
    assert moved_copies(old, old) == 0
    swapped = ParallelConfig(worker_of_expert=(0, 1, 0, 1))  # [0,2] [1,3]
    assert moved_copies(old, swapped) == 2
    replicated = ParallelConfig(worker_of_expert=(0, 0, 1, 1), redundant_copies=((0, 1),))
    assert moved_copies(old, replicated) == 1
    assert moved_copies(replicated, old) == 0
