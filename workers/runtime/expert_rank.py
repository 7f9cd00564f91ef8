"""The expert rank's SPMD loop: wait for a step header, then for each layer receive rows, run the local
experts (one matmul pair per expert over all its rows), and send the rows back.

Driven entirely by the collectives of the attention rank; knows nothing of requests or tokens.
Shapes: M rows received, D model dim, e local experts.
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from workers.comm import combine, dispatch, group_by_local_expert, unpermute
from workers.model.experts import run_grouped_experts
from workers.model.weights import ExpertShard
from workers.runtime.step_header import Command, broadcast_command
from workers.runtime.timing import StepTimings


class ExpertRank:
    def __init__(
        self, shard: ExpertShard, *, group: dist.ProcessGroup, device: torch.device, max_local_experts: int,
        hidden_size: int,
    ) -> None:
        self.shard = shard
        self.group = group
        self.device = device
        self.max_local_experts = max_local_experts
        self.hidden_size = hidden_size
        self.dtype = shard.layers[0].dtype
        self.timings = StepTimings()
        self.steps = 0
        self.rows_per_local_expert = torch.zeros(len(shard.layers), len(shard.expert_ids), dtype=torch.int64)

    def run(self) -> None:
        """Serve steps until the attention rank broadcasts STOP; a failed collective raises CollectiveError."""
        while True:
            command = broadcast_command(None, group=self.group, device=self.device)
            if command is Command.STOP:
                return
            if command is Command.STEP:
                for layer in range(len(self.shard.layers)):
                    self._layer(layer)
                self.steps += 1

    def _layer(self, layer: int) -> None:
        nothing_ND = torch.empty(0, self.hidden_size, dtype=self.dtype, device=self.device)
        no_ids_N = torch.empty(0, dtype=torch.int64, device=self.device)
        with self.timings.phase("dispatch"):
            recv_x_MD, recv_local_M, plan = dispatch(
                nothing_ND, no_ids_N, no_ids_N, group=self.group, num_local_experts_max=self.max_local_experts
            )
        with self.timings.phase("experts"):
            order_M, counts_e = group_by_local_expert(recv_local_M, num_local_experts=len(self.shard.expert_ids))
            self.rows_per_local_expert[layer] += counts_e.cpu()
            y_grouped_MD = run_grouped_experts(recv_x_MD[order_M], counts_e.tolist(), self.shard.layers[layer])
            y_MD = unpermute(y_grouped_MD, order_M)
        with self.timings.phase("combine"):
            combine(y_MD, plan, group=self.group)
