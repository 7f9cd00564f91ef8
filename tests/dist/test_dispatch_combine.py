"""Expert-parallel dispatch / combine on real gloo ranks, checked row by row against a Python oracle.

Each spawned rank builds every rank's inputs from fixed seeds, so it can compute exactly which rows it
must receive, in which order, and what must come back. Payloads are rank-encoded
(src_rank * 1000 + row + feature / 1000); senders and receivers are uneven, some ranks send no rows,
some receive none, some local experts get none. Every failing rank sends its traceback back through a
queue and the parent fails with the root cause first; the group timeout keeps a bug from hanging the suite.

Shape legend: N rows sent, M rows received, D model dim, R ranks, e local experts (e_max the max).
"""

from __future__ import annotations

import contextlib
import time
import traceback
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from multiprocessing.queues import SimpleQueue
from multiprocessing.synchronize import Event

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from workers.comm import (
    CollectiveError,
    DispatchError,
    GroupConfigError,
    ProcessGroupHandle,
    combine,
    counts_if_grouped,
    create_group,
    dispatch_rows,
    free_port,
)

D = 4
GROUP_TIMEOUT_S = 20.0  # covers interpreter start-up skew at rendezvous; collectives finish in ms
HANG_TIMEOUT_S = 2.0


@dataclass(frozen=True)
class Scenario:
    name: str
    seed: int
    experts_per_rank: tuple[int, ...]  # [R] local experts each rank holds
    rows_per_rank: tuple[int, ...]  # [R] rows each rank sends
    receivers: tuple[int, ...]  # ranks that may be sent rows
    dtype: torch.dtype = torch.float64

    @property
    def num_local_experts_max(self) -> int:
        return max(max(self.experts_per_rank), 1)


def _scenarios(world_size: int) -> list[Scenario]:
    workers = world_size - 1
    base, extra = divmod(8, workers)  # 8 experts on the workers, contiguous placement
    mixserve_experts = (0, *(base + (w < extra) for w in range(workers)))
    idle_worker = (2,) if world_size >= 4 else ()  # a worker nothing is routed to
    return [
        Scenario(
            name="mixserve: only rank 0 sends, to workers",
            seed=1,
            experts_per_rank=mixserve_experts,
            rows_per_rank=(37, *(0 for _ in range(workers))),
            receivers=tuple(r for r in range(1, world_size) if r not in idle_worker),
        ),
        Scenario(
            name="all-to-all: uneven, last rank silent, rank 1 idle",
            seed=2,
            experts_per_rank=tuple(1 + r % 3 for r in range(world_size)),
            rows_per_rank=tuple(0 if r == world_size - 1 else 5 + 7 * r for r in range(world_size)),
            receivers=tuple(r for r in range(world_size) if world_size < 3 or r != 1),
        ),
        Scenario(
            name="float32 all ranks send to all",
            seed=3,
            experts_per_rank=tuple(2 for _ in range(world_size)),
            rows_per_rank=tuple(3 + r for r in range(world_size)),
            receivers=tuple(range(world_size)),
            dtype=torch.float32,
        ),
        Scenario(
            name="empty step: nobody sends",
            seed=4,
            experts_per_rank=(2, *(1 for _ in range(workers))),
            rows_per_rank=tuple(0 for _ in range(world_size)),
            receivers=tuple(range(world_size)),
        ),
    ]


@dataclass(frozen=True)
class RankInput:
    x_ND: torch.Tensor
    dest_rank_N: torch.Tensor
    dest_local_expert_N: torch.Tensor


def _make_input(scenario: Scenario, src: int) -> RankInput:
    gen = torch.Generator().manual_seed(100 * scenario.seed + src)
    num_rows = scenario.rows_per_rank[src]
    receivers = torch.tensor(scenario.receivers, dtype=torch.int64)
    dest_rank_N = receivers[torch.randint(len(receivers), (num_rows,), generator=gen)]
    # Leave the last local expert of ranks with several experts empty, so zero counts show up.
    usable_N = torch.tensor([max(scenario.experts_per_rank[r] - 1, 1) for r in dest_rank_N.tolist()])
    dest_local_expert_N = (torch.rand(num_rows, generator=gen) * usable_N).long()
    x_ND = src * 1000 + torch.arange(num_rows, dtype=torch.float64)[:, None] + torch.arange(D) / 1000
    return RankInput(x_ND.to(scenario.dtype), dest_rank_N, dest_local_expert_N)


def _expected_received(scenario: Scenario, dst: int) -> tuple[torch.Tensor, list[list[int]]]:
    """Oracle: (x_MD, counts_RE) rank `dst` must receive, by source then local expert."""
    rows, counts = [], []
    for src in range(len(scenario.rows_per_rank)):
        inp = _make_input(scenario, src)
        mine = [i for i in range(inp.x_ND.shape[0]) if int(inp.dest_rank_N[i]) == dst]
        mine.sort(key=lambda i: int(inp.dest_local_expert_N[i]))  # stable: keeps row order per expert
        mine_experts = [int(inp.dest_local_expert_N[i]) for i in mine]
        rows += [inp.x_ND[i] for i in mine]
        counts.append([mine_experts.count(j) for j in range(scenario.num_local_experts_max)])
    x_MD = torch.stack(rows) if rows else torch.empty(0, D, dtype=scenario.dtype)
    return x_MD, counts


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


def _check_dispatch_combine(scenario: Scenario, rank: int, group: dist.ProcessGroup) -> None:
    where = f"[{scenario.name}] rank {rank}"
    inp = _make_input(scenario, rank)
    with _count_collectives() as calls:
        recv_x_MD, plan = dispatch_rows(
            inp.x_ND,
            inp.dest_rank_N,
            inp.dest_local_expert_N,
            group=group,
            num_local_experts_max=scenario.num_local_experts_max,
        )
    assert calls == {**dict.fromkeys(calls, 0), "all_to_all_single": 2}, f"{where}: dispatch ran {calls}"
    expected_x_MD, expected_counts = _expected_received(scenario, rank)
    assert recv_x_MD.dtype == scenario.dtype and recv_x_MD.shape == expected_x_MD.shape, (
        f"{where}: received {recv_x_MD.dtype} {tuple(recv_x_MD.shape)}, expected {tuple(expected_x_MD.shape)}"
    )
    assert torch.equal(recv_x_MD, expected_x_MD), f"{where}: received\n{recv_x_MD}\nexpected\n{expected_x_MD}"
    assert plan.recv_counts_RE.tolist() == expected_counts, f"{where}: recv counts {plan.recv_counts_RE}"
    assert plan.output_splits == tuple(sum(c) for c in expected_counts), f"{where}: {plan.output_splits}"
    assert plan.input_splits == tuple(
        int((inp.dest_rank_N == r).sum()) for r in range(len(scenario.rows_per_rank))
    ), f"{where}: input splits {plan.input_splits}"

    y_MD = recv_x_MD * 2 + rank  # this receiver's "expert"
    with _count_collectives() as calls:
        y_ND = combine(y_MD, plan, group=group)
    assert calls == {**dict.fromkeys(calls, 0), "all_to_all_single": 1}, f"{where}: combine ran {calls}"
    expected_y_ND = inp.x_ND * 2 + inp.dest_rank_N[:, None].to(scenario.dtype)
    assert y_ND.dtype == scenario.dtype and y_ND.shape == inp.x_ND.shape, f"{where}: combine {y_ND.shape}"
    assert torch.equal(y_ND, expected_y_ND), f"{where}: combined\n{y_ND}\nexpected\n{expected_y_ND}"


def _local_experts_of(recv_counts_RE: torch.Tensor) -> torch.Tensor:
    """Local expert of each received row, given rows arrive by source rank, then by local expert."""
    experts = [j for counts in recv_counts_RE.tolist() for j, count in enumerate(counts) for _ in range(count)]
    return torch.tensor(experts, dtype=torch.int64)


def _check_grouped_experts(scenario: Scenario, rank: int, group: dist.ProcessGroup) -> None:
    """An expert rank runs one op per local expert over the rows as received, then combines. Rows from a
    single source arrive grouped by local expert and `counts_if_grouped` gives their counts (the expert
    rank's path); rows from several sources are not grouped, and it says so."""
    where = f"[{scenario.name}] grouped, rank {rank}"
    inp = _make_input(scenario, rank)
    recv_x_MD, plan = dispatch_rows(
        inp.x_ND, inp.dest_rank_N, inp.dest_local_expert_N, group=group,
        num_local_experts_max=scenario.num_local_experts_max,
    )
    num_local = scenario.experts_per_rank[rank]
    local_expert_M = _local_experts_of(plan.recv_counts_RE)
    counts_e = counts_if_grouped(plan, num_local_experts=num_local)
    sources = [src for src in range(len(scenario.rows_per_rank)) if plan.output_splits[src]]
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
    y_ND = combine(y_MD, plan, group=group)
    expected_y_ND = inp.x_ND * 2 + (inp.dest_rank_N * 100 + inp.dest_local_expert_N)[:, None].to(
        scenario.dtype
    )
    assert torch.equal(y_ND, expected_y_ND), f"{where}: combined\n{y_ND}\nexpected\n{expected_y_ND}"


def _check_bad_arguments(rank: int, group: dist.ProcessGroup) -> None:
    """Bad routes and row counts are rejected on the calling rank before any collective (every rank checks
    its own, then all build one empty plan together for the combine check)."""
    bad_routes = [
        ([1, 1, 9], [0, 1, 0], 3, "row 2 is routed to rank 9, local expert 0, outside"),
        ([1, 1, 1], [0, 4, 0], 3, "row 1 is routed to rank 1, local expert 4"),
        ([1, 1, 1], [0, -1, 0], 3, "row 1 is routed to rank 1, local expert -1"),
        ([1, 1], [0, 1, 0], 3, "dest_rank_N has 2 rows but dest_local_expert_N has 3"),
        ([1, 1, 1], [0, 1, 0], 2, r"x_ND must have shape \[3, D\], got \(2, 4\)"),
        ([1.0, 1.0], [0, 1], 2, "dest_rank_N must be a 1-D integer tensor"),
    ]
    for dest_rank, dest_expert, rows, message in bad_routes:
        with pytest.raises(DispatchError, match=message):
            dispatch_rows(torch.zeros(rows, D), torch.tensor(dest_rank), torch.tensor(dest_expert), group=group,
                          num_local_experts_max=4)
    _, plan = dispatch_rows(torch.zeros(0, D), torch.zeros(0, dtype=torch.int64), torch.zeros(0, dtype=torch.int64),
                            group=group, num_local_experts_max=1)
    with pytest.raises(DispatchError, match=rf"y_MD must have shape \[{plan.num_received}, D\]"):
        combine(torch.zeros(plan.num_received + 1, D), plan, group=group)


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


def _hang_main(rank: int, world_size: int, port: int, released: Event) -> None:
    handle = _join(rank, world_size, port, HANG_TIMEOUT_S)
    if rank != 0:
        released.wait(60)  # a stuck worker: never joins the collective
        return
    try:
        start = time.monotonic()
        x_ND = torch.zeros(3, D)
        with pytest.raises(CollectiveError, match=r"all_to_all_single \(split sizes\) failed on rank 0 of 2"):
            dispatch_rows(
                x_ND,
                torch.ones(3, dtype=torch.int64),
                torch.zeros(3, dtype=torch.int64),
                group=handle.group,
                num_local_experts_max=1,
            )
        elapsed = time.monotonic() - start
        assert elapsed < HANG_TIMEOUT_S + 10, f"timed out after {elapsed:.1f}s, timeout {HANG_TIMEOUT_S}s"
    finally:
        released.set()


@pytest.mark.timeout(60)
def test_stuck_peer_raises_collective_error_within_timeout() -> None:
    released = mp.get_context("spawn").Event()
    _spawn(_hang_main, 2, released)


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
