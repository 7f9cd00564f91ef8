"""Ray actors: ExpertWorker holds one worker's experts and runs the expert rank loop; Coordinator holds
the dense weights and an engine (an attention rank: rank `index` of the expert-parallel group, whose first
num_coordinators ranks are coordinators).

Lifecycle: cheap __init__ (applies the rank's CPU share, cluster.cpu_tuning), load() reads weights, then
all ranks at once form the process group: the workers' join_group() and run(), the coordinator's start()
(which starts the engine loop). Errors name the worker. Each actor does its torch work on one thread of
its own (`TorchThread`), whichever Ray thread calls the method. info() and stats() are for operators.
"""

from __future__ import annotations

import gc
import logging
import os
import time
from dataclasses import dataclass, field, replace
from pathlib import Path

import ray
import torch

from cluster.cpu_tuning import RankCpu
from cluster.engine import LLMEngine
from cluster.engine_factory import kv_cache_bytes, num_kv_blocks
from cluster.engine_loop import EngineLoop
from cluster.errors import WorkerStartError, WorkerUnavailable
from cluster.requests import GenerationRequest
from cluster.scheduler import SchedulerConfig
from cluster.settings import EngineSettings
from cluster.torch_thread import TorchThread
from cluster.update_channel import ChannelAddress
from workers.comm import CollectiveError, ProcessGroupHandle, create_group, free_port
from workers.config import ModelConfig, ParallelConfig
from workers.model.checkpoint import CheckpointReader
from workers.model.weights import DenseWeights, ExpertShard, load_dense_weights, load_expert_shard, reshard
from workers.runtime.attention_rank import LocalExperts, MicroBatching
from workers.runtime.distributed_experts import DistributedExperts
from workers.runtime.expert_rank import ExpertRank
from workers.runtime.local_build import assemble_attention_rank

log = logging.getLogger(__name__)


@dataclass(frozen=True, kw_only=True)
class RankSettings:
    model_dir: Path
    dtype: torch.dtype
    device: str  # "cpu" or "cuda" (the actor's one visible GPU)
    backend: str
    collective_timeout_s: float
    compile_small_steps: bool = False  # the coordinator's, when it holds every expert (EngineSettings)
    micro_batching: MicroBatching = field(default_factory=MicroBatching)  # the coordinator's (EngineSettings)


@dataclass(frozen=True, kw_only=True)
class RankInfo:
    """What an operator (the serve log) or the bench wants to know of a rank process."""

    pid: int
    node_ip: str
    torch_threads: int
    tensor_names: tuple[str, ...]  # every weight tensor the process loaded from the checkpoint
    cpu_seconds: float  # process CPU time so far (every thread: torch's, gloo's, Ray's)


def rank_name(rank: int, num_coordinators: int = 1) -> str:
    """Rank `rank`'s name in logs and errors: "coordinator" (one) or "coordinator i", then "expert worker j"."""
    if rank >= num_coordinators:
        return f"expert worker {rank - num_coordinators}"
    return "coordinator" if num_coordinators == 1 else f"coordinator {rank}"


def idle_worker_stats(cfg: ModelConfig, placement_epoch: int = 0) -> dict:
    """ExpertWorker.stats of a worker out of any group: no steps, seconds or rows."""
    return {"steps": 0, "seconds": {}, "placement_epoch": placement_epoch,
            "rows_per_expert": [[0] * cfg.num_local_experts for _ in range(cfg.num_hidden_layers)]}


def _rank_info(threads: int, tensor_names: list[str]) -> RankInfo:
    return RankInfo(pid=os.getpid(), node_ip=ray.util.get_node_ip_address(), torch_threads=threads,
                    tensor_names=tuple(tensor_names), cpu_seconds=time.process_time())


class ExpertWorker:
    def __init__(self, slot: int, expert_ids: tuple[int, ...], settings: RankSettings, cpu: RankCpu) -> None:
        """slot: the worker's place in the full placement (and its name); its index in the group it joins is
        the same unless the group left a dead worker out (join_group)."""
        self.threads = cpu.apply()
        self.name = f"expert worker {slot} (experts {','.join(map(str, expert_ids))})"
        self.worker_index = slot
        self.expert_ids = expert_ids
        self.settings = settings
        self.shard: ExpertShard | None = None
        self.group: ProcessGroupHandle | None = None
        self.rank: ExpertRank | None = None
        self.cfg: ModelConfig | None = None
        self.torch_thread = TorchThread()

    def load(self) -> None:
        self.torch_thread.call(self._load)

    def _load(self) -> None:
        self.cfg = ModelConfig.from_model_dir(self.settings.model_dir)
        self.shard = self._read_shard(self.expert_ids)
        gc.freeze()  # what loading made lives on: later collections (_leave_group) skip it

    def _read_shard(self, expert_ids: tuple[int, ...], held: ExpertShard | None = None) -> ExpertShard:
        """The shard of expert_ids; from `held` (a move): only the experts it lacks are read."""
        try:
            cfg = self.cfg or ModelConfig.from_model_dir(self.settings.model_dir)
            reader = CheckpointReader(self.settings.model_dir)
            options = {"dtype": self.settings.dtype, "device": _device(self.settings)}
            if held is not None:
                return reshard(held, reader, cfg, expert_ids, **options)
            return load_expert_shard(reader, cfg, expert_ids, **options)
        except Exception as exc:
            raise WorkerStartError(f"{self.name} failed to load the weights of experts {list(expert_ids)}: {exc}") \
                from exc

    def stage_experts(self, epoch: int, parallel: ParallelConfig) -> float:
        """A balancer move: reads this worker's experts under `parallel` beside serving (on the calling thread,
        not the one running steps) and hands them to the rank loop, which switches to them when the
        coordinators' plan reaches `epoch`; returns the seconds spent reading (0 when its experts stay)."""
        assert self.rank is not None, f"{self.name}: join_group() before a move"
        expert_ids = parallel.experts_of_worker(self.worker_index)
        started = time.monotonic()
        held = self.rank.shard
        shard = held if expert_ids == held.expert_ids else self._read_shard(expert_ids, held)
        self.rank.stage(epoch, shard, parallel.max_local_experts)
        return time.monotonic() - started

    def placement_epoch(self) -> int:
        """The placement epoch the rank loop runs at (0 until a move switched in this group)."""
        return self.rank.placement_epoch if self.rank is not None else 0

    def join_group(self, init_method: str, parallel: ParallelConfig, worker_index: int) -> None:
        """Joins the group as worker `worker_index` of `parallel` (rank num_coordinators + worker_index)."""
        self.torch_thread.call(self._join_group, init_method, parallel, worker_index)

    def _join_group(self, init_method: str, parallel: ParallelConfig, worker_index: int) -> None:
        shard = self.rank.shard if self.rank is not None else self.shard  # a move may have switched it
        assert shard is not None and self.cfg is not None, f"{self.name}: load() before join_group()"
        self.worker_index = worker_index
        expert_ids = parallel.experts_of_worker(self.worker_index)
        if shard.expert_ids != expert_ids:  # the group was re-formed in the middle of a move
            shard = self._read_shard(expert_ids, shard)
        self.expert_ids, self.shard, self.rank = expert_ids, shard, None
        try:
            self.group = create_group(
                backend=self.settings.backend, init_method=init_method,
                rank=parallel.num_coordinators + self.worker_index,
                world_size=parallel.world_size, timeout_s=self.settings.collective_timeout_s,
                device=_device(self.settings),
            )
        except Exception as exc:
            raise WorkerStartError(f"{self.name} could not join the group at {init_method}: {exc}") from exc
        self.rank = ExpertRank(
            shard, group=self.group.group, device=self.group.device, max_local_experts=parallel.max_local_experts,
            hidden_size=self.cfg.hidden_size, num_coordinators=parallel.num_coordinators,
            num_experts=self.cfg.num_local_experts,
        )
        self.shard = None  # the rank holds the one shard (a move replaces it there, freeing the old one)

    def run(self) -> int:
        """Serves steps until STOP; returns the number of steps served. Raises if a collective fails."""
        assert self.rank is not None, f"{self.name}: join_group() before run()"
        return self.torch_thread.call(self._run)

    def _run(self) -> int:
        assert self.rank is not None
        failure = None
        try:
            self.rank.run()
        except Exception as exc:  # a peer died or timed out: leave at once (below), then say so
            failure = f"{self.name}: {type(exc).__name__}: {exc}"  # text only: the traceback holds the rank
        steps = self.rank.steps
        self._leave_group()
        if failure is not None:
            raise CollectiveError(failure)
        return steps

    def _leave_group(self) -> None:
        """Tears the group down and drops every reference to it (the rank, keeping its shard), so its sockets
        close now: gloo closes them only when the process group is freed, and a peer waiting on this rank in
        a ring collective (the header all_gather) would otherwise fail only at the collective timeout."""
        if self.rank is not None:
            self.shard, self.rank = self.rank.shard, None
        if self.group is not None:
            self.group.destroy()
            self.group = None
        gc.collect()

    def info(self) -> RankInfo:
        shard = self.rank.shard if self.rank is not None else self.shard  # the rank's: the one a move switched
        return _rank_info(self.threads, list(shard.tensor_names) if shard else [])

    def stats(self) -> dict:
        """Since this worker joined its group (zeros between groups)."""
        if self.rank is None:
            assert self.cfg is not None, f"{self.name}: load() before stats()"
            return idle_worker_stats(self.cfg)
        return {"steps": self.rank.steps, "seconds": dict(self.rank.timings.seconds),
                "rows_per_expert": self.rank.rows_per_expert.tolist(), "placement_epoch": self.rank.placement_epoch}


class Coordinator:
    """Dense weights, KV cache, scheduler and engine loop: rank `index` of the group. With no expert workers
    (`parallel` is None) it also holds every expert and runs them in-process."""

    def __init__(
        self, settings: RankSettings, parallel: ParallelConfig | None, scheduler: SchedulerConfig, cpu: RankCpu,
        *, index: int = 0,
    ) -> None:
        self.threads = cpu.apply()
        self.index = index
        self.name = rank_name(index, parallel.num_coordinators if parallel is not None else 1)
        self.settings = settings
        self.parallel = parallel
        self.scheduler = scheduler
        self.group: ProcessGroupHandle | None = None
        self.loop: EngineLoop | None = None
        self.peers: list[ray.actor.ActorHandle] = []  # the other coordinators (cluster.engine_loop: wake_peers)
        self.experts: DistributedExperts | LocalExperts | None = None
        self.cfg: ModelConfig | None = None
        self.dense: DenseWeights | None = None
        self.local_shard: ExpertShard | None = None
        self.torch_thread = TorchThread()

    def compiled_step_tokens(self) -> int:
        """The largest step (tokens) that runs compiled layers; 0 when every step runs eagerly."""
        fused = self._started_loop().engine.rank.fused
        return fused.max_tokens if fused is not None else 0

    def rendezvous_address(self) -> str:
        ip = ray.util.get_node_ip_address()
        return f"tcp://{ip}:{free_port(ip)}"

    def load(self) -> None:
        """Reads the dense weights (and every expert when there are no expert workers)."""
        self.torch_thread.call(self._load)

    def _load(self) -> None:
        device = _device(self.settings)
        try:
            self.cfg = ModelConfig.from_model_dir(self.settings.model_dir)
            reader = CheckpointReader(self.settings.model_dir)
            self.dense = load_dense_weights(reader, self.cfg, dtype=self.settings.dtype, device=device)
            if self.parallel is None:
                all_experts = tuple(range(self.cfg.num_local_experts))
                self.local_shard = load_expert_shard(
                    reader, self.cfg, all_experts, dtype=self.settings.dtype, device=device
                )
        except Exception as exc:
            raise WorkerStartError(f"{self.name} failed to load its weights: {exc}") from exc
        gc.freeze()  # what loading made lives on: later collections (halt) skip it

    def start(
        self, init_method: str | None, engine: EngineSettings, peers: list | None = None,
        parallel: ParallelConfig | None = None,
    ) -> None:
        """Joins the expert-parallel group (all ranks at once) and starts the engine loop; `peers`: the other
        coordinators' actors; `parallel`: the placement now (a move may have changed it since __init__). After
        halt() it starts again on a new group with the weights it holds (a fresh KV cache: requests are
        replayed)."""
        assert self.loop is None or not self.loop.running, f"{self.name}: halt() before starting again"
        self.peers = list(peers or [])
        if parallel is not None:
            self.parallel = parallel
        self.torch_thread.call(self._build_engine, init_method, engine)
        assert self.loop is not None
        self.loop.start(self.torch_thread)

    def _build_engine(self, init_method: str | None, engine: EngineSettings) -> None:
        assert self.dense is not None and self.cfg is not None, f"{self.name}: load() before start()"
        headers = None
        if self.parallel is None:
            assert self.local_shard is not None
            self.experts = LocalExperts(self.local_shard)
        else:
            assert init_method is not None, "an expert-parallel coordinator needs a rendezvous address"
            try:
                self.group = create_group(
                    backend=self.settings.backend, init_method=init_method, rank=self.index,
                    world_size=self.parallel.world_size, timeout_s=self.settings.collective_timeout_s,
                    device=_device(self.settings),
                )
            except Exception as exc:
                raise WorkerStartError(f"{self.name} could not join the group at {init_method}: {exc}") from exc
            self.experts = DistributedExperts(
                self.parallel, group=self.group.group, device=self.group.device, top_k=self.cfg.num_experts_per_tok,
                row_bytes=self.cfg.hidden_size * self.settings.dtype.itemsize, num_layers=self.cfg.num_hidden_layers,
                hidden_size=self.cfg.hidden_size, dtype=self.settings.dtype,
            )
            headers = self.experts
        # the cache is sized here, on the coordinator's own device, after its weights are loaded
        engine = replace(engine, device=_device(self.settings))
        try:
            kv_blocks = num_kv_blocks(engine, self.cfg, kv_cache_bytes(engine))
        except ValueError as exc:
            raise WorkerStartError(f"{self.name}: {exc}") from exc
        rank = assemble_attention_rank(self.cfg, self.dense, self.experts, num_blocks=kv_blocks,
                                       block_size=engine.block_size,
                                       compile_small_steps=self.settings.compile_small_steps,
                                       micro_batching=self.settings.micro_batching)
        self.loop = EngineLoop(LLMEngine(rank, self.scheduler), headers=headers,
                               keepalive_interval_s=self.settings.collective_timeout_s / 4,
                               wake_peers=self._wake_peers if self.peers else None)

    def _wake_peers(self, exchange: int) -> None:
        """On the loop's thread: asks the other coordinators to join header exchange `exchange` (no reply
        awaited; a dead peer fails the exchange itself, at the collective timeout)."""
        for peer in self.peers:
            peer.join_exchange.remote(exchange)

    def stage_placement(self, epoch: int, parallel: ParallelConfig) -> None:
        """A balancer move, once every expert worker has staged its shard: the loop switches to `parallel` at
        the first exchange every coordinator enters with it staged, and enters one soon even when idle."""
        loop = self._started_loop()
        if not isinstance(self.experts, DistributedExperts):
            raise WorkerUnavailable(f"{self.name} holds every expert: there is no placement to move")
        self.experts.stage(epoch, parallel)
        loop.request_exchange()

    def join_exchange(self, exchange: int) -> None:
        """A peer coordinator enters header exchange `exchange`: this one's loop joins it."""
        if self.loop is not None:
            self.loop.join_exchange(exchange)

    def info(self) -> RankInfo:
        names = list(self.dense.tensor_names) if self.dense else []
        return _rank_info(self.threads, names + (list(self.local_shard.tensor_names) if self.local_shard else []))

    def _started_loop(self) -> EngineLoop:
        if self.loop is None:
            raise WorkerUnavailable(f"{self.name} is still starting")
        return self.loop

    def submit(self, request: GenerationRequest) -> None:
        self._started_loop().submit(request)

    def abort(self, request_id: str) -> None:
        self._started_loop().abort(request_id)

    def subscribe(self, address: ChannelAddress) -> None:
        """Sends every later update (and any waiting) to the subscriber listening at address."""
        self._started_loop().subscribe(address)

    def failure(self) -> str | None:
        return self.loop.failure if self.loop else None

    def halt(self) -> None:
        """Stops the loop without the STOP handshake (a peer died, or the group is being re-formed) and leaves
        the group, keeping the weights for start(). Raises WorkerUnavailable if the loop stays stuck in a
        collective: then this process must be replaced."""
        if self.loop is not None:
            self.loop.stop(timeout_s=self.settings.collective_timeout_s)
            if self.loop.running:
                raise WorkerUnavailable(f"{self.name}: the engine loop is stuck in a collective")
            self.loop.close_publisher()
        self.torch_thread.call(self._leave_group)
        # drop the engine (which holds the group) so the group's sockets close now (ExpertWorker._leave_group);
        # until start() builds the next, calls find no loop (WorkerUnavailable: still starting)
        self.loop = self.experts = None
        self.torch_thread.call(gc.collect)

    def _destroy_group(self) -> None:
        if self.group is not None:
            self.group.destroy()
            self.group = None

    def stop(self) -> None:
        """Stops the loop, tells the expert ranks to stop, and leaves the group."""
        if self.loop is None:
            return
        self.loop.stop()
        if self.loop.running:  # stuck in a collective with a dead peer: leave without waiting for it
            self._leave_group()
        else:
            self.torch_thread.call(self._leave_group)

    def _leave_group(self) -> None:
        """Tells the expert ranks to stop when the group still works (so they leave at once rather than at
        the collective timeout: a halt for a restart that replaces nothing), then leaves it."""
        try:
            if self.loop is not None and self.loop.failure is None and isinstance(self.experts, DistributedExperts):
                self.experts.stop()
        except Exception as exc:  # a peer died meanwhile: the survivors leave at their collective timeout
            log.warning("%s: could not stop the expert ranks (%s)", self.name, exc)
        finally:
            self._destroy_group()


def _device(settings: RankSettings) -> torch.device:
    """The rank's device: its one visible GPU (Ray sets CUDA_VISIBLE_DEVICES per actor), or the CPU."""
    if settings.device != "cuda":
        return torch.device("cpu")
    if not torch.cuda.is_available():
        raise WorkerStartError(f"--device cuda, but node {ray.util.get_node_ip_address()} has no CUDA device")
    return torch.device("cuda", 0)
