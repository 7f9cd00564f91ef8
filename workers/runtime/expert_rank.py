"""The expert rank's SPMD loop: wait for a step header, then for each layer receive rows, run the local
experts (one matmul pair per expert over all its rows, which arrive grouped by expert: only the attention
rank sends), and send the rows back.

Driven entirely by the collectives of the attention rank; knows nothing of requests or tokens. Rows
arrive the way the attention rank chose to send them, which the step header says: per layer in one or more
micro-batches (ping-pong), each with its counts in one collective sized for its capacity, or after a
split-size exchange when that is 0.
Shapes: M rows received, D model dim, e local experts.
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from workers.comm import combine, counts_if_grouped, dispatch_step
from workers.comm.errors import DispatchError
from workers.model.experts import run_grouped_experts
from workers.model.weights import ExpertShard
from workers.runtime.step_header import Command, broadcast_header
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
        self.receivers = tuple(range(1, dist.get_world_size(group)))
        self.dtype = shard.layers[0].dtype
        self.timings = StepTimings.for_device(device)
        self.steps = 0
        self.rows_per_local_expert = torch.zeros(len(shard.layers), len(shard.expert_ids), dtype=torch.int64)

    def run(self) -> None:
        """Serve steps until the attention rank broadcasts STOP; a failed collective raises CollectiveError."""
        while True:
            header = broadcast_header(None, group=self.group, device=self.device)
            if header.command is Command.STOP:
                return
            if header.command is Command.STEP:
                for layer in range(len(self.shard.layers)):
                    for capacity in header.capacities:  # one per micro-batch, in the order they are sent
                        self._layer(layer, capacity)
                self.steps += 1

    def _layer(self, layer: int, capacity: int) -> None:
        nothing_ND = torch.empty(0, self.hidden_size, dtype=self.dtype, device=self.device)
        no_ids_N = torch.empty(0, dtype=torch.int64, device=self.device)
        with self.timings.phase("dispatch"):
            recv_x_MD, plan = dispatch_step(
                nothing_ND, no_ids_N, no_ids_N, group=self.group, num_local_experts_max=self.max_local_experts,
                capacity=capacity, receivers=self.receivers,
            )
        with self.timings.phase("experts"):
            num_local = len(self.shard.expert_ids)
            counts_e = counts_if_grouped(plan, num_local_experts=num_local)
            if counts_e is None:
                raise DispatchError(f"rows came from ranks {plan.output_splits}; only the attention rank sends")
            self.rows_per_local_expert[layer] += torch.tensor(counts_e)
            y_MD = run_grouped_experts(recv_x_MD, counts_e, self.shard.layers[layer])  # rows grouped on arrival
        with self.timings.phase("combine"):
            combine(y_MD, plan, group=self.group)
