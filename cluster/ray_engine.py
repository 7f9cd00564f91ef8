"""The expert-parallel engine on Ray: a placement group, one Coordinator actor (rank 0, attention and
the engine loop) and N ExpertWorker actors (ranks 1..N), joined in one torch.distributed group.

Lifecycle (start, restart, shutdown) and requests in (Ray calls to the coordinator). Results come back
over the update channel (cluster.update_receiver); what the ranks report of themselves is
cluster.rank_introspection; how each rank uses its host's CPUs is cluster.cpu_tuning.
Assumes Ray is already initialised by the entry point (a local cluster or `ray start` nodes).
"""

from __future__ import annotations

import logging
import threading
import time
from dataclasses import dataclass, field

import ray
from ray.util.placement_group import placement_group, placement_group_table, remove_placement_group
from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

from cluster.actors import Coordinator, ExpertWorker, RankSettings
from cluster.cpu_tuning import CpuPolicy, RankCpu, plan_rank_cpus
from cluster.engine_stats import StatsSnapshot
from cluster.errors import WorkerStartError, WorkerUnavailable
from cluster.requests import GenerationRequest, GenerationResult, SequenceUpdate
from cluster.scheduler import SchedulerConfig
from cluster.settings import EngineSettings
from cluster.update_receiver import UpdateReceiver, unwrap
from workers.config import ModelConfig, ParallelConfig

log = logging.getLogger(__name__)
STRATEGIES = ("PACK", "SPREAD", "STRICT_PACK", "STRICT_SPREAD")


@dataclass(frozen=True, kw_only=True)
class ClusterOptions:
    num_workers: int
    placement_strategy: str = "PACK"
    cpus_per_rank: float = 1.0
    cpu: CpuPolicy = field(default_factory=CpuPolicy)  # threads, OpenMP spinning, malloc, reserved cores
    collective_timeout_s: float = 20.0
    start_timeout_s: float = 180.0

    def __post_init__(self) -> None:
        if self.num_workers < 0:
            raise ValueError(f"num_workers must be >= 0, got {self.num_workers}")
        if self.placement_strategy not in STRATEGIES:
            raise ValueError(f"placement_strategy must be one of {STRATEGIES}, got {self.placement_strategy!r}")


@dataclass(frozen=True)
class RestartReport:
    """What a restart replaced and how long each part took."""

    replaced: tuple[str, ...]  # rank names: "coordinator", "expert worker 0", ...
    full: bool  # every rank and the placement group were replaced
    halt_s: float  # survivors stop their loops and leave the old group; the dead are found
    replace_s: float  # the dead are killed, their replacements started and loaded
    join_s: float  # every rank joins the new group; the engine loop starts

    @property
    def seconds(self) -> float:
        return self.halt_s + self.replace_s + self.join_s


def rank_name(rank: int) -> str:
    return "coordinator" if rank == 0 else f"expert worker {rank - 1}"


def _first_line(exc: BaseException) -> str:
    return (str(exc).strip().splitlines() or [type(exc).__name__])[0]


class RayExpertParallelEngine:
    def __init__(
        self, settings: EngineSettings, options: ClusterOptions, scheduler: SchedulerConfig | None = None
    ) -> None:
        self.settings = settings
        self.options = options
        self.scheduler = scheduler or SchedulerConfig()
        self.cfg = ModelConfig.from_model_dir(settings.model_dir)
        self.placement = ParallelConfig.contiguous(
            num_experts=self.cfg.num_local_experts, num_workers=max(options.num_workers, 1),
            collective_timeout_s=options.collective_timeout_s,
        )
        self.parallel = self.placement if options.num_workers else None  # None: every expert in the coordinator
        self.pg = None
        self.coordinator = None
        self.workers: list = []
        self.worker_runs: list = []
        self._rank_settings: RankSettings | None = None
        self._cpus: list[RankCpu] = []
        self.rendezvous: str | None = None
        self.restarts = 0
        self.generation = 0  # restarts begun and ended: a call's failure is news only in its generation
        self.updates = UpdateReceiver()
        self._lifecycle = threading.RLock()

    # lifecycle -----------------------------------------------------------------------------------
    def start(self) -> None:
        try:
            self._place()
            self._load_all()
            self._join_all()
        except BaseException:
            self.shutdown()
            raise

    def _bundle(self) -> dict[str, float]:
        gpu = self.settings.device.type == "cuda"
        return {"CPU": self.options.cpus_per_rank} | ({"GPU": 1.0} if gpu else {})

    def _place(self) -> None:
        world = self.options.num_workers + 1
        self.pg = placement_group([self._bundle()] * world, strategy=self.options.placement_strategy)
        try:
            ray.get(self.pg.ready(), timeout=self.options.start_timeout_s)
        except ray.exceptions.GetTimeoutError as exc:
            raise WorkerStartError(
                f"placement group of {world} bundles {self._bundle()} did not fit the cluster within "
                f"{self.options.start_timeout_s}s (available: {ray.available_resources()})"
            ) from exc
        table = placement_group_table(self.pg)["bundles_to_node_id"]
        nodes = [table[b] for b in range(world)]
        nccl_timeout_s = self.options.collective_timeout_s if self.settings.device.type == "cuda" else None
        cpus = plan_rank_cpus(self.options.cpu, nodes, ray.get_runtime_context().get_node_id(),
                              nccl_timeout_s=nccl_timeout_s)
        rank_settings = RankSettings(
            model_dir=self.settings.model_dir, dtype=self.settings.dtype, device=self.settings.device.type,
            backend="nccl" if self.settings.device.type == "cuda" else "gloo",
            collective_timeout_s=self.options.collective_timeout_s,
            compile_small_steps=self.settings.compile_small_steps, micro_batching=self.settings.micro_batching,
        )
        self._rank_settings, self._cpus = rank_settings, cpus
        self.coordinator = self._new_rank(0)
        self.workers = [self._new_rank(w + 1) for w in range(self.options.num_workers)]

    def _new_rank(self, rank: int) -> ray.actor.ActorHandle:
        """The actor of `rank` (0: the coordinator) in its own bundle of the placement group."""
        cpu = self._cpus[rank]
        if rank == 0:
            return self._actor(Coordinator, 0, cpu, max_concurrency=16).remote(
                self._rank_settings, self.parallel, self.scheduler, cpu
            )
        worker = rank - 1
        return self._actor(ExpertWorker, rank, cpu, max_concurrency=4).remote(
            worker, self.placement.experts_of_worker(worker), self._rank_settings, cpu
        )

    def _actor(self, cls: type, bundle: int, cpu: RankCpu, *, max_concurrency: int):
        strategy = PlacementGroupSchedulingStrategy(placement_group=self.pg, placement_group_bundle_index=bundle)
        env_vars = dict(cpu.env_vars)
        return ray.remote(cls).options(
            num_cpus=self.options.cpus_per_rank, num_gpus=self._bundle().get("GPU", 0), max_concurrency=max_concurrency,
            scheduling_strategy=strategy, max_restarts=0, runtime_env={"env_vars": env_vars} if env_vars else None,
        )

    def _load_all(self, ranks: list[int] | None = None) -> None:
        """Loads the weights of `ranks` (default: every rank) at once; raises WorkerStartError naming each
        rank that failed."""
        actors = [self.coordinator, *self.workers]
        ranks = list(range(len(actors))) if ranks is None else ranks
        names = [rank_name(r) for r in ranks]
        refs = [actors[r].load.remote() for r in ranks]
        errors = []
        for name, ref in zip(names, refs, strict=True):
            try:
                ray.get(ref, timeout=self.options.start_timeout_s)
            except ray.exceptions.RayTaskError as exc:
                errors.append(str(exc.cause) if exc.cause else str(exc))
            except (ray.exceptions.RayActorError, ray.exceptions.GetTimeoutError) as exc:
                errors.append(f"{name} did not start: {exc}")
        if errors:
            raise WorkerStartError("; ".join(errors))

    def _join_all(self) -> None:
        if self.parallel is not None:
            self.rendezvous = ray.get(self.coordinator.rendezvous_address.remote())
        refs = [self.coordinator.start.remote(self.rendezvous, self.settings)]
        if self.parallel is not None:
            refs += [
                w.join_group.remote(self.rendezvous, self.parallel)
                for w in self.workers
            ]
        try:
            ray.get(refs, timeout=self.options.start_timeout_s)
        except ray.exceptions.RayTaskError as exc:
            raise WorkerStartError(str(exc.cause) if exc.cause else str(exc)) from exc
        self.worker_runs = [w.run.remote() for w in self.workers]

    def restart(self) -> RestartReport:
        """Replaces the ranks that died and re-forms the process group with the survivors, which keep their
        weights (a dead expert worker costs one worker's load, not the model's). When the placement group
        itself lost a node, every actor and the group are replaced. Requests in flight are lost with the old
        group (the coordinator's KV cache is rebuilt): the gateway replays them (cluster.gateway.engine_client)."""
        with self._lifecycle:
            try:
                return self._restart()
            finally:
                self.generation += 1  # whatever a call begun before now saw fail was the old group's

    def _restart(self) -> RestartReport:
        started = time.monotonic()
        self.restarts += 1
        self.updates.close()
        if self.pg is None or not self._placement_intact():
            log.warning("restart %d: the placement group lost a bundle; replacing every rank", self.restarts)
            self.shutdown(graceful=False)
            self.start()
            names = tuple(rank_name(r) for r in range(self.options.num_workers + 1))
            return RestartReport(names, full=True, halt_s=0.0, replace_s=time.monotonic() - started, join_s=0.0)
        dead = self._halt_ranks()
        halted = time.monotonic()
        log.warning("restart %d: replacing %s", self.restarts, ", ".join(map(rank_name, dead)) or "no rank")
        try:
            self._replace(dead)
            replaced = time.monotonic()
            self._join_all()
        except BaseException:
            self.shutdown(graceful=False)
            raise
        return RestartReport(tuple(map(rank_name, dead)), full=False, halt_s=halted - started,
                             replace_s=replaced - halted, join_s=time.monotonic() - replaced)

    def _placement_intact(self) -> bool:
        return placement_group_table(self.pg).get("state") == "CREATED"

    def _halt_ranks(self) -> list[int]:
        """Stops every rank's loop and returns the ranks that must be replaced: dead, or stuck in a collective
        beyond the collective timeout. Survivors leave the old group and keep their weights."""
        timeout_s = self.options.collective_timeout_s + 5.0
        dead = []
        try:
            ray.get(self.coordinator.halt.remote(), timeout=timeout_s)
        except (ray.exceptions.RayError, WorkerUnavailable) as exc:
            log.warning("the coordinator must be replaced: %s", _first_line(exc))
            dead.append(0)
        if self.worker_runs:  # a worker's loop ends once its peers leave the group (or die)
            ray.wait(self.worker_runs, num_returns=len(self.worker_runs), timeout=timeout_s)
        for w, run in enumerate(self.worker_runs):
            if not ray.wait([run], timeout=0)[0]:
                log.warning("%s is stuck in a collective; replacing it", rank_name(w + 1))
                dead.append(w + 1)
                continue
            try:
                ray.get(run)
            except ray.exceptions.RayActorError:
                dead.append(w + 1)
            except ray.exceptions.RayTaskError:  # its collective failed when a peer died: it survives
                pass
        return dead

    def _replace(self, ranks: list[int]) -> None:
        """Kills `ranks` and starts their replacements in the same bundles, loading their weights."""
        for rank in ranks:
            old = self.coordinator if rank == 0 else self.workers[rank - 1]
            ray.kill(old, no_restart=True)
            if rank == 0:
                self.coordinator = self._new_rank(0)
            else:
                self.workers[rank - 1] = self._new_rank(rank)
        if ranks:
            self._load_all(ranks)

    def shutdown(self, timeout_s: float = 30.0, *, graceful: bool = True) -> None:
        """Stops the loop and the expert ranks, then removes every actor and the placement group.
        graceful=False skips the stop handshake (a peer is known to be dead) and kills at once."""
        if self.coordinator is not None and graceful:
            try:
                ray.get(self.coordinator.stop.remote(), timeout=timeout_s)
                ray.wait(self.worker_runs, num_returns=len(self.worker_runs), timeout=timeout_s)
            except (ray.exceptions.RayError, TimeoutError) as exc:
                log.warning("clean stop failed (%s); killing the actors", exc)
        for actor in [self.coordinator, *self.workers]:
            if actor is not None:
                ray.kill(actor, no_restart=True)
        self.updates.close()
        if self.pg is not None:
            remove_placement_group(self.pg)
        self.coordinator, self.workers, self.worker_runs, self.pg = None, [], [], None

    def __enter__(self) -> RayExpertParallelEngine:
        self.start()
        return self

    def __exit__(self, *exc_info) -> None:
        self.shutdown()

    # requests in, updates out ------------------------------------------------------------------
    def live_coordinator(self) -> ray.actor.ActorHandle:
        coordinator = self.coordinator
        if coordinator is None:
            raise WorkerUnavailable("the engine is (re)starting")
        return coordinator

    def submit_ref(self, request: GenerationRequest) -> ray.ObjectRef:
        return self.live_coordinator().submit.remote(request)

    def abort_ref(self, request_id: str) -> ray.ObjectRef:
        return self.live_coordinator().abort.remote(request_id)

    def drain(self, timeout_s: float) -> tuple[list[SequenceUpdate], StatsSnapshot | None]:
        """Every update the coordinator has sent, with its stats over them (see UpdateReceiver.drain)."""
        return self.updates.drain(self.live_coordinator(), timeout_s)

    # health ------------------------------------------------------------------------------------
    def workers_up(self) -> list[bool]:
        """Per expert worker: still serving (its loop has not returned or died)."""
        if not self.worker_runs:
            return [False] * self.options.num_workers
        done, _ = ray.wait(self.worker_runs, num_returns=len(self.worker_runs), timeout=0)
        finished = {ref.hex() for ref in done}
        return [ref.hex() not in finished for ref in self.worker_runs]

    def healthy(self) -> bool:
        coordinator = self.coordinator
        if coordinator is None:
            return False
        try:
            failure = ray.get(coordinator.failure.remote(), timeout=5)
        except (ray.exceptions.RayError, TimeoutError):
            return False
        return failure is None and all(self.workers_up())

    def generate(self, requests: list[GenerationRequest], timeout_s: float = 600.0) -> list[GenerationResult]:
        """Runs the requests together; raises WorkerUnavailable if a worker failure lost any of them."""
        results = {r.request_id: GenerationResult(r.request_id, r.prompt_token_ids) for r in requests}
        for request in requests:
            unwrap(self.submit_ref(request))
        deadline = time.monotonic() + timeout_s
        pending = set(results)
        while pending:
            if time.monotonic() > deadline:
                raise TimeoutError(f"{len(pending)} requests unfinished after {timeout_s}s")
            for update in self.drain(1.0)[0]:
                result = results[update.request_id]
                result.token_ids.extend(update.token_ids)
                result.logprobs.extend(update.logprobs)
                if update.finish_reason:
                    result.finish_reason, result.error = update.finish_reason, update.error
                    pending.discard(update.request_id)
        failed = [r for r in results.values() if r.error]
        if failed:
            raise WorkerUnavailable(f"{len(failed)} of {len(results)} requests lost: {failed[0].error}")
        return [results[r.request_id] for r in requests]

    def rank_actors(self) -> dict[str, ray.actor.ActorHandle]:
        """The live rank actors by name: "coordinator", "worker 0", ... (see cluster.rank_introspection)."""
        return {"coordinator": self.live_coordinator()} | {f"worker {w}": a for w, a in enumerate(self.workers)}
