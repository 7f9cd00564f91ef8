"""Expert-parallel load balancing, the policy only: from rows routed per (layer, expert) it predicts how uneven
a placement makes a step and plans a better one (EPLB-style: replicate hot experts, spread copies greedily).
It moves nothing; the engine loads and drops copies (cluster/ray_engine.py). Pure Python: no Ray, no torch.

The placement is one for every layer (the same experts on the same workers in every layer), so a plan balances
each expert's rows summed over layers, and the cost it predicts sums each layer's busiest worker.

Shape suffixes: L layers, E experts, W expert workers.
"""

from __future__ import annotations

import dataclasses
import heapq
import json
import math
import os
import tempfile
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass
from fractions import Fraction
from pathlib import Path

from workers.config import ParallelConfig

_FORMAT = "mixserve-routing-profile"
_VERSION = 1


class RoutingProfileError(ValueError):
    """A routing profile (or loads handed to the planner) is missing, malformed, or does not fit the model."""


def _count_rows(raw: object, where: str) -> tuple[tuple[int, ...], ...]:
    """Checked [L][E] counts: a non-empty rectangle of ints >= 0, not all zero. `where` prefixes each message."""
    if not isinstance(raw, Sequence) or isinstance(raw, str) or not raw:
        raise RoutingProfileError(f"{where}: rows must be a non-empty list of per-layer lists, got {raw!r:.80}")
    rows_LE = []
    for layer, row in enumerate(raw):
        if not isinstance(row, Sequence) or isinstance(row, str) or not row:
            raise RoutingProfileError(f"{where}: rows[{layer}] must be a non-empty list of counts, got {row!r:.80}")
        if len(row) != len(raw[0]):
            raise RoutingProfileError(
                f"{where}: rows[{layer}] has {len(row)} experts, rows[0] has {len(raw[0])}: rows must be rectangular"
            )
        for expert, count in enumerate(row):
            if not isinstance(count, int) or isinstance(count, bool) or count < 0:
                raise RoutingProfileError(f"{where}: rows[{layer}][{expert}] is {count!r}, not an integer count >= 0")
        rows_LE.append(tuple(row))
    if not any(map(any, rows_LE)):
        raise RoutingProfileError(f"{where}: no rows were routed (every count is 0)")
    return tuple(rows_LE)


@dataclass(frozen=True)
class RoutingProfile:
    """Rows routed to each expert in each layer over some period: what a placement is planned from at start."""

    rows_LE: tuple[tuple[int, ...], ...]

    def __post_init__(self) -> None:
        _count_rows(self.rows_LE, "routing profile")
        if not all(isinstance(row, tuple) for row in (self.rows_LE, *self.rows_LE)):
            raise RoutingProfileError("routing profile: rows_LE must be a tuple of tuples (use from_rows)")

    @property
    def num_layers(self) -> int:
        return len(self.rows_LE)

    @property
    def num_experts(self) -> int:
        return len(self.rows_LE[0])

    @property
    def total(self) -> int:
        return sum(map(sum, self.rows_LE))

    @classmethod
    def from_rows(cls, rows_LE: Sequence[Sequence[int]]) -> RoutingProfile:
        return cls(rows_LE=_count_rows(rows_LE, "routing profile"))

    def save(self, path: str | Path) -> None:
        """Write JSON atomically: a temporary file in the same directory, renamed over `path`."""
        path = Path(path)
        document = {
            "format": _FORMAT, "version": _VERSION, "num_layers": self.num_layers,
            "num_experts": self.num_experts, "rows": [list(row) for row in self.rows_LE],
        }
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
        try:
            with os.fdopen(fd, "w") as f:
                json.dump(document, f)
            os.replace(tmp, path)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise

    @classmethod
    def load(cls, path: str | Path, *, num_layers: int, num_experts: int) -> RoutingProfile:
        """Read a profile saved by `save`, for a model of num_layers x num_experts; RoutingProfileError otherwise."""
        where = f"routing profile {path}"
        try:
            text = Path(path).read_text()
        except FileNotFoundError as exc:
            raise RoutingProfileError(f"{where} does not exist") from exc
        except (OSError, UnicodeDecodeError) as exc:
            raise RoutingProfileError(f"{where} cannot be read: {exc}") from exc
        try:
            document = json.loads(text)
        except json.JSONDecodeError as exc:
            raise RoutingProfileError(f"{where} is not valid JSON: {exc}") from exc
        if not isinstance(document, dict) or document.get("format") != _FORMAT:
            found = document.get("format") if isinstance(document, dict) else type(document).__name__
            raise RoutingProfileError(f"{where} has format {found!r}, expected {_FORMAT!r}")
        if document.get("version") != _VERSION:
            raise RoutingProfileError(f"{where} has version {document.get('version')!r}, this build reads {_VERSION}")
        raw = document.get("rows")
        if isinstance(raw, list) and all(isinstance(row, list) for row in raw):
            shape = (len(raw), len(raw[0]) if raw else 0)
            header = (document.get("num_layers"), document.get("num_experts"))
            if header != shape:
                raise RoutingProfileError(
                    f"{where}: its header says {header[0]} layers x {header[1]} experts, its rows are "
                    f"{shape[0]} x {shape[1]}"
                )
            if shape != (num_layers, num_experts):
                raise RoutingProfileError(
                    f"{where} is {shape[0]} layers x {shape[1]} experts, the model is {num_layers} layers x "
                    f"{num_experts} experts"
                )
        return cls(rows_LE=_count_rows(raw, where))


class LoadWindow:
    """Rows routed per (layer, expert) over the last few seconds, from cumulative counters read now and then.

    Keeps only the readings of the last `max_window_s` seconds, the most any `rows(window_s)` looks back. A
    counter that went down (its worker was replaced) or a change of shape drops every older reading: differences
    across a reset mean nothing.
    """

    def __init__(self, max_window_s: float) -> None:
        if not max_window_s > 0:
            raise ValueError(f"max_window_s must be positive, got {max_window_s!r}")
        self.max_window_s = max_window_s
        self._readings: deque[tuple[float, tuple[tuple[int, ...], ...]]] = deque()

    def __len__(self) -> int:
        return len(self._readings)

    def clear(self) -> None:
        self._readings.clear()

    def add(self, t: float, cumulative_LE: Sequence[Sequence[int]]) -> None:
        reading_LE = tuple(tuple(row) for row in cumulative_LE)
        if self._readings:
            last_t, last_LE = self._readings[-1]
            if t < last_t:
                raise ValueError(f"reading at t={t} is older than the previous one at t={last_t}")
            if _shape(reading_LE) != _shape(last_LE) or any(
                new < old for new_row, old_row in zip(reading_LE, last_LE, strict=True)
                for new, old in zip(new_row, old_row, strict=True)
            ):
                self._readings.clear()
        self._readings.append((t, reading_LE))
        while self._readings[0][0] < t - self.max_window_s:
            self._readings.popleft()

    def rows(self, window_s: float) -> list[list[int]] | None:
        """Rows routed from the oldest reading within `window_s` of the newest to the newest; None with fewer
        than two readings there."""
        if not 0 < window_s <= self.max_window_s:
            raise ValueError(f"window_s must be in (0, {self.max_window_s}] (max_window_s), got {window_s!r}")
        if len(self._readings) < 2:
            return None
        newest_t, newest_LE = self._readings[-1]
        oldest = next(i for i, (t, _) in enumerate(self._readings) if t >= newest_t - window_s)
        if oldest == len(self._readings) - 1:
            return None
        oldest_LE = self._readings[oldest][1]
        return [[new - old for new, old in zip(n, o, strict=True)] for n, o in zip(newest_LE, oldest_LE, strict=True)]


def _shape(rows_LE: tuple[tuple[int, ...], ...]) -> tuple[int, ...]:
    return tuple(map(len, rows_LE))


def _expert_loads(loads_LE: Sequence[Sequence[float]], num_experts: int) -> list[Fraction]:
    """[E] rows summed over layers, exactly; RoutingProfileError if loads_LE does not fit the placement."""
    load_E = [Fraction(0)] * num_experts
    for layer, row in enumerate(loads_LE):
        if len(row) != num_experts:
            raise RoutingProfileError(
                f"loads_LE[{layer}] has {len(row)} experts, the placement has {num_experts}"
            )
        for expert, rows in enumerate(row):
            if isinstance(rows, bool) or not isinstance(rows, int | float) or not 0 <= rows < math.inf:
                raise RoutingProfileError(f"loads_LE[{layer}][{expert}] is {rows!r}, not a row count >= 0")
            load_E[expert] += Fraction(rows)
    return load_E


def placement_cost(loads_LE: Sequence[Sequence[float]], parallel: ParallelConfig) -> float:
    """Predicted step-time imbalance: the sum over layers of the busiest worker's rows over the sum over layers
    of the mean rows per worker, each expert's rows split evenly between its copies. 1.0 is balanced; layers
    without rows count for nothing, and loads without any rows cost 1.0."""
    _expert_loads(loads_LE, parallel.num_experts)
    workers_of_expert = parallel.workers_of_expert
    busiest = total = Fraction(0)
    for row_E in loads_LE:
        rows_W = [Fraction(0)] * parallel.num_workers
        for rows, workers in zip(row_E, workers_of_expert, strict=True):
            for worker in workers:
                rows_W[worker] += Fraction(rows) / len(workers)
        busiest += max(rows_W)
        total += sum(rows_W)
    if not total:
        return 1.0
    return float(busiest / (total / parallel.num_workers))


def _completable(copies_E: list[int], extra: int, slots_W: list[int]) -> bool:
    """Whether `extra` more copies (each expert at most W) can make copies_E placeable on workers of slots_W, no
    worker holding an expert twice. Adding to the fewest-copies experts first is best for every prefix of the
    Gale–Ryser condition at once: the k fullest workers need no more than sum_e min(copies_e, k) copies."""
    filled_E = sorted(copies_E)
    for _ in range(extra):
        heapq.heapreplace(filled_E, filled_E[0] + 1)
    need = 0
    for k, slots in enumerate(sorted(slots_W, reverse=True), start=1):
        need += slots
        if need > sum(min(copies, k) for copies in filled_E):
            return False
    return True


def _copies_per_expert(load_E: list[Fraction], slots_W: list[int]) -> list[int]:
    """One copy each, then every further copy to the expert with the most rows per copy (ties: lower id), at most
    one per worker, skipping an expert whose extra copy would leave no valid placement (uneven slot counts)."""
    num_workers, copies_E = len(slots_W), [1] * len(load_E)
    for extra in range(sum(slots_W) - len(load_E), 0, -1):
        ranked = sorted(
            (e for e, c in enumerate(copies_E) if c < num_workers), key=lambda e: (-load_E[e] / copies_E[e], e)
        )
        for expert in ranked:
            copies_E[expert] += 1
            if _completable(copies_E, extra - 1, slots_W):
                break
            copies_E[expert] -= 1
        else:
            raise AssertionError(f"no placeable copy counts for slots {slots_W} from {copies_E}")
    return copies_E


def _place_by_chain(expert: int, held_W: list[set[int]], slots_W: list[int]) -> None:
    """Place a copy of `expert` when every worker with a free slot holds it already: put it on a full worker
    that lacks it and move one of that worker's experts on, worker to worker, until one lands in a free slot
    (an augmenting path; shortest first). One always exists when a valid placement does."""
    parent: dict[int, tuple[int | None, int]] = {}  # worker -> (worker it takes an expert from, that expert)
    queue = deque()
    for worker in range(len(held_W)):
        if expert not in held_W[worker]:
            parent[worker] = (None, expert)
            queue.append(worker)
    while queue:
        worker = queue.popleft()
        if len(held_W[worker]) < slots_W[worker]:
            break
        for other in sorted(held_W[worker]):
            for target in range(len(held_W)):
                if target not in parent and other not in held_W[target]:
                    parent[target] = (worker, other)
                    queue.append(target)
    else:
        raise AssertionError(f"no placement for another copy of expert {expert} in {held_W} (slots {slots_W})")
    target: int | None = worker
    while target is not None:
        source, moved = parent[target]
        held_W[target].add(moved)
        if source is not None:
            held_W[source].remove(moved)
        target = source


def _assign_copies(
    copies_E: list[int], load_E: list[Fraction], slots_W: list[int], current_W: list[set[int]]
) -> list[set[int]]:
    """[W] expert sets: copies by rows per copy, most first (ties: expert id), each on the least-loaded worker
    with a free slot that lacks the expert (ties: one that holds it now, then the lowest index)."""
    held_W: list[set[int]] = [set() for _ in slots_W]
    assigned_W = [Fraction(0)] * len(slots_W)
    order = sorted(range(len(copies_E)), key=lambda e: (-load_E[e] / copies_E[e], e))
    for expert in order:
        per_copy = load_E[expert] / copies_E[expert]
        for _ in range(copies_E[expert]):
            eligible = [w for w, held in enumerate(held_W) if len(held) < slots_W[w] and expert not in held]
            if eligible:
                worker = min(eligible, key=lambda w: (assigned_W[w], expert not in current_W[w], w))
                held_W[worker].add(expert)
                assigned_W[worker] += per_copy
            else:
                _place_by_chain(expert, held_W, slots_W)
                assigned_W = [sum((load_E[e] / copies_E[e] for e in held), Fraction(0)) for held in held_W]
    return held_W


def _match_current(new_W: list[set[int]], current_W: list[set[int]]) -> list[set[int]]:
    """Permute the new expert sets among workers of equal slot counts so that each overlaps most with what the
    worker holds now (greedy: largest overlap first, ties by current worker then new index)."""
    matched_W: list[set[int]] = [set() for _ in new_W]
    for slots in sorted(set(map(len, current_W))):
        group = [w for w, held in enumerate(current_W) if len(held) == slots]
        pairs = sorted(
            ((len(new_W[i] & current_W[j]), j, i) for i in group for j in group), key=lambda p: (-p[0], p[1], p[2])
        )
        used_new, used_current = set(), set()
        for _, j, i in pairs:
            if i not in used_new and j not in used_current:
                matched_W[j] = new_W[i]
                used_new.add(i)
                used_current.add(j)
    return matched_W


def _parallel_from_sets(held_W: list[set[int]], current: ParallelConfig) -> ParallelConfig:
    """Each expert's first copy on the lowest-index worker that held it before if any, else the lowest; the
    others as sorted (expert, worker) pairs; every other field from `current`."""
    workers_E = [sorted(w for w, held in enumerate(held_W) if e in held) for e in range(current.num_experts)]
    first_E = []
    for expert, workers in enumerate(workers_E):
        before = [w for w in workers if w in current.workers_of_expert[expert]]
        first_E.append((before or workers)[0])
    redundant = sorted((e, w) for e, workers in enumerate(workers_E) for w in workers if w != first_E[e])
    return dataclasses.replace(current, worker_of_expert=tuple(first_E), redundant_copies=tuple(redundant))


def plan_placement(loads_LE: Sequence[Sequence[float]], current: ParallelConfig) -> ParallelConfig:
    """A placement for these loads with current's workers, copies per worker and other fields. Never predicted
    worse than `current`: that is returned when the plan is not better (and for loads without rows)."""
    load_E = _expert_loads(loads_LE, current.num_experts)
    if not any(load_E):
        return current
    current_W = [set(current.experts_of_worker(w)) for w in range(current.num_workers)]
    slots_W = list(map(len, current_W))
    copies_E = _copies_per_expert(load_E, slots_W)
    held_W = _match_current(_assign_copies(copies_E, load_E, slots_W, current_W), current_W)
    assert list(map(len, held_W)) == slots_W, (held_W, slots_W)
    planned = _parallel_from_sets(held_W, current)
    if placement_cost(loads_LE, planned) >= placement_cost(loads_LE, current):
        return current
    return planned


def moved_copies(old: ParallelConfig, new: ParallelConfig) -> int:
    """Copies (expert, worker) that `new` has and `old` has not: the expert weights a move must load."""
    return len(_copy_set(new) - _copy_set(old))


def _copy_set(parallel: ParallelConfig) -> set[tuple[int, int]]:
    return {(e, w) for e, workers in enumerate(parallel.workers_of_expert) for w in workers}


@dataclass(frozen=True, kw_only=True)
class Proposal:
    parallel: ParallelConfig
    cost_before: float  # placement_cost of the current placement
    cost_after: float  # placement_cost of `parallel`
    moved: int  # copies to load (moved_copies)


def propose(loads_LE: Sequence[Sequence[float]], current: ParallelConfig, *, threshold: float) -> Proposal | None:
    """The planned placement if it predicts a cost lower by more than `threshold` (relative, in [0, 1)) and moves
    at least one copy; None when moving is not worth it."""
    if not 0 <= threshold < 1:
        raise ValueError(f"threshold must be in [0, 1), got {threshold!r}")
    planned = plan_placement(loads_LE, current)
    cost_before, cost_after = placement_cost(loads_LE, current), placement_cost(loads_LE, planned)
    moved = moved_copies(current, planned)
    if moved < 1 or not cost_after < cost_before * (1 - threshold):
        return None
    return Proposal(parallel=planned, cost_before=cost_before, cost_after=cost_after, moved=moved)
