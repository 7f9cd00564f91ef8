"""The attention rank's MoE backend when experts live on other ranks: dispatch → (remote experts) → combine.

The attention rank holds no expert; it sends each (token, expert) row to the expert's rank and weights
the returned rows by the router. Small steps (and every step with one expert worker) send counts and rows
in one collective, others exchange split sizes first (`dispatch_step` picks, as the expert ranks do).
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
    def __init__(self, parallel: ParallelConfig, *, group: dist.ProcessGroup, device: torch.device) -> None:
        self.parallel = parallel
        self.group = group
        self.device = device
        self.rank_of_expert_E = torch.tensor(parallel.rank_of_expert, dtype=torch.int64, device=device)
        self.local_index_E = torch.tensor(parallel.local_index_of_expert, dtype=torch.int64, device=device)
        self.receivers = tuple(range(1, parallel.world_size))

    def begin_step(self, num_tokens: int) -> None:
        broadcast_header(StepHeader(Command.STEP, num_tokens), group=self.group, device=self.device)

    def keepalive(self) -> None:
        broadcast_header(StepHeader(Command.KEEPALIVE), group=self.group, device=self.device)

    def stop(self) -> None:
        broadcast_header(StepHeader(Command.STOP), group=self.group, device=self.device)

    def moe(
        self, layer: int, x_TD: torch.Tensor, weights_TK: torch.Tensor, ids_TK: torch.Tensor, timings: StepTimings
    ) -> torch.Tensor:
        num_tokens, top_k = ids_TK.shape
        with timings.phase("dispatch"):
            ids_N = ids_TK.reshape(-1)
            x_ND = x_TD.repeat_interleave(top_k, dim=0)  # row n is token n // K
            dest_rank_N, dest_local_N = self.rank_of_expert_E[ids_N], self.local_index_E[ids_N]
            capacity = fixed_capacity_rows(
                num_tokens=num_tokens, top_k=top_k, row_bytes=x_TD.shape[1] * x_TD.element_size(),
                num_receivers=len(self.receivers), max_padded_bytes=self.parallel.single_collective_max_bytes,
            )
            _, plan = dispatch_step(
                x_ND, dest_rank_N, dest_local_N, group=self.group,
                num_local_experts_max=self.parallel.max_local_experts, capacity=capacity, receivers=self.receivers,
            )
        with timings.phase("combine"):
            nothing_MD = x_TD.new_empty((0, x_TD.shape[1]))
            y_ND = combine(nothing_MD, plan, group=self.group)  # waits for the experts, returns original order
            return weight_and_sum(y_ND, weights_TK)
