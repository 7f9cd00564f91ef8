"""The dispatcher's split of a replicated expert's rows between its copies.

An expert may have several physical copies on different workers (`ParallelConfig.redundant_copies`). Within
one micro-batch of one layer, the rows routed to expert e (in row order: token-major, then top-k slot) are
dealt out in turn: the i-th goes to copy (i + rotation) mod copies(e). The copies' counts differ by at most
one, and the split is a pure function of the routing and the rotation, which the caller derives from
(layer, micro-batch, coordinator) so that an expert with a single row does not always send it to its first
copy. The tokens never depend on the split: every copy holds the same weights, and the combine puts each
row back where it came from.

Pure tensor math on the dispatching device, no host sync; knows nothing of collectives or weights.
Shape legend: N routed rows, E logical experts, C copies of the most replicated expert.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from workers.config import ParallelConfig


def occurrence_index(ids_N: torch.Tensor, num_experts: int) -> torch.Tensor:
    """[N] int64: for each row, how many earlier rows are routed to the same expert."""
    order_N = torch.argsort(ids_N, stable=True)  # rows grouped by expert, each group in row order
    ones_N = torch.ones_like(ids_N, dtype=torch.int64)
    counts_E = torch.zeros(num_experts, dtype=torch.int64, device=ids_N.device).index_add_(0, ids_N, ones_N)  # no sync
    starts_E = torch.cumsum(counts_E, 0) - counts_E  # where each expert's group begins in order_N
    sorted_occurrence_N = torch.arange(len(ids_N), device=ids_N.device) - starts_E[ids_N[order_N]]
    occurrence_N = torch.empty_like(ids_N, dtype=torch.int64)
    occurrence_N[order_N] = sorted_occurrence_N
    return occurrence_N


def replica_of_rows(ids_N: torch.Tensor, copies_E: torch.Tensor, *, rotation: int) -> torch.Tensor:
    """[N] int64: the copy of its expert each row goes to, (occurrence + rotation) mod copies."""
    occurrence_N = occurrence_index(ids_N, len(copies_E))
    return (occurrence_N + rotation) % copies_E[ids_N]


@dataclass(frozen=True, eq=False)
class ReplicaTable:
    """Every copy's destination, as tensors on the dispatching device; padding repeats an expert's first copy."""

    rank_EC: torch.Tensor  # [E, C] int64: the rank holding copy c of expert e
    local_index_EC: torch.Tensor  # [E, C] int64: that copy's local index on its rank
    copies_E: torch.Tensor  # [E] int64: copies of each expert (>= 1)
    replicated: bool  # any expert has more than one copy

    @classmethod
    def from_parallel(cls, parallel: ParallelConfig, device: torch.device) -> ReplicaTable:
        width = max(parallel.copies_of_expert)

        def padded(rows: tuple[tuple[int, ...], ...]) -> torch.Tensor:
            return torch.tensor([row + (row[0],) * (width - len(row)) for row in rows], dtype=torch.int64,
                                device=device)

        return cls(rank_EC=padded(parallel.replica_ranks), local_index_EC=padded(parallel.replica_local_indices),
                   copies_E=torch.tensor(parallel.copies_of_expert, dtype=torch.int64, device=device),
                   replicated=parallel.replicated)

    def destinations(self, ids_N: torch.Tensor, *, rotation: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(dest_rank_N, dest_local_expert_N) of rows routed to experts ids_N."""
        if not self.replicated:
            return self.rank_EC[ids_N, 0], self.local_index_EC[ids_N, 0]
        replica_N = replica_of_rows(ids_N, self.copies_E, rotation=rotation)
        return self.rank_EC[ids_N, replica_N], self.local_index_EC[ids_N, replica_N]
