"""Expert placement: which expert worker holds which experts.

An `ExpertPlacement` maps every global expert id to one worker (0..num_workers-1) and, within that
worker, to a local index (the position of the expert in the worker's sorted expert list). The same
map applies to every MoE layer. This module knows nothing about ranks, devices or tensors: the
coordinator turns worker indices into process-group ranks, and the expert workers use
`experts_of_worker` to decide which checkpoint tensors to open.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from functools import cached_property


class PlacementError(ValueError):
    """An expert placement is inconsistent (bad counts, out-of-range worker, idle worker)."""


@dataclass(frozen=True, kw_only=True)
class ExpertPlacement:
    num_experts: int
    num_workers: int
    worker_of_expert: tuple[int, ...]

    def __post_init__(self) -> None:
        _check_positive("num_experts", self.num_experts)
        _check_positive("num_workers", self.num_workers)
        if self.num_workers > self.num_experts:
            raise PlacementError(
                f"num_workers ({self.num_workers}) exceeds num_experts ({self.num_experts}): "
                "every worker must hold at least one expert"
            )
        if not isinstance(self.worker_of_expert, tuple):
            raise PlacementError(
                f"worker_of_expert must be a tuple, got {type(self.worker_of_expert).__name__}"
            )
        if len(self.worker_of_expert) != self.num_experts:
            raise PlacementError(
                f"worker_of_expert has {len(self.worker_of_expert)} entries "
                f"but num_experts is {self.num_experts}"
            )
        for expert, worker in enumerate(self.worker_of_expert):
            if not isinstance(worker, int) or isinstance(worker, bool) or not 0 <= worker < self.num_workers:
                raise PlacementError(
                    f"expert {expert} is assigned to worker {worker!r} but num_workers is {self.num_workers}"
                )
        idle = sorted(set(range(self.num_workers)) - set(self.worker_of_expert))
        if idle:
            raise PlacementError(f"workers {idle} hold no experts: every worker must hold at least one")

    @cached_property
    def _experts_by_worker(self) -> tuple[tuple[int, ...], ...]:
        return tuple(
            tuple(e for e, w in enumerate(self.worker_of_expert) if w == worker)
            for worker in range(self.num_workers)
        )

    def experts_of_worker(self, worker: int) -> tuple[int, ...]:
        """Sorted global expert ids held by `worker`."""
        if not 0 <= worker < self.num_workers:
            raise PlacementError(f"worker {worker} is out of range [0, {self.num_workers})")
        return self._experts_by_worker[worker]

    def num_local_experts(self, worker: int) -> int:
        return len(self.experts_of_worker(worker))

    @cached_property
    def local_index_of_expert(self) -> tuple[int, ...]:
        """Position of each global expert within its worker's `experts_of_worker` list."""
        index = [0] * self.num_experts
        for experts in self._experts_by_worker:
            for local, expert in enumerate(experts):
                index[expert] = local
        return tuple(index)

    @property
    def max_local_experts(self) -> int:
        """e_max: the largest number of experts any worker holds."""
        return max(len(experts) for experts in self._experts_by_worker)


def contiguous_placement(num_experts: int, num_workers: int) -> ExpertPlacement:
    """Contiguous, as-even-as-possible blocks: 8 experts on 3 workers -> [0,1,2], [3,4,5], [6,7]."""
    return _build(num_experts, num_workers, _contiguous_worker)


def round_robin_placement(num_experts: int, num_workers: int) -> ExpertPlacement:
    """Expert e goes to worker e % num_workers: 8 experts on 3 workers -> [0,3,6], [1,4,7], [2,5]."""
    return _build(num_experts, num_workers, lambda expert, _e, workers: expert % workers)


def _contiguous_worker(expert: int, num_experts: int, num_workers: int) -> int:
    base, extra = divmod(num_experts, num_workers)
    # The first `extra` workers hold base + 1 experts, the rest hold base.
    boundary = extra * (base + 1)
    if expert < boundary:
        return expert // (base + 1)
    return extra + (expert - boundary) // base


def _build(num_experts: int, num_workers: int, assign: Callable[[int, int, int], int]) -> ExpertPlacement:
    _check_positive("num_experts", num_experts)
    _check_positive("num_workers", num_workers)
    if num_workers > num_experts:
        raise PlacementError(
            f"num_workers ({num_workers}) exceeds num_experts ({num_experts}): "
            "every worker must hold at least one expert"
        )
    return ExpertPlacement(
        num_experts=num_experts,
        num_workers=num_workers,
        worker_of_expert=tuple(assign(e, num_experts, num_workers) for e in range(num_experts)),
    )


def _check_positive(name: str, value: object) -> None:
    if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
        raise PlacementError(f"{name} must be a positive integer, got {value!r}")
