"""Expert-parallel dispatch / combine on real gloo ranks, checked row by row against a Python oracle.

The ranks play the engine's roles: the first `sources` ranks are attention ranks and send their rows with
`send_from_source` (dispatch and combine started at once, then `wait()`), the others are expert ranks and
run the real receiving side (`dispatch_step`, then `combine`). Each spawned rank builds every rank's
inputs from fixed seeds, so it can compute exactly which rows it must receive, in which order, and what
must come back. Payloads are rank-encoded (src_rank * 1000 + row + feature / 1000); sources send uneven
numbers of rows, some send none, some expert ranks receive none, some local experts get none. Every
failing rank sends its traceback back through a queue and the parent fails with the root cause first; the
group timeout keeps a bug from hanging the suite.

Shape legend: N rows sent, M rows received, D model dim, R ranks, e local experts (e_max the max).
"""

from __future__ import annotations

import contextlib
import time
import traceback
from collections.abc import Callable, Iterator
from dataclasses import dataclass, replace
from multiprocessing.queues import SimpleQueue
from multiprocessing.synchronize import Event

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from workers.comm import (
    CollectiveError,
    DispatchError,
    DispatchPlan,
    GroupConfigError,
    PendingRows,
    ProcessGroupHandle,
    combine,
    counts_if_grouped,
    create_group,
    dispatch_step,
    free_port,
    send_from_source,
)

D = 4
GROUP_TIMEOUT_S = 20.0  # covers interpreter start-up skew at rendezvous; collectives finish in ms
HANG_TIMEOUT_S = 2.0


@dataclass(frozen=True)
class Scenario:
    name: str
    seed: int
    experts_per_rank: tuple[int, ...]  # [R] local experts each rank holds (none on the sources)
    rows_per_rank: tuple[int, ...]  # [R] rows each rank sends (only the sources send)
    routed_to: tuple[int, ...]  # expert ranks rows are routed to; the others stay idle
    sources: int = 1  # ranks [0, sources) send (attention ranks), the rest receive (expert ranks)
    dtype: torch.dtype = torch.float64

    @property
    def num_ranks(self) -> int:
        return len(self.rows_per_rank)

    @property
    def receivers(self) -> tuple[int, ...]:
        return tuple(range(self.sources, self.num_ranks))

    @property
    def num_local_experts_max(self) -> int:
        return max(max(self.experts_per_rank), 1)


def _scenarios(world_size: int) -> list[Scenario]:
    workers = world_size - 1
    base, extra = divmod(8, workers)  # 8 experts on the workers, contiguous placement
    mixserve_experts = (0, *(base + (w < extra) for w in range(workers)))
    idle_worker = (2,) if world_size >= 4 else ()  # a worker nothing is routed to
    silent, to_all = (0,) * workers, tuple(range(1, world_size))
    scenarios = [
        Scenario(name="one attention rank sends to the workers", seed=1, experts_per_rank=mixserve_experts,
                 rows_per_rank=(37, *silent), routed_to=tuple(r for r in to_all if r not in idle_worker)),
        Scenario(name="float32, few rows, two experts a worker", seed=3, experts_per_rank=(0, *(2,) * workers),
                 rows_per_rank=(9, *silent), routed_to=to_all, dtype=torch.float32),
        Scenario(name="empty step: nobody sends", seed=4, experts_per_rank=(0, *(1,) * workers),
                 rows_per_rank=(0, *silent), routed_to=to_all),
    ]
    if world_size >= 3:  # several attention ranks sharing the workers
        two = Scenario(name="two attention ranks, uneven", seed=2, sources=2, rows_per_rank=(5, 19, *silent[1:]),
                       experts_per_rank=(0, 0, *(1 + r % 3 for r in range(2, world_size))),
                       routed_to=tuple(range(2, world_size)))
        scenarios += [
            two,
            replace(two, name="two attention ranks, the first silent", seed=5, rows_per_rank=(0, 11, *silent[1:])),
            replace(two, name="two attention ranks, nobody sends", seed=6, rows_per_rank=(0, 0, *silent[1:])),
        ]
    if world_size >= 4:
        scenarios.append(Scenario(name="three attention ranks, one worker, the middle one silent", seed=7, sources=3,
                                  experts_per_rank=(0, 0, 0, 3), rows_per_rank=(4, 0, 9, 0), routed_to=(3,)))
    return scenarios


@dataclass(frozen=True)
class RankInput:
    x_ND: torch.Tensor
    dest_rank_N: torch.Tensor
    dest_local_expert_N: torch.Tensor


def _make_input(scenario: Scenario, src: int) -> RankInput:
    gen = torch.Generator().manual_seed(100 * scenario.seed + src)
    num_rows = scenario.rows_per_rank[src]
    routed_to = torch.tensor(scenario.routed_to, dtype=torch.int64)
    dest_rank_N = routed_to[torch.randint(len(routed_to), (num_rows,), generator=gen)]
    # Leave the last local expert of ranks with several experts empty, so zero counts show up.
    usable_N = torch.tensor([max(scenario.experts_per_rank[r] - 1, 1) for r in dest_rank_N.tolist()])
    dest_local_expert_N = (torch.rand(num_rows, generator=gen) * usable_N).long()
    x_ND = src * 1000 + torch.arange(num_rows, dtype=torch.float64)[:, None] + torch.arange(D) / 1000
    return RankInput(x_ND.to(scenario.dtype), dest_rank_N, dest_local_expert_N)


def _expected_received(scenario: Scenario, dst: int) -> tuple[torch.Tensor, list[list[int]]]:
    """Oracle: (x_MD, counts_RE) rank `dst` must receive, by source then local expert."""
    rows, counts = [], []
    for src in range(scenario.num_ranks):
        inp = _make_input(scenario, src)
        mine = [i for i in range(inp.x_ND.shape[0]) if int(inp.dest_rank_N[i]) == dst]
        mine.sort(key=lambda i: int(inp.dest_local_expert_N[i]))  # stable: keeps row order per expert
        mine_experts = [int(inp.dest_local_expert_N[i]) for i in mine]
        rows += [inp.x_ND[i] for i in mine]
        counts.append([mine_experts.count(j) for j in range(scenario.num_local_experts_max)])
    x_MD = torch.stack(rows) if rows else torch.empty(0, D, dtype=scenario.dtype)
    return x_MD, counts


def _expected_sent(scenario: Scenario, src: int) -> tuple[list[int], list[list[int]]]:
    """Oracle: (permutation_N, send_counts_RE) of source `src`: its rows stably sorted by (rank, local expert)."""
    inp = _make_input(scenario, src)
    dests = list(zip(inp.dest_rank_N.tolist(), inp.dest_local_expert_N.tolist(), strict=True))
    permutation = sorted(range(len(dests)), key=lambda i: dests[i])
    counts = [[dests.count((r, j)) for j in range(scenario.num_local_experts_max)] for r in range(scenario.num_ranks)]
    return permutation, counts


@contextlib.contextmanager
def _count_collectives() -> Iterator[dict[str, int]]:
    names = ["all_to_all_single", "all_to_all", "all_reduce", "all_gather", "broadcast", "barrier", "send"]
    calls = dict.fromkeys(names, 0)
    originals = {name: getattr(dist, name) for name in names}

    def counting(name: str) -> Callable[..., object]:
        def wrapper(*args: object, **kwargs: object) -> object:
            calls[name] += 1
            return originals[name](*args, **kwargs)

        return wrapper

    for name in names:
        setattr(dist, name, counting(name))
    try:
        yield calls
    finally:
        for name, fn in originals.items():
            setattr(dist, name, fn)


def _only(calls: dict[str, int], all_to_all_single: int) -> dict[str, int]:
    return {**dict.fromkeys(calls, 0), "all_to_all_single": all_to_all_single}


def _send(scenario: Scenario, rank: int, group: dist.ProcessGroup, capacity: int) -> tuple[RankInput, PendingRows]:
    """A source rank's dispatch and combine, started the way the attention rank starts them."""
    inp = _make_input(scenario, rank)
    pending = send_from_source(
        inp.x_ND, inp.dest_rank_N, inp.dest_local_expert_N, group=group,
        num_local_experts_max=scenario.num_local_experts_max, capacity=capacity, receivers=scenario.receivers,
    )
    return inp, pending


def _receive(scenario: Scenario, group: dist.ProcessGroup, capacity: int) -> tuple[torch.Tensor, DispatchPlan]:
    """An expert rank's side of the dispatch, called the way `ExpertRank` calls it: no rows of its own."""
    no_ids_N = torch.empty(0, dtype=torch.int64)
    return dispatch_step(
        torch.empty(0, D, dtype=scenario.dtype), no_ids_N, no_ids_N, group=group,
        num_local_experts_max=scenario.num_local_experts_max, capacity=capacity, receivers=scenario.receivers,
    )


def _check_dispatch_combine(scenario: Scenario, rank: int, group: dist.ProcessGroup, capacity: int = 0) -> None:
    """Capacity 0: split sizes, then rows (2 collectives); > 0: counts and rows in one; the combine: 1."""
    where = f"[{scenario.name}, capacity {capacity}] rank {rank}"
    dispatch_collectives = 1 if capacity else 2
    if rank < scenario.sources:
        with _count_collectives() as calls:
            inp, pending = _send(scenario, rank, group, capacity)
        expected_calls = _only(calls, dispatch_collectives + 1)  # both started before any wait
        assert calls == expected_calls, f"{where}: send_from_source ran {calls}"
        permutation, send_counts = _expected_sent(scenario, rank)
        assert pending.plan.permutation_N.tolist() == permutation, f"{where}: {pending.plan.permutation_N}"
        assert pending.plan.send_counts_RE.tolist() == send_counts, f"{where}: {pending.plan.send_counts_RE}"
        assert pending.plan.input_splits == tuple(map(sum, send_counts)), f"{where}: {pending.plan.input_splits}"
        with _count_collectives() as calls:
            y_ND = pending.wait()
        assert calls == _only(calls, 0), f"{where}: wait ran {calls}"
        expected_y_ND = inp.x_ND * 2 + inp.dest_rank_N[:, None].to(scenario.dtype)
        assert y_ND.dtype == scenario.dtype and y_ND.shape == inp.x_ND.shape, f"{where}: combine {y_ND.shape}"
        assert torch.equal(y_ND, expected_y_ND), f"{where}: combined\n{y_ND}\nexpected\n{expected_y_ND}"
        return

    with _count_collectives() as calls:
        recv_x_MD, plan = _receive(scenario, group, capacity)
    assert calls == _only(calls, dispatch_collectives), f"{where}: dispatch_step ran {calls}"
    expected_x_MD, expected_counts = _expected_received(scenario, rank)
    assert recv_x_MD.dtype == scenario.dtype and recv_x_MD.shape == expected_x_MD.shape, (
        f"{where}: received {recv_x_MD.dtype} {tuple(recv_x_MD.shape)}, expected {tuple(expected_x_MD.shape)}"
    )
    assert torch.equal(recv_x_MD, expected_x_MD), f"{where}: received\n{recv_x_MD}\nexpected\n{expected_x_MD}"
    assert plan.recv_counts_RE.tolist() == expected_counts, f"{where}: recv counts {plan.recv_counts_RE}"
    assert plan.output_splits == tuple(sum(c) for c in expected_counts), f"{where}: {plan.output_splits}"
    assert plan.input_splits == (0,) * scenario.num_ranks, f"{where}: input splits {plan.input_splits}"
    assert plan.permutation_N.numel() == 0 and not plan.send_counts_RE.any(), f"{where}: an expert rank sent rows"

    y_MD = recv_x_MD * 2 + rank  # this receiver's "expert"
    with _count_collectives() as calls:
        combine(y_MD, plan, group=group)
    assert calls == _only(calls, 1), f"{where}: combine ran {calls}"


def _local_experts_of(recv_counts_RE: torch.Tensor) -> torch.Tensor:
    """Local expert of each received row, given rows arrive by source rank, then by local expert."""
    experts = [j for counts in recv_counts_RE.tolist() for j, count in enumerate(counts) for _ in range(count)]
    return torch.tensor(experts, dtype=torch.int64)


def _check_grouped_experts(scenario: Scenario, rank: int, group: dist.ProcessGroup) -> None:
    """An expert rank runs one op per local expert over the rows as received, then combines. Rows from a
    single source arrive grouped by local expert and `counts_if_grouped` gives their counts (the expert
    rank's path); rows from several sources are not grouped, and it says so."""
    where = f"[{scenario.name}] grouped, rank {rank}"
    if rank < scenario.sources:
        inp, pending = _send(scenario, rank, group, capacity=0)
        y_ND = pending.wait()
        expected_y_ND = inp.x_ND * 2 + (inp.dest_rank_N * 100 + inp.dest_local_expert_N)[:, None].to(
            scenario.dtype
        )
        assert torch.equal(y_ND, expected_y_ND), f"{where}: combined\n{y_ND}\nexpected\n{expected_y_ND}"
        return
    recv_x_MD, plan = _receive(scenario, group, capacity=0)
    num_local = scenario.experts_per_rank[rank]
    local_expert_M = _local_experts_of(plan.recv_counts_RE)
    counts_e = counts_if_grouped(plan, num_local_experts=num_local)
    sources = [src for src in range(scenario.num_ranks) if plan.output_splits[src]]
    if len(sources) > 1:
        assert counts_e is None, f"{where}: rows from sources {sources} reported grouped as {counts_e}"
        y_MD = recv_x_MD * 2 + (rank * 100 + local_expert_M)[:, None].to(scenario.dtype)
    else:
        expected_counts = torch.bincount(local_expert_M, minlength=num_local).tolist()
        assert counts_e == expected_counts, f"{where}: counts {counts_e}, expected {expected_counts}"
        y_MD = torch.empty_like(recv_x_MD)
        start = 0
        for j, count in enumerate(counts_e):  # one op per local expert over all of its rows
            y_MD[start : start + count] = recv_x_MD[start : start + count] * 2 + rank * 100 + j
            start += count
    combine(y_MD, plan, group=group)


def _check_bad_arguments(rank: int, group: dist.ProcessGroup) -> None:
    """Bad routes, row counts and roles are rejected on the calling rank before any collective (every rank
    checks its own, then all run one empty dispatch together for the combine check)."""
    world_size = dist.get_world_size(group)
    receivers = tuple(range(1, world_size))
    if rank == 0:  # the source
        bad_routes = [
            ([1, 1, 9], [0, 1, 0], 3, receivers, "row 2 is routed to rank 9, local expert 0, outside"),
            ([1, 1, 1], [0, 4, 0], 3, receivers, "row 1 is routed to rank 1, local expert 4"),
            ([1, 1, 1], [0, -1, 0], 3, receivers, "row 1 is routed to rank 1, local expert -1"),
            ([1, 1], [0, 1, 0], 3, receivers, "dest_rank_N has 2 rows but dest_local_expert_N has 3"),
            ([1, 1, 1], [0, 1, 0], 2, receivers, r"x_ND must have shape \[3, D\], got \(2, 4\)"),
            ([1.0, 1.0], [0, 1], 2, receivers, "dest_rank_N must be a 1-D integer tensor"),
            ([1, 0], [0, 0], 2, receivers, r"rows are routed to ranks outside the receivers \(1,"),
            ([1], [0], 1, (0, *receivers), "must be ranks of the group of .* other than 0"),
            ([1], [0], 1, (), "must be ranks of the group of .* other than 0"),
        ]
        for dest_rank, dest_expert, rows, to, message in bad_routes:
            with pytest.raises(DispatchError, match=message):
                send_from_source(torch.zeros(rows, D), torch.tensor(dest_rank), torch.tensor(dest_expert),
                                 group=group, num_local_experts_max=4, capacity=0, receivers=to)
        nothing = torch.zeros(0, dtype=torch.int64)
        pending = send_from_source(torch.zeros(0, D), nothing, nothing, group=group, num_local_experts_max=1,
                                   capacity=0, receivers=receivers)
        assert pending.wait().shape == (0, D)
        return
    no_ids_N, ids_N = torch.zeros(0, dtype=torch.int64), torch.zeros(2, dtype=torch.int64)
    bad_receives = [
        (torch.zeros(2, D), ids_N, ids_N, receivers, "an expert rank sends no rows"),
        (torch.zeros(0, D), ids_N, ids_N, receivers, "an expert rank sends no rows"),
        (torch.zeros(D), no_ids_N, no_ids_N, receivers, "an expert rank sends no rows"),
        (torch.zeros(0, D), no_ids_N, no_ids_N, (0,), rf"rank {rank} receives rows but is not among the receivers"),
    ]
    for x_ND, dest_rank_N, dest_local_expert_N, to, message in bad_receives:
        with pytest.raises(DispatchError, match=message):
            dispatch_step(x_ND, dest_rank_N, dest_local_expert_N, group=group, num_local_experts_max=1, capacity=0,
                          receivers=to)
    _, plan = dispatch_step(torch.zeros(0, D), no_ids_N, no_ids_N, group=group, num_local_experts_max=1, capacity=0,
                            receivers=receivers)
    with pytest.raises(DispatchError, match=rf"y_MD must have shape \[{plan.num_received}, D\]"):
        combine(torch.zeros(plan.num_received + 1, D), plan, group=group)
    combine(torch.zeros(plan.num_received, D), plan, group=group)


def _join(rank: int, world_size: int, port: int, timeout_s: float) -> ProcessGroupHandle:
    return create_group(
        backend="gloo",
        init_method=f"tcp://127.0.0.1:{port}",
        rank=rank,
        world_size=world_size,
        timeout_s=timeout_s,
    )


def _rank_main(rank: int, world_size: int, port: int) -> None:
    handle = _join(rank, world_size, port, GROUP_TIMEOUT_S)
    assert (handle.rank, handle.world_size, handle.device.type) == (rank, world_size, "cpu")
    try:
        for scenario in _scenarios(world_size):
            _check_dispatch_combine(scenario, rank, handle.group)
            _check_grouped_experts(scenario, rank, handle.group)
        _check_bad_arguments(rank, handle.group)
    finally:
        handle.destroy()
        handle.destroy()  # idempotent


def _child(rank: int, fn: Callable[..., None], failures: SimpleQueue, *args: object) -> None:
    """Runs one rank and reports its failure instead of dying, so the parent sees every rank's story."""
    try:
        fn(rank, *args)
    except BaseException as exc:
        failures.put((isinstance(exc, CollectiveError), rank, traceback.format_exc()))


def _spawn(fn: Callable[..., None], world_size: int, *args: object) -> None:
    """Runs `fn(rank, world_size, port, *args)` on `world_size` spawned ranks; fails with the root cause
    first (assertions before the `CollectiveError`s they cause on peers)."""
    failures = mp.get_context("spawn").SimpleQueue()
    mp.start_processes(
        _child,
        args=(fn, failures, world_size, free_port(), *args),
        nprocs=world_size,
        start_method="spawn",
    )
    reports = []
    while not failures.empty():
        reports.append(failures.get())
    if reports:
        text = "\n".join(f"--- rank {rank} ---\n{tb}" for _, rank, tb in sorted(reports))
        pytest.fail(f"{len(reports)} of {world_size} ranks failed:\n{text}", pytrace=False)


@pytest.mark.timeout(120)
@pytest.mark.parametrize("world_size", [2, 3, 4])
def test_dispatch_combine_roundtrip(world_size: int) -> None:
    _spawn(_rank_main, world_size)


def _hang_main(rank: int, world_size: int, port: int, stuck: int, released: Event) -> None:
    """Rank `stuck` never joins the collective; its peer, the attention rank (0) waiting for its rows or the
    expert rank (1) waiting for its dispatch, raises CollectiveError within the group timeout."""
    handle = _join(rank, world_size, port, HANG_TIMEOUT_S)
    if rank == stuck:
        released.wait(60)
        return
    try:
        start = time.monotonic()
        no_ids_N = torch.zeros(0, dtype=torch.int64)
        if rank == 0:
            with pytest.raises(CollectiveError, match="asynchronous dispatch/combine failed on rank 0 of 2"):
                send_from_source(torch.zeros(3, D), torch.ones(3, dtype=torch.int64), torch.zeros(3, dtype=torch.int64),
                                 group=handle.group, num_local_experts_max=1, capacity=0, receivers=(1,)).wait()
        else:
            with pytest.raises(CollectiveError, match=r"all_to_all_single \(split sizes\) failed on rank 1 of 2"):
                dispatch_step(torch.zeros(0, D), no_ids_N, no_ids_N, group=handle.group, num_local_experts_max=1,
                              capacity=0, receivers=(1,))
        elapsed = time.monotonic() - start
        assert elapsed < HANG_TIMEOUT_S + 10, f"timed out after {elapsed:.1f}s, timeout {HANG_TIMEOUT_S}s"
    finally:
        released.set()


@pytest.mark.timeout(60)
@pytest.mark.parametrize("stuck", [1, 0], ids=["stuck expert rank", "stuck attention rank"])
def test_stuck_peer_raises_collective_error_within_timeout(stuck: int) -> None:
    released = mp.get_context("spawn").Event()
    _spawn(_hang_main, 2, stuck, released)


@pytest.mark.timeout(30)
def test_rendezvous_without_peers_raises_collective_error() -> None:
    with pytest.raises(CollectiveError, match="rank 0 of 2 could not join the gloo group"):
        create_group(
            backend="gloo",
            init_method=f"tcp://127.0.0.1:{free_port()}",
            rank=0,
            world_size=2,
            timeout_s=0.5,
        )
    assert not dist.is_initialized()


# ---- argument checks: no processes needed ----


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"backend": "mpi"}, "backend must be one of"),
        ({"init_method": "env://"}, "init_method must look like tcp://host:port"),
        ({"rank": 2}, r"rank \(2\) is outside \[0, world_size=2\)"),
        ({"world_size": 0, "rank": 0}, "world_size must be at least 1"),
        ({"timeout_s": 0.0}, "timeout_s must be a positive number"),
    ],
)
def test_create_group_rejects_bad_arguments(overrides: dict[str, object], message: str) -> None:
    kwargs: dict[str, object] = dict(
        backend="gloo", init_method="tcp://127.0.0.1:1", rank=0, world_size=2, timeout_s=1.0
    )
    with pytest.raises(GroupConfigError, match=message):
        create_group(**{**kwargs, **overrides})  # type: ignore[arg-type]
    assert not dist.is_initialized()


def test_free_port_is_bindable() -> None:
    import socket

    port = free_port("127.0.0.1")
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", port))
