"""The attention rank's MoE backend when experts live on other ranks: dispatch → (remote experts) → combine.

The attention rank holds no expert; it sends each (token, expert) row to the expert's rank and weights
the returned rows by the router. Shapes: T tokens, K top-k, N = T*K rows, D model dim.
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from workers.comm import combine, dispatch
from workers.config import ParallelConfig
from workers.model.experts import weight_and_sum
from workers.runtime.step_header import Command, broadcast_command
from workers.runtime.timing import StepTimings


class DistributedExperts:
    def __init__(self, parallel: ParallelConfig, *, group: dist.ProcessGroup, device: torch.device) -> None:
        self.parallel = parallel
        self.group = group
        self.device = device
        self.rank_of_expert_E = torch.tensor(parallel.rank_of_expert, dtype=torch.int64, device=device)
        self.local_index_E = torch.tensor(parallel.local_index_of_expert, dtype=torch.int64, device=device)

    def begin_step(self, num_tokens: int) -> None:
        broadcast_command(Command.STEP, group=self.group, device=self.device)

    def keepalive(self) -> None:
        broadcast_command(Command.KEEPALIVE, group=self.group, device=self.device)

    def stop(self) -> None:
        broadcast_command(Command.STOP, group=self.group, device=self.device)

    def moe(
        self, layer: int, x_TD: torch.Tensor, weights_TK: torch.Tensor, ids_TK: torch.Tensor, timings: StepTimings
    ) -> torch.Tensor:
        top_k = ids_TK.shape[1]
        with timings.phase("dispatch"):
            ids_N = ids_TK.reshape(-1)
            x_ND = x_TD.repeat_interleave(top_k, dim=0)  # row n is token n // K
            _, _, plan = dispatch(
                x_ND, self.rank_of_expert_E[ids_N], self.local_index_E[ids_N], group=self.group,
                num_local_experts_max=self.parallel.max_local_experts,
            )
        with timings.phase("combine"):
            nothing_MD = x_TD.new_empty((0, x_TD.shape[1]))
            y_ND = combine(nothing_MD, plan, group=self.group)  # waits for the experts, returns original order
            return weight_and_sum(y_ND, weights_TK)
