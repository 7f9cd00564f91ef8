"""The attention rank's MoE backend when experts live on other ranks: dispatch → (remote experts) → combine.

The attention rank holds no expert; it sends each (token, expert) row to the expert's rank and weights
the returned rows by the router. It alone decides, once per step in `begin_step`, how many micro-batches
each layer's rows come in and, per micro-batch, whether they go with their counts in one collective (small
ones, and every one with one expert worker) or after a split-size exchange, and tells the expert ranks in
the step header. `start_moe` issues a micro-batch's dispatch and combine without waiting
(workers.comm.overlap), so the attention rank can compute the next micro-batch while the experts work.
Shapes: T tokens, K top-k, N = T*K rows, D model dim.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist

from workers.comm import PendingRows, fixed_capacity_rows, send_from_source
from workers.config import ParallelConfig
from workers.model.experts import weight_and_sum
from workers.runtime.step_header import Command, StepHeader, broadcast_header
from workers.runtime.timing import StepTimings


@dataclass(eq=False)
class PendingMoE:
    """One micro-batch's MoE output on its way back from the expert ranks."""

    rows: PendingRows
    weights_TK: torch.Tensor

    def wait(self, timings: StepTimings) -> torch.Tensor:
        """The weighted expert output [T, D]; the wait is timed as `combine` (experts and transfer not hidden)."""
        with timings.phase("combine"):
            return weight_and_sum(self.rows.wait(), self.weights_TK)


class DistributedExperts:
    overlaps = True  # start_moe returns before the experts have run

    def __init__(
        self, parallel: ParallelConfig, *, group: dist.ProcessGroup, device: torch.device, top_k: int, row_bytes: int
    ) -> None:
        """top_k: experts per token; row_bytes: bytes of one routed row (hidden size x dtype size)."""
        self.parallel = parallel
        self.group = group
        self.device = device
        self.top_k = top_k
        self.row_bytes = row_bytes
        self.rank_of_expert_E = torch.tensor(parallel.rank_of_expert, dtype=torch.int64, device=device)
        self.local_index_E = torch.tensor(parallel.local_index_of_expert, dtype=torch.int64, device=device)
        self.receivers = tuple(range(1, parallel.world_size))
        self.capacities: tuple[int, ...] = ()  # this step's, one per micro-batch, as sent in its header

    def begin_step(self, micro_batch_tokens: tuple[int, ...]) -> None:
        self.capacities = tuple(
            fixed_capacity_rows(num_tokens=tokens, top_k=self.top_k, row_bytes=self.row_bytes,
                                num_receivers=len(self.receivers),
                                max_padded_bytes=self.parallel.single_collective_max_bytes)
            for tokens in micro_batch_tokens
        )
        header = StepHeader(command=Command.STEP, num_tokens=sum(micro_batch_tokens), capacities=self.capacities)
        broadcast_header(header, group=self.group, device=self.device)

    def keepalive(self) -> None:
        broadcast_header(StepHeader(command=Command.KEEPALIVE), group=self.group, device=self.device)

    def stop(self) -> None:
        broadcast_header(StepHeader(command=Command.STOP), group=self.group, device=self.device)

    def start_moe(
        self, layer: int, micro_batch: int, x_TD: torch.Tensor, weights_TK: torch.Tensor, ids_TK: torch.Tensor,
        timings: StepTimings,
    ) -> PendingMoE:
        """Sends micro-batch `micro_batch`'s rows of `layer` to the experts; the caller must start every
        micro-batch of a layer, in order, before the next layer's first (the expert ranks' order)."""
        top_k = ids_TK.shape[1]
        assert top_k == self.top_k, f"ids_TK has {top_k} experts per token, begin_step sized the step for {self.top_k}"
        with timings.phase("dispatch"):
            ids_N = ids_TK.reshape(-1)
            x_ND = x_TD.repeat_interleave(top_k, dim=0)  # row n is token n // K
            rows = send_from_source(
                x_ND, self.rank_of_expert_E[ids_N], self.local_index_E[ids_N], group=self.group,
                num_local_experts_max=self.parallel.max_local_experts, capacity=self.capacities[micro_batch],
                receivers=self.receivers,
            )
        return PendingMoE(rows, weights_TK)
