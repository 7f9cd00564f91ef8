"""The expert-parallel engine on Ray: a placement group, M Coordinator actors (ranks 0..M-1, attention and
an engine loop each, M = 1 unless `--coordinators`) and N ExpertWorker actors (ranks M..M+N-1), joined in one
torch.distributed group. With several coordinators each has its own scheduler, KV cache and update channel,
and all of them step in lockstep (docs/SCALING.md, "Several coordinators"); the caller picks the coordinator
of each request (the gateway: cluster.gateway.placement).

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

from cluster.actors import Coordinator, ExpertWorker, RankSettings, idle_worker_stats, rank_name
from cluster.cpu_tuning import CpuPolicy, RankCpu, plan_rank_cpus
from cluster.engine_stats import StatsSnapshot
from cluster.errors import MoveFailed, WorkerStartError, WorkerUnavailable
from cluster.expert_balance import RoutingProfile, moved_copies, plan_placement
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
    num_coordinators: int = 1
    # physical expert copies beyond the model's experts, spread over the workers (ParallelConfig.contiguous);
    # lets num_workers exceed the experts
    redundant_experts: int = 0
    # rows routed per (layer, expert) by an earlier run: the start placement is planned for them
    # (cluster.expert_balance.plan_placement); None: contiguous blocks
    routing_profile: RoutingProfile | None = None
    placement_strategy: str = "PACK"
    cpus_per_rank: float = 1.0
    cpu: CpuPolicy = field(default_factory=CpuPolicy)  # threads, OpenMP spinning, malloc, reserved cores
    collective_timeout_s: float = 20.0
    start_timeout_s: float = 180.0

    def __post_init__(self) -> None:
        if self.num_workers < 0:
            raise ValueError(f"num_workers must be >= 0, got {self.num_workers}")
        if self.num_coordinators < 1:
            raise ValueError(f"num_coordinators must be >= 1, got {self.num_coordinators}")
        if self.num_coordinators > 1 and not self.num_workers:
            raise ValueError(f"{self.num_coordinators} coordinators share expert workers: num_workers must be >= 1")
        if self.redundant_experts < 0:
            raise ValueError(f"redundant_experts must be >= 0, got {self.redundant_experts}")
        if self.redundant_experts and not self.num_workers:
            raise ValueError(f"redundant_experts ({self.redundant_experts}) are copies on expert workers: "
                             "num_workers must be >= 1")
        if self.routing_profile is not None and not self.num_workers:
            raise ValueError("a routing profile places expert copies on expert workers: num_workers must be >= 1")
        if self.placement_strategy not in STRATEGIES:
            raise ValueError(f"placement_strategy must be one of {STRATEGIES}, got {self.placement_strategy!r}")

    def placement(self, num_experts: int) -> ParallelConfig:
        """Where the copies of a model's num_experts experts live (contiguous blocks, or planned for the routing
        profile with the same copies per worker); raises ConfigError (a ValueError) naming the
        conflict when these workers cannot hold them (the entry point asks before it starts Ray)."""
        contiguous = ParallelConfig.contiguous(
            num_experts=num_experts, num_workers=max(self.num_workers, 1), redundant_experts=self.redundant_experts,
            collective_timeout_s=self.collective_timeout_s, num_coordinators=self.num_coordinators,
        )
        if self.routing_profile is None:
            return contiguous
        if self.routing_profile.num_experts != num_experts:
            raise ValueError(f"the routing profile has {self.routing_profile.num_experts} experts, the model "
                             f"{num_experts}")
        return plan_placement(self.routing_profile.rows_LE, contiguous)


@dataclass(frozen=True)
class RestartReport:
    """What a restart (or a rejoin) replaced and how long each part took."""

    replaced: tuple[str, ...]  # rank names: "coordinator" (or "coordinator 1", ...), "expert worker 0", ...
    full: bool  # every rank and the placement group were replaced
    halt_s: float  # survivors stop their loops and leave the old group; the dead are found
    replace_s: float  # the dead are killed, their replacements started and loaded
    join_s: float  # every rank joins the new group; the engine loop starts
    # expert workers the new group runs without, their experts served by the copies on the others (a failover
    # onto surviving copies: nothing loads before serving resumes); prepare_standby() and rejoin() bring them back
    left_out: tuple[str, ...] = ()
    rejoined: tuple[str, ...] = ()  # standby replacements (loaded beside serving) that joined this group

    @property
    def seconds(self) -> float:
        return self.halt_s + self.replace_s + self.join_s


@dataclass(frozen=True)
class MoveReport:
    """What one balancer move did and cost."""

    epoch: int  # the placement epoch switched to
    moved_copies: int  # expert copies some worker had to read
    stage_s: float  # every worker read its new experts beside serving (the slowest sets it)
    switch_s: float  # the coordinators staged the placement until every rank ran it
    read_s: tuple[float, ...]  # per worker: seconds reading its experts (0: its experts stayed)

    @property
    def seconds(self) -> float:
        return self.stage_s + self.switch_s


def _names(rank_name, ranks: list[int]) -> str:
    return ", ".join(map(rank_name, ranks))


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
        self.placement = options.placement(self.cfg.num_local_experts)
        self.parallel = self.placement if options.num_workers else None  # None: every expert in the coordinator
        self.num_coordinators = options.num_coordinators
        self.pg = None
        self.coordinators: list = []  # by index (= rank); empty while (re)starting
        self.workers: list = []  # by slot (the worker's index in self.placement); None: left out of the group
        self.in_group: tuple[int, ...] = ()  # slots in the group, in group order (all unless a failover left some out)
        self.standby: dict[int, ray.actor.ActorHandle] = {}  # loaded replacements of left-out slots, not yet joined
        self.worker_runs: dict[int, ray.ObjectRef] = {}  # by slot: each joined worker's rank loop
        self._rank_settings: RankSettings | None = None
        self._cpus: list[RankCpu] = []
        self.rendezvous: str | None = None
        self.restarts = 0
        self.generation = 0  # restarts begun and ended: a call's failure is news only in its generation
        self.placement_epoch = 0  # balancer moves switched to since the group formed (workers.runtime.step_header)
        self.updates = [UpdateReceiver() for _ in range(self.num_coordinators)]  # one channel per coordinator
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
        world = self.options.num_workers + self.num_coordinators
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
        self.coordinators = [self._new_rank(c) for c in range(self.num_coordinators)]
        self.workers = [self._new_rank(self.num_coordinators + w) for w in range(self.options.num_workers)]
        self.in_group = tuple(range(self.options.num_workers))
        self.parallel = self.placement if self.options.num_workers else None

    def _new_rank(self, rank: int) -> ray.actor.ActorHandle:
        """The actor of `rank` (0..M-1: coordinators) in its own bundle of the placement group."""
        cpu = self._cpus[rank]
        if rank < self.num_coordinators:
            return self._actor(Coordinator, rank, cpu, max_concurrency=16).remote(
                self._rank_settings, self.parallel, self.scheduler, cpu, index=rank
            )
        worker = rank - self.num_coordinators
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
        actors = [*self.coordinators, *self.workers]
        ranks = list(range(len(actors))) if ranks is None else ranks
        self._await_loads({self.rank_name(r): actors[r] for r in ranks})

    def _await_loads(self, actors: dict[str, ray.actor.ActorHandle]) -> None:
        """Loads the weights of `actors` (by rank name) at once; raises WorkerStartError naming each that failed."""
        refs = {name: actor.load.remote() for name, actor in actors.items()}
        errors = []
        for name, ref in refs.items():
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
            self.rendezvous = ray.get(self.coordinators[0].rendezvous_address.remote())
        self.placement_epoch = 0  # a new group starts at its placement's epoch 0 (every rank's count restarts)
        refs = [c.start.remote(self.rendezvous, self.settings, [p for p in self.coordinators if p is not c],
                               self.parallel)
                for c in self.coordinators]
        if self.parallel is not None:
            refs += [self.workers[slot].join_group.remote(self.rendezvous, self.parallel, index)
                     for index, slot in enumerate(self.in_group)]
        try:
            ray.get(refs, timeout=self.options.start_timeout_s)
        except ray.exceptions.RayTaskError as exc:
            raise WorkerStartError(str(exc.cause) if exc.cause else str(exc)) from exc
        self.worker_runs = {slot: self.workers[slot].run.remote() for slot in self.in_group}

    def _group_workers(self) -> list[ray.actor.ActorHandle]:
        """The expert workers in the group, in group order."""
        return [self.workers[slot] for slot in self.in_group]

    @property
    def degraded(self) -> bool:
        """Whether the group runs without some expert workers (a failover onto surviving copies)."""
        return len(self.in_group) < self.options.num_workers

    def restart(self) -> RestartReport:
        """Re-forms the process group after a failure; the survivors keep their weights. When every expert
        still has a copy on a surviving worker, the dead expert workers are left out and the group re-forms at
        once without them (nothing loads: a failover onto surviving copies; prepare_standby() and rejoin()
        bring them back); otherwise the dead ranks are replaced in their bundles (a dead expert worker costs
        one worker's load, not the model's). When the placement group itself lost a node, every actor and the
        group are replaced. Requests in flight are lost with the old group (the coordinator's KV cache is
        rebuilt): the gateway replays them (cluster.gateway.engine_client)."""
        with self._lifecycle:
            try:
                return self._restart(rejoin=False)
            finally:
                self.generation += 1  # whatever a call begun before now saw fail was the old group's

    def rejoin(self) -> RestartReport:
        """After a failover onto surviving copies: re-forms the group with every expert worker again, the
        standby replacements (prepare_standby) joining it (a left-out slot with none is started and loaded
        now). Requests in flight are lost with the old group and replayed, as in restart()."""
        with self._lifecycle:
            try:
                return self._restart(rejoin=True)
            finally:
                self.generation += 1

    def _restart(self, *, rejoin: bool) -> RestartReport:
        started = time.monotonic()
        self.restarts += 1
        for receiver in self.updates:
            receiver.close()
        if self.pg is None or not self._placement_intact():
            log.warning("restart %d: the placement group lost a bundle; replacing every rank", self.restarts)
            self.shutdown(graceful=False)
            self.start()
            names = tuple(map(self.rank_name, range(self.num_coordinators + self.options.num_workers)))
            return RestartReport(names, full=True, halt_s=0.0, replace_s=time.monotonic() - started, join_s=0.0)
        dead = self._halt_ranks()
        halted = time.monotonic()
        m = self.num_coordinators
        survivors = [s for s in self.in_group if m + s not in dead]
        absent = [s for s in range(self.options.num_workers) if s not in survivors]  # dead or left out before
        fill = rejoin or not self.placement.covered_by(survivors)  # else: the survivors' copies serve every expert
        rejoined = [s for s in absent if s in self.standby] if fill else []
        replaced = [r for r in dead if r < m] + ([m + s for s in absent if s not in self.standby] if fill else [])
        left_out = [] if fill else absent
        log.warning("restart %d: replacing %s%s%s", self.restarts, _names(self.rank_name, replaced) or "no rank",
                    f"; leaving out {_names(self.rank_name, [m + s for s in left_out])}" if left_out else "",
                    f"; rejoining {_names(self.rank_name, [m + s for s in rejoined])}" if rejoined else "")
        try:
            for rank in dead:
                self._kill_rank(rank)
            for slot in rejoined:
                self.workers[slot] = self.standby.pop(slot)
            self._replace(replaced)
            self.in_group = tuple(range(self.options.num_workers)) if fill else tuple(survivors)
            if self.parallel is not None:
                self.parallel = self.placement if fill else self.placement.on_workers(self.in_group)
            loaded = time.monotonic()
            self._join_all()
        except BaseException:
            self.shutdown(graceful=False)
            raise
        return RestartReport(tuple(map(self.rank_name, replaced)), full=False, halt_s=halted - started,
                             replace_s=loaded - halted, join_s=time.monotonic() - loaded,
                             left_out=tuple(self.rank_name(m + s) for s in left_out),
                             rejoined=tuple(self.rank_name(m + s) for s in rejoined))

    def prepare_standby(self) -> tuple[str, ...]:
        """After a failover onto surviving copies: starts and loads a replacement for each expert worker left
        out of the group, in its bundle, beside serving (the group keeps stepping); returns their names. rejoin()
        then brings them in. Raises WorkerStartError naming a replacement that failed (it is killed)."""
        m = self.num_coordinators
        with self._lifecycle:
            if self.pg is None:
                raise WorkerUnavailable("the engine is not running")
            fresh = {s: self._new_rank(m + s) for s in range(self.options.num_workers)
                     if s not in self.in_group and s not in self.standby}
        try:
            self._await_loads({self.rank_name(m + s): actor for s, actor in fresh.items()})
        except BaseException:
            for actor in fresh.values():
                ray.kill(actor, no_restart=True)
            raise
        with self._lifecycle:
            for slot, actor in fresh.items():
                if slot in self.in_group or slot in self.standby or self.pg is None:  # a restart filled it meanwhile
                    ray.kill(actor, no_restart=True)
                else:
                    self.standby[slot] = actor
            return tuple(self.rank_name(m + s) for s in sorted(self.standby))

    def move_replicas(self, parallel: ParallelConfig) -> MoveReport:
        """Moves expert copies to `parallel` (same coordinators and workers) while serving: every worker whose
        experts change reads them beside its running steps, then the coordinators stage the placement and
        every rank switches to it at one header exchange, before a step's first collective (no request
        fails or waits for more than that exchange). Raises MoveFailed if a rank cannot stage it or the
        switch is not seen within the collective timeout; the group then still runs the old placement or
        fails its next step, and a restart rejoins every rank at `self.placement`."""
        with self._lifecycle:
            current = self.placement
            if self.parallel is None or not self.workers:
                raise MoveFailed("there are no expert workers: every expert is in the coordinator")
            if self.degraded:
                left_out = sorted(set(range(self.options.num_workers)) - set(self.in_group))
                raise MoveFailed(f"expert workers {left_out} are out of the group (a failover onto their copies); "
                                 "moves wait until they rejoin")
            if (parallel.num_coordinators, parallel.num_workers) != (current.num_coordinators, current.num_workers):
                raise MoveFailed(f"a move keeps the ranks: {current.num_coordinators} coordinators x "
                                 f"{current.num_workers} workers, not {parallel.num_coordinators} x "
                                 f"{parallel.num_workers}")
            epoch = self.placement_epoch + 1
            started = time.monotonic()
            try:
                read_s = ray.get([w.stage_experts.remote(epoch, parallel) for w in self._group_workers()],
                                 timeout=self.options.start_timeout_s)
                staged = time.monotonic()
                ray.get([c.stage_placement.remote(epoch, parallel) for c in self.coordinators],
                        timeout=self.options.collective_timeout_s)
                self._await_epoch(epoch)
            except (ray.exceptions.RayError, WorkerUnavailable, WorkerStartError) as exc:
                raise MoveFailed(f"the move to placement epoch {epoch} failed: {_first_line(exc)}") from exc
            switched = time.monotonic()
            self.placement = self.parallel = parallel
            self.placement_epoch = epoch
            return MoveReport(epoch=epoch, moved_copies=moved_copies(current, parallel), stage_s=staged - started,
                              switch_s=switched - staged, read_s=tuple(read_s))

    def _await_epoch(self, epoch: int) -> None:
        """Waits until every expert worker runs at placement `epoch`."""
        deadline = time.monotonic() + self.options.collective_timeout_s
        while True:
            epochs = ray.get([w.placement_epoch.remote() for w in self._group_workers()],
                             timeout=self.options.start_timeout_s)
            if all(e == epoch for e in epochs):
                return
            if time.monotonic() > deadline:
                raise WorkerUnavailable(f"workers at placement epochs {epochs}, not {epoch}, after "
                                        f"{self.options.collective_timeout_s:g}s")
            time.sleep(0.005)

    def _placement_intact(self) -> bool:
        return placement_group_table(self.pg).get("state") == "CREATED"

    def _halt_ranks(self) -> list[int]:
        """Stops every rank's loop and returns the ranks that must be replaced: dead, or stuck in a collective
        beyond the collective timeout. Survivors leave the old group and keep their weights."""
        timeout_s = self.options.collective_timeout_s + 5.0
        dead = []
        halts = [c.halt.remote() for c in self.coordinators]  # at once: each leaves only when all have stopped
        for rank, halted in enumerate(halts):
            try:
                ray.get(halted, timeout=timeout_s)
            except (ray.exceptions.RayError, WorkerUnavailable) as exc:
                log.warning("%s must be replaced: %s", self.rank_name(rank), _first_line(exc))
                dead.append(rank)
        runs = list(self.worker_runs.values())
        if runs:  # a worker's loop ends once its peers leave the group (or die)
            ray.wait(runs, num_returns=len(runs), timeout=timeout_s)
        for slot, run in self.worker_runs.items():
            rank = self.num_coordinators + slot
            if not ray.wait([run], timeout=0)[0]:
                log.warning("%s is stuck in a collective; replacing it", self.rank_name(rank))
                dead.append(rank)
                continue
            try:
                ray.get(run)
            except ray.exceptions.RayActorError:
                dead.append(rank)
            except ray.exceptions.RayTaskError:  # its collective failed when a peer died: it survives
                pass
        return dead

    def _kill_rank(self, rank: int) -> None:
        """Kills rank `rank`'s actor (an expert worker's slot is then empty until replaced)."""
        m = self.num_coordinators
        old = self.coordinators[rank] if rank < m else self.workers[rank - m]
        if old is not None:
            ray.kill(old, no_restart=True)
        if rank >= m:
            self.workers[rank - m] = None

    def _replace(self, ranks: list[int]) -> None:
        """Starts replacements of `ranks` (killed, or left out, already) in their bundles, loading their weights."""
        m = self.num_coordinators
        for rank in ranks:
            if rank < m:
                self.coordinators[rank] = self._new_rank(rank)
            else:
                self.workers[rank - m] = self._new_rank(rank)
        if ranks:
            self._load_all(ranks)

    def shutdown(self, timeout_s: float = 30.0, *, graceful: bool = True) -> None:
        """Stops the loop and the expert ranks, then removes every actor and the placement group.
        graceful=False skips the stop handshake (a peer is known to be dead) and kills at once."""
        if self.coordinators and graceful:
            try:  # every coordinator at once: the workers stop when all of them have
                ray.get([c.stop.remote() for c in self.coordinators], timeout=timeout_s)
                runs = list(self.worker_runs.values())
                ray.wait(runs, num_returns=len(runs), timeout=timeout_s)
            except (ray.exceptions.RayError, TimeoutError) as exc:
                log.warning("clean stop failed (%s); killing the actors", exc)
        for actor in [*self.coordinators, *self.workers, *self.standby.values()]:
            if actor is not None:
                ray.kill(actor, no_restart=True)
        for receiver in self.updates:
            receiver.close()
        if self.pg is not None:
            remove_placement_group(self.pg)
        self.coordinators, self.workers, self.worker_runs, self.pg = [], [], {}, None
        self.in_group, self.standby = (), {}

    def __enter__(self) -> RayExpertParallelEngine:
        self.start()
        return self

    def __exit__(self, *exc_info) -> None:
        self.shutdown()

    # requests in, updates out ------------------------------------------------------------------
    def rank_name(self, rank: int) -> str:
        return rank_name(rank, self.num_coordinators)

    def live_coordinator(self, index: int = 0) -> ray.actor.ActorHandle:
        coordinators = self.coordinators
        if not coordinators:
            raise WorkerUnavailable("the engine is (re)starting")
        return coordinators[index]

    def submit_ref(self, request: GenerationRequest, coordinator: int = 0) -> ray.ObjectRef:
        return self.live_coordinator(coordinator).submit.remote(request)

    def abort_ref(self, request_id: str, coordinator: int = 0) -> ray.ObjectRef:
        return self.live_coordinator(coordinator).abort.remote(request_id)

    def drain(self, timeout_s: float, coordinator: int = 0) -> tuple[list[SequenceUpdate], StatsSnapshot | None]:
        """Every update coordinator `coordinator` has sent, with its stats over them (UpdateReceiver.drain)."""
        return self.updates[coordinator].drain(self.live_coordinator(coordinator), timeout_s)

    # health ------------------------------------------------------------------------------------
    def workers_up(self) -> list[bool]:
        """Per expert worker slot: in the group and still serving (its loop has not returned or died)."""
        runs = dict(self.worker_runs)
        if not runs:
            return [False] * self.options.num_workers
        done, _ = ray.wait(list(runs.values()), num_returns=len(runs), timeout=0)
        finished = {ref.hex() for ref in done}
        return [slot in runs and runs[slot].hex() not in finished for slot in range(self.options.num_workers)]

    def worker_readings(self, timeout_s: float = 5.0) -> list[dict]:
        """Per expert worker slot, since it joined: "seconds" in each phase (dispatch, experts, combine),
        "rows_per_expert" [layer][expert] its copies ran and "placement_epoch" (ExpertWorker.stats); a slot
        left out of the group reads zero."""
        in_group = self.in_group
        readings = dict(zip(in_group, ray.get([self.workers[s].stats.remote() for s in in_group], timeout=timeout_s),
                            strict=True))
        idle = idle_worker_stats(self.cfg, self.placement_epoch)
        return [readings.get(slot, idle) for slot in range(self.options.num_workers)]

    def coordinators_up(self) -> list[bool]:
        """Per coordinator: its actor answers and its engine loop has not failed."""
        coordinators = self.coordinators
        if not coordinators:
            return [False] * self.num_coordinators
        up = []
        for ref in [c.failure.remote() for c in coordinators]:
            try:
                up.append(ray.get(ref, timeout=5) is None)
            except (ray.exceptions.RayError, TimeoutError):
                up.append(False)
        return up

    def healthy(self) -> bool:
        return self.group_up(self.coordinators_up(), self.workers_up())

    def group_up(self, coordinators: list[bool], workers: list[bool]) -> bool:
        """Whether every coordinator and every expert worker in the group serves, from coordinators_up() and
        workers_up() (a left-out worker is not missed)."""
        in_group = set(self.in_group)
        return all(coordinators) and all(up for slot, up in enumerate(workers) if slot in in_group)

    def generate(self, requests: list[GenerationRequest], timeout_s: float = 600.0) -> list[GenerationResult]:
        """Runs the requests together, spread over the coordinators in turn; raises WorkerUnavailable if a
        worker failure lost any of them."""
        results = {r.request_id: GenerationResult(r.request_id, r.prompt_token_ids) for r in requests}
        for i, request in enumerate(requests):
            unwrap(self.submit_ref(request, i % self.num_coordinators))
        deadline = time.monotonic() + timeout_s
        pending = set(results)
        while pending:
            if time.monotonic() > deadline:
                raise TimeoutError(f"{len(pending)} requests unfinished after {timeout_s}s")
            for update in self.drain_all(1.0)[0]:
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

    def drain_all(self, timeout_s: float) -> tuple[list[SequenceUpdate], list[StatsSnapshot]]:
        """Every coordinator's updates (one caller at a time), waiting up to timeout_s with one coordinator and
        a short poll of each with several; the stats snapshots, one per coordinator that sent any."""
        updates, stats = [], []
        poll_s = timeout_s if self.num_coordinators == 1 else min(timeout_s, 0.02)
        for index in range(self.num_coordinators):
            batch, snapshot = self.drain(poll_s, index)
            updates += batch
            stats += [snapshot] if snapshot is not None else []
        return updates, stats

    def rank_actors(self) -> dict[str, ray.actor.ActorHandle]:
        """The live rank actors by name: "coordinator" (or "coordinator 0", ...), "worker 0", ... (see
        cluster.rank_introspection)."""
        self.live_coordinator()
        names = [self.rank_name(c) for c in range(self.num_coordinators)]
        workers = {f"worker {s}": self.workers[s] for s in self.in_group}
        return dict(zip(names, self.coordinators, strict=True)) | workers
