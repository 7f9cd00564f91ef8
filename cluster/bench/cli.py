"""`mixserve bench {offline,serve,mixed,failover,balance,capacity,make-model}`: the arguments and the run (measure,
print the tables, write JSON and PNG). cluster/cli.py hands `mixserve bench ...` here, so serving never imports the
bench."""

from __future__ import annotations

import argparse
import math
import os
import sys
from pathlib import Path

import torch

from cluster.bench.balance import BalanceOptions, BalanceReport, format_balance, run_balance
from cluster.bench.capacity import main as print_capacity_tables
from cluster.bench.failover import FailoverOptions, FailoverReport, format_failover, run_failover
from cluster.bench.mixed import MixedOptions, MixedReport, format_mixed, run_mixed
from cluster.bench.offline import OfflineOptions, run_offline
from cluster.bench.plot import plot_report
from cluster.bench.prefix_cache import mismatches
from cluster.bench.report import OfflineReport, ServeReport, format_offline, format_serve, write_json
from cluster.bench.serve import ServeOptions, run_serve
from cluster.bench.workload import PRESETS, EngineSetup, Workload, write_preset
from cluster.expert_balance import RoutingProfile
from cluster.settings import (
    DEFAULT_MODEL_DIR,
    resolve_device,
    resolve_dtype,
    resolve_micro_batches,
    resolve_reserved_cpus,
)
from workers.config import ModelConfig
from workers.runtime.attention_rank import MicroBatching

RAY_NICENESS_ENV = "RAY_worker_niceness"  # read by the raylet that ray.init starts


def _ints(text: str) -> tuple[int, ...]:
    try:
        return tuple(int(t) for t in text.split(",") if t.strip())
    except ValueError as exc:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from exc


def _switches(text: str) -> tuple[bool, ...]:
    values = {"on": True, "off": False}
    try:
        return tuple(values[t.strip()] for t in text.split(",") if t.strip())
    except KeyError as exc:
        raise argparse.ArgumentTypeError(f"expected on, off or a list of them (on,off), got {text!r}") from exc


def _rates(text: str) -> tuple[float, ...]:
    try:
        return tuple(math.inf if t.strip() == "inf" else float(t) for t in text.split(",") if t.strip())
    except ValueError as exc:
        raise argparse.ArgumentTypeError(f"expected comma-separated rates (or inf), got {text!r}") from exc


def _engine_args(p: argparse.ArgumentParser, *, max_batched_tokens: int, workers: tuple[int, ...]) -> None:
    p.add_argument("--model", type=Path, default=DEFAULT_MODEL_DIR, help="Hugging Face Mixtral directory")
    p.add_argument("--seed", type=int, default=0, help="seed of the random prompts")
    p.add_argument("--workers", type=_ints, default=workers,
                   help="Ray expert-worker counts, comma-separated; 0 = experts in the coordinator actor")
    p.add_argument("--coordinators", type=_ints, default=(1,),
                   help="coordinator counts, comma-separated (`mixserve serve --coordinators`): each engine with "
                        "expert workers runs once per count")
    p.add_argument("--device", default="cpu", help="cpu or cuda[:N]")
    p.add_argument("--dtype", default=None, help="float32 (CPU default), bfloat16 (CUDA default), float16")
    p.add_argument("--threads", type=int, default=os.cpu_count() or 1,
                   help="torch threads for every rank and the baseline (all logical CPUs)")
    p.add_argument("--max-batched-tokens", type=int, default=max_batched_tokens,
                   help="tokens per engine step (0: every running prompt in one step, like generate)")
    p.add_argument("--block-size", type=int, default=16, help="KV-cache block size")
    p.add_argument("--compile", action="store_true",
                   help="mixserve engines with in-process experts torch.compile their small (decode) steps, as "
                        "`mixserve serve --compile` does; compiled at each engine's start, before its warm-up")
    p.add_argument("--micro-batches", type=_ints, default=None,
                   help="ping-pong micro-batches of engines with expert workers (`mixserve serve --micro-batches`); "
                        "offline takes a list, e.g. 1,2, and runs each worker count once per value; None: as serve")
    p.add_argument("--micro-batch-min-tokens", type=int, default=MicroBatching().min_tokens,
                   help="`mixserve serve --micro-batch-min-tokens`")
    p.add_argument("--prefix-caching", type=_switches, nargs="?", const=(True,), default="off",
                   help="mixserve engines reuse cached prompt prefixes (`mixserve serve` has it on): off, on, or for "
                        "serve a list (on,off) to run each worker count once per value, side by side. serve warms "
                        "up on other prompts and draws new ones per round and point, so each measurement starts "
                        "cold; offline, mixed and failover warm up on the measured prompts, so there on skips prefill")
    p.add_argument("--no-prefix-caching", dest="prefix_caching", action="store_const", const=(False,),
                   default=argparse.SUPPRESS, help="--prefix-caching off")
    p.add_argument("--warmup-tokens", type=int, default=4, help="tokens per request in each engine's warm-up")
    p.add_argument("--rounds", type=int, default=1,
                   help="measure every engine this many times, interleaved (a shared machine's load then hits all "
                        "alike); offline reports the median, serve and mixed pool the rounds")
    p.add_argument("--timeout", type=float, default=3600.0, help="seconds before a run is abandoned")
    p.add_argument("--ray-address", default=None, help="join this Ray cluster instead of starting one")
    p.add_argument("--ray-worker-niceness", type=int, default=None,
                   help="niceness of the Ray workers of the local Ray the bench starts (default: the bench's own, so "
                        "every engine competes alike with other processes; Ray's default is 15)")
    p.add_argument("--out", type=Path, default=None, help="write the results as JSON here")
    p.add_argument("--markdown", action="store_true", help="print the tables as Markdown")
    p.add_argument("--progress", action=argparse.BooleanOptionalAction, default=True, help="tqdm progress bars")


def _common(p: argparse.ArgumentParser, *, output_len: int, input_len: int) -> None:
    """offline and serve: one prompt length, the transformers baseline, a plot."""
    p.add_argument("--input-len", type=int, default=input_len, help="prompt tokens per request")
    p.add_argument("--output-len", type=int, default=output_len, help="generated tokens per request (exactly)")
    _engine_args(p, max_batched_tokens=0, workers=(0, 1, 2))
    p.add_argument("--transformers", action=argparse.BooleanOptionalAction, default=True,
                   help="measure the transformers baseline in the same run")
    p.add_argument("--plot", type=Path, default=None, help="write a latency-against-throughput PNG here")


def _server_args(p: argparse.ArgumentParser) -> None:
    """serve and mixed: an external server, or the gateway's CPU share."""
    p.add_argument("--target", default=None, help="measure this running server (host:port) instead")
    p.add_argument("--metrics-url", default=None, help="the --target server's /metrics URL")
    p.add_argument("--reserved-cpus", type=int, default=None,
                   help="logical CPUs the mixserve ranks leave to the gateway (they run --threads minus this; the "
                        "transformers baseline runs --threads); default: what `mixserve serve` picks for the model")


def _mixed_args(p: argparse.ArgumentParser) -> None:
    _engine_args(p, max_batched_tokens=1024, workers=(1,))  # 1024: `mixserve serve`'s chunked-prefill budget
    _server_args(p)
    p.add_argument("--short-streams", type=int, default=24, help="short requests, all sent at once")
    p.add_argument("--short-input-len", type=int, default=16, help="prompt tokens per short request")
    p.add_argument("--short-output-len", type=int, default=128,
                   help="generated tokens per short request (exactly): long enough to be decoding as long ones arrive")
    p.add_argument("--long-prompts", type=int, default=6, help="long requests, staggered")
    p.add_argument("--long-input-len", type=int, default=1500, help="prompt tokens per long request")
    p.add_argument("--long-output-len", type=int, default=16, help="generated tokens per long request (exactly)")
    p.add_argument("--long-interval-ms", type=float, default=250.0, help="between two long arrivals")
    p.add_argument("--long-delay-ms", type=float, default=0.0,
                   help="together: the first long arrival this long after every short stream has its first token")


def build_parser() -> argparse.ArgumentParser:
    defaults = argparse.ArgumentDefaultsHelpFormatter
    bench = argparse.ArgumentParser(prog="mixserve bench", formatter_class=defaults,
                                    description="benchmark mixserve against transformers (offline or over gRPC)")
    modes = bench.add_subparsers(dest="bench_mode", required=True)
    off = modes.add_parser("offline", help="N prompts as one batch through every engine", formatter_class=defaults)
    _common(off, output_len=32, input_len=128)
    off.add_argument("--num-prompts", type=int, default=32)
    off.add_argument("--in-process", action=argparse.BooleanOptionalAction, default=True,
                     help="measure the in-process engine (no Ray): the reference for the EP overhead")
    srv = modes.add_parser("serve", help="online serving over gRPC: a concurrency or request-rate sweep",
                           formatter_class=defaults)
    _common(srv, output_len=128, input_len=64)
    load = srv.add_mutually_exclusive_group()
    load.add_argument("--concurrency", type=_ints, default=None,
                      help="closed loop: concurrent streams, e.g. 1,8,32 (1,8,32 unless --request-rate)")
    load.add_argument("--request-rate", type=_rates, default=None, help="open loop: Poisson rates/s, e.g. 1,4,inf")
    srv.add_argument("--num-prompts", type=int, default=0, help="requests per point (0: the concurrency)")
    srv.add_argument("--shared-prefix-len", type=int, default=0,
                     help="every prompt of a point starts with one random prefix of this many tokens, then "
                          "--input-len of its own (a new prefix per round and point, another for the warm-up)")
    _server_args(srv)
    mixed = modes.add_parser("mixed", formatter_class=defaults,
                             help="long prompts arriving over gRPC while short streams decode, against the two "
                                  "groups served apart on the same server (the issue-17 scenario with the defaults "
                                  "and the w1-random preset)")
    _mixed_args(mixed)
    fail = modes.add_parser("failover", formatter_class=defaults,
                            help="SIGKILL a rank during greedy streams over gRPC: the recovery timeline and whether "
                                 "every stream ended with the uninterrupted run's tokens")
    _engine_args(fail, max_batched_tokens=1024, workers=(2,))
    fail.add_argument("--streams", type=int, default=16, help="concurrent greedy streams")
    fail.add_argument("--input-len", type=int, default=16, help="prompt tokens per stream")
    fail.add_argument("--output-len", type=int, default=200, help="generated tokens per stream (exactly)")
    fail.add_argument("--kill", default="worker 1", help='the rank to SIGKILL: "worker N" or "coordinator"')
    fail.add_argument("--kill-after-tokens", type=int, default=8, help="every stream has this many tokens first")
    fail.add_argument("--redundant-experts", type=int, default=0,
                      help="`mixserve serve --redundant-experts`: when the victim's experts all have copies on the "
                           "others, the group fails over to them and the replacement rejoins later (both timed)")
    fail.add_argument("--reserved-cpus", type=int, default=None,
                      help="logical CPUs the ranks leave to the gateway; default: what `mixserve serve` picks")
    bal = modes.add_parser("balance", formatter_class=defaults,
                           help="the expert balancer on the served path: the same greedy streams before, during "
                                "and after one balancer move (busiest worker's share of the rows, expert seconds, "
                                "tokens/s, latency) and what the move cost")
    _engine_args(bal, max_batched_tokens=1024, workers=(2,))
    bal.add_argument("--redundant-experts", type=int, default=2, help="`mixserve serve --redundant-experts`")
    bal.add_argument("--routing-profile", type=Path, default=None, help="`mixserve serve --routing-profile`")
    bal.add_argument("--balance-threshold", type=float, default=0.05, help="`mixserve serve --balance-threshold`")
    bal.add_argument("--num-prompts", type=int, default=32, help="streams per phase")
    bal.add_argument("--concurrency", type=int, default=16, help="concurrent streams (closed loop)")
    bal.add_argument("--input-len", type=int, default=64, help="prompt tokens per stream")
    bal.add_argument("--output-len", type=int, default=64, help="generated tokens per stream (exactly)")
    bal.add_argument("--reserved-cpus", type=int, default=None,
                     help="logical CPUs the ranks leave to the gateway; default: what `mixserve serve` picks")
    modes.add_parser("capacity", formatter_class=defaults,
                     help="print docs/SCALING.md's capacity tables (arithmetic only; run from the repository root)")
    model = modes.add_parser("make-model", help="write a random benchmark checkpoint (kept when present)",
                             formatter_class=defaults)
    model.add_argument("--preset", choices=sorted(PRESETS), required=True)
    model.add_argument("--out", type=Path, required=True)
    model.add_argument("--seed", type=int, default=0)
    model.add_argument("--favour-experts", type=_ints, default=(), metavar="EXPERTS",
                       help="experts, comma-separated (e.g. 2,3), that the router of every layer favours: on random "
                            "prompts of any length they get halfway from their uniform share of the top-k rows to "
                            "all they can take (2 of 8 experts at top-2: about 62%% of the rows instead of 25%%), the "
                            "skewed load that --redundant-experts and the balancer are for. Still an ordinary "
                            "Mixtral checkpoint: scaled token embeddings and a constant hidden dimension that only "
                            "the routers read (cluster/bench/router_skew.py). Recorded in the directory's "
                            "mixserve-bench.json: a directory written favouring other experts (or none) is replaced, "
                            "never reused")
    return bench


def _ray_worker_niceness(args: argparse.Namespace) -> str:
    """Sets the niceness of the workers of a local Ray started from here (not of a cluster joined with
    --ray-address, nor of a Ray this process already runs); returns what the report records."""
    import ray

    if args.ray_address is not None or getattr(args, "target", None) is not None or ray.is_initialized():
        return "the running cluster's"
    niceness = args.ray_worker_niceness if args.ray_worker_niceness is not None else os.nice(0)
    os.environ[RAY_NICENESS_ENV] = str(niceness)
    return str(niceness)


def _reserved_cpus(args: argparse.Namespace) -> int:
    if not hasattr(args, "reserved_cpus"):  # offline: no gateway
        return 0
    return resolve_reserved_cpus(args.reserved_cpus, args.model)


def _micro_batches(args: argparse.Namespace, device: torch.device) -> tuple[int, ...]:
    return args.micro_batches or (resolve_micro_batches(None, device),)


def _engine_setup(args: argparse.Namespace, *, max_num_seqs: int, input_len: int, here: bool) -> EngineSetup:
    """here: something runs on the device in this process (the in-process engine, the transformers baseline)."""
    device = resolve_device(args.device, ranks_run_here=here)
    return EngineSetup(
        model_dir=args.model, device=device, dtype=resolve_dtype(args.dtype, device), threads_per_rank=args.threads,
        max_batched_tokens=args.max_batched_tokens or max_num_seqs * input_len, max_num_seqs=max_num_seqs,
        block_size=args.block_size, warmup_tokens=args.warmup_tokens, rounds=args.rounds,
        progress=args.progress, timeout_s=args.timeout, ray_worker_niceness=_ray_worker_niceness(args),
        reserved_cpus=_reserved_cpus(args), compile_small_steps=args.compile,
        micro_batching=MicroBatching(micro_batches=_micro_batches(args, device)[0],
                                     min_tokens=args.micro_batch_min_tokens),
        prefix_caching=args.prefix_caching[0],
    )


def _one_switch(args: argparse.Namespace) -> None:
    if len(args.prefix_caching) != 1:
        raise ValueError(f"bench {args.bench_mode} runs one prefix-caching setting: give on or off, got "
                         f"{','.join('on' if v else 'off' for v in args.prefix_caching) or 'none'}")


def _offline(args: argparse.Namespace) -> OfflineReport:
    _one_switch(args)
    workload = Workload(num_prompts=args.num_prompts, input_len=args.input_len, output_len=args.output_len,
                        seed=args.seed)
    return run_offline(OfflineOptions(
        setup=_engine_setup(args, max_num_seqs=args.num_prompts, input_len=args.input_len, here=True),
        workload=workload, workers=args.workers, coordinators=args.coordinators, in_process=args.in_process,
        transformers=args.transformers,
        micro_batches=_micro_batches(args, resolve_device(args.device, ranks_run_here=True)),
        ray_address=args.ray_address))


def _serve(args: argparse.Namespace) -> ServeReport:
    concurrency = args.concurrency or (() if args.request_rate else (1, 8, 32))
    in_flight = max(concurrency) if concurrency else args.num_prompts
    if not args.prefix_caching:
        raise ValueError("--prefix-caching: give on, off or on,off")
    setup = _engine_setup(args, max_num_seqs=max(in_flight, 1), input_len=args.shared_prefix_len + args.input_len,
                          here=args.transformers)
    return run_serve(ServeOptions(
        setup=setup, input_len=args.input_len, output_len=args.output_len, num_prompts=args.num_prompts,
        seed=args.seed, concurrency=concurrency, request_rates=args.request_rate or (), workers=args.workers,
        coordinators=args.coordinators, transformers=args.transformers,
        target=args.target, metrics_url=args.metrics_url, ray_address=args.ray_address, timeout_s=args.timeout,
        shared_prefix_len=args.shared_prefix_len, prefix_caching=args.prefix_caching))


def _mixed(args: argparse.Namespace) -> MixedReport:
    _one_switch(args)
    short = Workload(num_prompts=args.short_streams, input_len=args.short_input_len,
                     output_len=args.short_output_len, seed=args.seed)
    long = Workload(num_prompts=args.long_prompts, input_len=args.long_input_len, output_len=args.long_output_len,
                    seed=args.seed + 1)
    setup = _engine_setup(args, max_num_seqs=short.num_prompts + long.num_prompts,
                          input_len=max(short.input_len, long.input_len), here=False)
    return run_mixed(MixedOptions(
        setup=setup, short=short, long=long, long_interval_s=args.long_interval_ms / 1e3,
        long_delay_s=args.long_delay_ms / 1e3, workers=args.workers, target=args.target,
        metrics_url=args.metrics_url, ray_address=args.ray_address, timeout_s=args.timeout))


def _failover(args: argparse.Namespace) -> FailoverReport:
    _one_switch(args)
    if len(args.workers) != 1:
        raise ValueError(f"failover runs one engine: give one --workers count, got {args.workers}")
    workload = Workload(num_prompts=args.streams, input_len=args.input_len, output_len=args.output_len,
                        seed=args.seed)
    setup = _engine_setup(args, max_num_seqs=args.streams, input_len=args.input_len + args.output_len, here=False)
    return run_failover(FailoverOptions(setup=setup, workload=workload, workers=args.workers[0], victim=args.kill,
                                        kill_after_tokens=args.kill_after_tokens, ray_address=args.ray_address,
                                        redundant_experts=args.redundant_experts))


def _balance(args: argparse.Namespace) -> BalanceReport:
    _one_switch(args)
    if len(args.workers) != 1 or len(args.coordinators) != 1:
        raise ValueError(f"balance runs one engine: give one --workers and one --coordinators count, got "
                         f"{args.workers} and {args.coordinators}")
    workload = Workload(num_prompts=args.num_prompts, input_len=args.input_len, output_len=args.output_len,
                        seed=args.seed)
    setup = _engine_setup(args, max_num_seqs=args.concurrency, input_len=args.input_len, here=False)
    profile = None
    if args.routing_profile is not None:
        cfg = ModelConfig.from_model_dir(args.model)
        profile = RoutingProfile.load(args.routing_profile, num_layers=cfg.num_hidden_layers,
                                      num_experts=cfg.num_local_experts)
    return run_balance(BalanceOptions(
        setup=setup, workload=workload, concurrency=args.concurrency, workers=args.workers[0],
        coordinators=args.coordinators[0], redundant_experts=args.redundant_experts, threshold=args.balance_threshold,
        routing_profile=profile, ray_address=args.ray_address))


def main(argv: list[str]) -> int:
    """`mixserve bench` with argv after "bench"; errors are cluster/cli.py's to report."""
    args = build_parser().parse_args(argv)
    if args.bench_mode == "make-model":
        print(write_preset(args.preset, args.out, seed=args.seed, favour_experts=args.favour_experts))
        return 0
    if args.bench_mode == "capacity":
        print_capacity_tables()
        return 0
    torch.set_num_threads(args.threads)
    if args.bench_mode == "offline":
        report = _offline(args)
        print(format_offline(report, markdown=args.markdown))
    elif args.bench_mode == "mixed":
        report = _mixed(args)
        print(format_mixed(report, markdown=args.markdown))
    elif args.bench_mode == "failover":
        report = _failover(args)
        print(format_failover(report, markdown=args.markdown))
    elif args.bench_mode == "balance":
        report = _balance(args)
        print(format_balance(report, markdown=args.markdown))
    else:
        report = _serve(args)
        print(format_serve(report, markdown=args.markdown))
    if args.out is not None:
        write_json(report, args.out)
        print(f"\nresults: {args.out}")
    if getattr(args, "plot", None) is not None:
        plot_report(report, args.plot)
        print(f"plot: {args.plot}")
    if isinstance(report, ServeReport) and (differ := mismatches(report.prefix_cache)):
        print("mixserve bench: error: greedy tokens differ with prefix caching on and off:\n  " + "\n  ".join(differ),
              file=sys.stderr)
        return 1
    return 0
