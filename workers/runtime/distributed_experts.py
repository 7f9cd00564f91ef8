"""The attention rank's MoE backend when experts live on other ranks: dispatch → (remote experts) → combine.

The attention rank holds no expert; it sends each (token, expert) row to the expert's rank and weights
the returned rows by the router. It alone decides, once per step in `begin_step`, whether the step's rows
go with their counts in one collective (small steps, and every step with one expert worker) or after a
split-size exchange, and tells the expert ranks in the step header.
Shapes: T tokens, K top-k, N = T*K rows, D model dim.
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from workers.comm import combine, dispatch_step, fixed_capacity_rows
from workers.config import ParallelConfig
from workers.model.experts import weight_and_sum
from workers.runtime.step_header import Command, StepHeader, broadcast_header
from workers.runtime.timing import StepTimings


class DistributedExperts:
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
        self.capacity_rows = 0  # this step's, as sent in its header

    def begin_step(self, num_tokens: int) -> None:
        self.capacity_rows = fixed_capacity_rows(
            num_tokens=num_tokens, top_k=self.top_k, row_bytes=self.row_bytes, num_receivers=len(self.receivers),
            max_padded_bytes=self.parallel.single_collective_max_bytes,
        )
        header = StepHeader(command=Command.STEP, num_tokens=num_tokens, capacity_rows=self.capacity_rows)
        broadcast_header(header, group=self.group, device=self.device)

    def keepalive(self) -> None:
        broadcast_header(StepHeader(command=Command.KEEPALIVE), group=self.group, device=self.device)

    def stop(self) -> None:
        broadcast_header(StepHeader(command=Command.STOP), group=self.group, device=self.device)

    def moe(
        self, layer: int, x_TD: torch.Tensor, weights_TK: torch.Tensor, ids_TK: torch.Tensor, timings: StepTimings
    ) -> torch.Tensor:
        top_k = ids_TK.shape[1]
        assert top_k == self.top_k, f"ids_TK has {top_k} experts per token, begin_step sized the step for {self.top_k}"
        with timings.phase("dispatch"):
            ids_N = ids_TK.reshape(-1)
            x_ND = x_TD.repeat_interleave(top_k, dim=0)  # row n is token n // K
            dest_rank_N, dest_local_N = self.rank_of_expert_E[ids_N], self.local_index_E[ids_N]
            _, plan = dispatch_step(
                x_ND, dest_rank_N, dest_local_N, group=self.group,
                num_local_experts_max=self.parallel.max_local_experts, capacity=self.capacity_rows,
                receivers=self.receivers,
            )
        with timings.phase("combine"):
            nothing_MD = x_TD.new_empty((0, x_TD.shape[1]))
            y_ND = combine(nothing_MD, plan, group=self.group)  # waits for the experts, returns original order
            return weight_and_sum(y_ND, weights_TK)
