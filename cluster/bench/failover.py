"""`mixserve bench failover`: what a dead rank costs the clients. Starts a Ray engine and a gateway on
loopback in this process, serves S greedy streams once uninterrupted (the reference tokens), then per round
serves them again and SIGKILLs one rank (`--kill`: "worker N" or "coordinator") once every stream has K
tokens. Reports, from the kill: when the gateway detected the failure (health NOT_SERVING), the restart's
parts (halt the survivors, replace the dead rank, re-form the group), the replay, the first token of a
replayed stream and SERVING again; and how many streams ended with exactly the reference tokens. With
`--redundant-experts`, a dead worker whose experts all have copies elsewhere is left out instead of
replaced (nothing loads before serving resumes); the round then also waits for its replacement to load
beside serving and rejoin, and reports that planned pause.

The kill is a SIGKILL of the rank's process, so the ranks must run on this host (a local Ray).
"""

from __future__ import annotations

import os
import signal
import threading
import time
from dataclasses import dataclass

import grpc
import torch

from cluster.bench import machine
from cluster.bench.machine import RunMeta
from cluster.bench.report import ModelSummary, fmt, join_tables, machine_line, render
from cluster.bench.runners import start_ray_engine
from cluster.bench.serve import BackgroundGateway
from cluster.bench.workload import EngineSetup, Workload, make_prompts
from cluster.rank_introspection import rank_infos
from cluster.ray_session import ray_session
from protos import mixserve_pb2 as pb
from protos import mixserve_pb2_grpc as pb_grpc
from workers.config import ModelConfig


@dataclass(frozen=True, kw_only=True)
class FailoverOptions:
    setup: EngineSetup
    workload: Workload  # the streams, greedy, exactly output_len tokens each
    workers: int = 2
    victim: str = "worker 1"  # a rank name as rank_infos gives it
    kill_after_tokens: int = 8  # every stream has this many tokens when the kill comes
    ray_address: str | None = None
    redundant_experts: int = 0


@dataclass(frozen=True)
class FailoverRound:
    """Seconds from the kill; `replaced` names the ranks the restart replaced."""

    victim: str
    replaced: tuple[str, ...]
    detected_s: float
    halt_s: float
    replace_s: float
    rejoin_s: float
    replayed_s: float
    first_token_s: float
    serving_s: float
    replayed: int
    exact: int  # streams whose tokens equal the uninterrupted run's
    failed: int  # streams that ended with an error
    left_out: tuple[str, ...] = ()  # workers the group ran without (failover onto copies)
    rejoin_pause_s: float = float("nan")  # the planned rejoin: begun to SERVING (nan: nothing was left out)
    rejoin_replayed: int = 0  # streams in flight at the rejoin, replayed
    rejoin_after_s: float = float("nan")  # from the kill until the rejoin began (the replacement's load)


@dataclass(frozen=True)
class FailoverReport:
    mode: str
    meta: RunMeta
    model: ModelSummary
    workload: Workload
    workers: int
    settings: dict[str, str]
    rounds: tuple[FailoverRound, ...]
    redundant_experts: int = 0


class _Streams:
    """The workload's streams in threads; `tokens[i]` grows as stream i receives."""

    def __init__(self, target: str, prompts: list[tuple[int, ...]], output_len: int, timeout_s: float) -> None:
        self.tokens: list[list[int]] = [[] for _ in prompts]
        self.errors: list[str | None] = [None] * len(prompts)
        self._channel = grpc.insecure_channel(target)
        stub = pb_grpc.MixServeStub(self._channel)
        sampling = pb.SamplingParams(max_new_tokens=output_len, temperature=0.0, ignore_eos=True)
        self._threads = [threading.Thread(target=self._run, args=(stub, i, prompt, sampling, timeout_s), daemon=True)
                         for i, prompt in enumerate(prompts)]
        for thread in self._threads:
            thread.start()

    def _run(self, stub, i: int, prompt: tuple[int, ...], sampling, timeout_s: float) -> None:
        try:
            for chunk in stub.GenerateStream(pb.GenerateRequest(prompt_token_ids=prompt, sampling=sampling),
                                             timeout=timeout_s):
                self.tokens[i].extend(chunk.token_ids)
        except grpc.RpcError as exc:
            self.errors[i] = f"{exc.code().name}: {exc.details()}"

    def join(self) -> None:
        for thread in self._threads:
            thread.join()
        self._channel.close()


def _wait(condition, timeout_s: float, what: str) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        if time.monotonic() > deadline:
            raise TimeoutError(f"timed out after {timeout_s}s waiting for {what}")
        time.sleep(0.01)


def _one_round(opts: FailoverOptions, gateway: BackgroundGateway, prompts, reference: list[list[int]]) -> FailoverRound:
    client = gateway.gateway.client
    engine = gateway.engine
    known = len(client.recoveries)
    streams = _Streams(f"127.0.0.1:{gateway.gateway.port}", prompts, opts.workload.output_len,
                       opts.setup.timeout_s)
    _wait(lambda: min(map(len, streams.tokens)) >= opts.kill_after_tokens, opts.setup.timeout_s, "the streams")
    os.kill(rank_infos(engine)[opts.victim].pid, signal.SIGKILL)
    killed = time.monotonic()
    _wait(lambda: len(client.recoveries) > known and client.recoveries[-1].serving_at is not None,
          opts.setup.timeout_s, "the recovery")
    streams.join()
    timeline = client.recoveries[known]
    restart = timeline.restart
    assert restart is not None and timeline.restarted_at is not None and timeline.replayed_at is not None
    first = timeline.first_token_at
    rejoin = None
    if restart.left_out:
        _wait(lambda: len(client.recoveries) > known + 1 and client.recoveries[known + 1].serving_at is not None,
              opts.setup.timeout_s, "the rejoin")
        rejoin = client.recoveries[known + 1]
    return FailoverRound(
        left_out=restart.left_out,
        rejoin_pause_s=rejoin.serving_at - rejoin.failed_at if rejoin else float("nan"),
        rejoin_replayed=rejoin.replayed if rejoin else 0,
        rejoin_after_s=rejoin.failed_at - killed if rejoin else float("nan"),
        victim=opts.victim, replaced=restart.replaced, detected_s=timeline.failed_at - killed,
        halt_s=restart.halt_s, replace_s=restart.replace_s, rejoin_s=restart.join_s,
        replayed_s=timeline.replayed_at - killed, first_token_s=(first - killed) if first else float("nan"),
        serving_s=timeline.serving_at - killed, replayed=timeline.replayed,
        exact=sum(t == r for t, r in zip(streams.tokens, reference, strict=True)),
        failed=sum(e is not None for e in streams.errors))


def run_failover(opts: FailoverOptions) -> FailoverReport:
    start = machine.run_start()
    cfg = ModelConfig.from_model_dir(opts.setup.model_dir)
    torch.set_num_threads(opts.setup.threads_per_rank)
    prompts = make_prompts(opts.workload, cfg.vocab_size)
    rounds = []
    with ray_session(opts.ray_address, opts.workers + 1):  # the coordinator and the workers
        engine = start_ray_engine(cfg, opts.setup, opts.workload, opts.workers,
                                  redundant_experts=opts.redundant_experts)
        try:
            background = BackgroundGateway(engine)
            with background as server:
                reference = _Streams(server.target, prompts, opts.workload.output_len, opts.setup.timeout_s)
                reference.join()
                if any(reference.errors):
                    raise RuntimeError(f"the uninterrupted run failed: {next(filter(None, reference.errors))}")
                for _ in range(opts.setup.rounds):
                    rounds.append(_one_round(opts, background, prompts, reference.tokens))
        finally:
            engine.shutdown()
    return FailoverReport(mode="failover", meta=machine.run_meta(start),
                          model=ModelSummary.of(opts.setup.model_dir, cfg), workload=opts.workload,
                          workers=opts.workers, settings=opts.setup.summary(), rounds=tuple(rounds),
                          redundant_experts=opts.redundant_experts)


def format_failover(report: FailoverReport, *, markdown: bool = False) -> str:
    w = report.workload
    copies = f" (+{report.redundant_experts} expert copies)" if report.redundant_experts else ""
    head = (f"mixserve bench failover · {report.model.path} · {report.workers} expert workers{copies} · "
            f"{w.num_prompts} greedy "
            f"streams × {w.input_len} in / {w.output_len} out · {report.settings['dtype']} on "
            f"{report.settings['device']}\n{machine_line(report.meta)}")
    rows = [[r.victim, ", ".join(r.replaced) or "-", ", ".join(r.left_out) or "-", fmt(r.detected_s),
             fmt(r.halt_s), fmt(r.replace_s), fmt(r.rejoin_s), fmt(r.replayed_s), fmt(r.first_token_s),
             fmt(r.serving_s), str(r.replayed), f"{r.exact}/{w.num_prompts}", str(r.failed)] for r in report.rounds]
    headers = ["killed", "replaced", "left out", "detected s", "halt s", "replace s", "re-form s", "replayed s",
               "next token s", "SERVING s", "replays", "exact streams", "failed"]
    tables = [
        ("", head),
        ("seconds from the SIGKILL (detected, replayed, next token, SERVING); halt, replace and re-form are the "
         "restart's own durations:", render(headers, rows, markdown=markdown, text_columns=3)),
    ]
    rejoins = [[r.victim, ", ".join(r.left_out), fmt(r.rejoin_after_s), fmt(r.rejoin_pause_s), str(r.rejoin_replayed)]
               for r in report.rounds if r.left_out]
    if rejoins:
        tables.append(("the left-out worker's replacement, loaded beside serving, rejoins (a planned pause, health "
                       "SERVING):", render(["killed", "left out", "rejoin began s", "pause s", "replays"], rejoins,
                                           markdown=markdown, text_columns=2)))
    return join_tables(tables)
