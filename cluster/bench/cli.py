"""`mixserve bench {offline,serve,make-model}`: argument parsing and the run; cluster/cli.py only registers it."""

from __future__ import annotations

import argparse
import math
import os
from pathlib import Path

from cluster.bench.checkpoints import PRESETS, write_preset
from cluster.bench.engines import EngineSetup
from cluster.settings import DEFAULT_MODEL_DIR, resolve_device, resolve_dtype


def _ints(text: str) -> tuple[int, ...]:
    try:
        return tuple(int(t) for t in text.split(",") if t.strip())
    except ValueError as exc:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from exc


def _rates(text: str) -> tuple[float, ...]:
    try:
        return tuple(math.inf if t.strip() == "inf" else float(t) for t in text.split(",") if t.strip())
    except ValueError as exc:
        raise argparse.ArgumentTypeError(f"expected comma-separated rates (or inf), got {text!r}") from exc


def _common(p: argparse.ArgumentParser, *, output_len: int, input_len: int) -> None:
    p.add_argument("--model", type=Path, default=DEFAULT_MODEL_DIR, help="Hugging Face Mixtral directory")
    p.add_argument("--input-len", type=int, default=input_len, help="prompt tokens per request")
    p.add_argument("--output-len", type=int, default=output_len, help="generated tokens per request (exactly)")
    p.add_argument("--seed", type=int, default=0, help="seed of the random prompts")
    p.add_argument("--workers", type=_ints, default=(0, 1, 2),
                   help="Ray expert-worker counts, comma-separated; 0 = experts in the coordinator actor")
    p.add_argument("--transformers", action=argparse.BooleanOptionalAction, default=True,
                   help="measure the transformers baseline in the same run")
    p.add_argument("--device", default="cpu", help="cpu or cuda[:N]")
    p.add_argument("--dtype", default=None, help="float32 (CPU default), bfloat16 (CUDA default), float16")
    p.add_argument("--threads", type=int, default=os.cpu_count() or 1,
                   help="torch threads for every rank and the baseline (default: all logical CPUs)")
    p.add_argument("--max-batched-tokens", type=int, default=0,
                   help="tokens per engine step (default: every running prompt in one step, like generate)")
    p.add_argument("--block-size", type=int, default=16, help="KV-cache block size")
    p.add_argument("--compile", action="store_true",
                   help="mixserve engines with in-process experts torch.compile their small (decode) steps, as "
                        "`mixserve serve --compile` does; compiled at each engine's start, before its warm-up")
    p.add_argument("--warmup-tokens", type=int, default=4, help="tokens per request in each engine's warm-up")
    p.add_argument("--rounds", type=int, default=1,
                   help="measure every engine this many times, interleaved (a shared machine's load then hits all "
                        "alike); offline reports the median, serve pools the rounds")
    p.add_argument("--timeout", type=float, default=3600.0, help="seconds before a run is abandoned")
    p.add_argument("--ray-address", default=None, help="join this Ray cluster instead of starting one")
    p.add_argument("--ray-worker-niceness", type=int, default=None,
                   help="niceness of the Ray workers of the local Ray the bench starts (default: the bench's own, so "
                        "every engine competes alike with other processes; Ray's default is 15)")
    p.add_argument("--out", type=Path, default=None, help="write the results as JSON here")
    p.add_argument("--plot", type=Path, default=None, help="write a latency-against-throughput PNG here")
    p.add_argument("--markdown", action="store_true", help="print the tables as Markdown")
    p.add_argument("--progress", action=argparse.BooleanOptionalAction, default=True, help="tqdm progress bars")


def add_bench_parser(sub: argparse._SubParsersAction) -> None:
    bench = sub.add_parser("bench", help="benchmark mixserve against transformers (offline or over gRPC)")
    modes = bench.add_subparsers(dest="bench_mode", required=True)
    off = modes.add_parser("offline", help="N prompts as one batch through every engine")
    _common(off, output_len=32, input_len=128)
    off.add_argument("--num-prompts", type=int, default=32)
    off.add_argument("--in-process", action=argparse.BooleanOptionalAction, default=True,
                     help="measure the in-process engine (no Ray): the reference for the EP overhead")
    srv = modes.add_parser("serve", help="online serving over gRPC: a concurrency or request-rate sweep")
    _common(srv, output_len=128, input_len=64)
    load = srv.add_mutually_exclusive_group()
    load.add_argument("--concurrency", type=_ints, default=None, help="closed loop: concurrent streams, e.g. 1,8,32")
    load.add_argument("--request-rate", type=_rates, default=None, help="open loop: Poisson rates/s, e.g. 1,4,inf")
    srv.add_argument("--num-prompts", type=int, default=0, help="requests per point (default: the concurrency)")
    srv.add_argument("--target", default=None, help="measure this running server (host:port) instead")
    srv.add_argument("--metrics-url", default=None, help="the --target server's /metrics URL")
    srv.add_argument("--reserved-cpus", type=int, default=1,
                     help="logical CPUs the mixserve ranks leave to the gateway, as `mixserve serve` does by default "
                          "(they run --threads minus this; the transformers baseline runs --threads)")
    model = modes.add_parser("make-model", help="write a random benchmark checkpoint (kept when present)")
    model.add_argument("--preset", choices=sorted(PRESETS), required=True)
    model.add_argument("--out", type=Path, required=True)
    model.add_argument("--seed", type=int, default=0)


RAY_NICENESS_ENV = "RAY_worker_niceness"  # read by the raylet that ray.init starts


def ray_worker_niceness(args: argparse.Namespace) -> str:
    """Sets the niceness of the workers of a local Ray started from here (not of a cluster joined with
    --ray-address, nor of a Ray this process already runs); returns what the report records."""
    import ray

    if args.ray_address is not None or getattr(args, "target", None) is not None or ray.is_initialized():
        return "the running cluster's"
    niceness = args.ray_worker_niceness if args.ray_worker_niceness is not None else os.nice(0)
    os.environ[RAY_NICENESS_ENV] = str(niceness)
    return str(niceness)


def engine_setup(args: argparse.Namespace, *, max_num_seqs: int) -> EngineSetup:
    device = resolve_device(args.device)
    return EngineSetup(
        model_dir=args.model, device=device, dtype=resolve_dtype(args.dtype, device), threads_per_rank=args.threads,
        max_batched_tokens=args.max_batched_tokens or max_num_seqs * args.input_len, max_num_seqs=max_num_seqs,
        block_size=args.block_size, warmup_tokens=args.warmup_tokens, rounds=args.rounds,
        progress=args.progress, timeout_s=args.timeout, ray_worker_niceness=ray_worker_niceness(args),
        reserved_cpus=getattr(args, "reserved_cpus", 0), compile_small_steps=args.compile,
    )


def run_bench(args: argparse.Namespace) -> int:
    if args.bench_mode == "make-model":
        print(write_preset(args.preset, args.out, seed=args.seed))
        return 0
    from cluster.bench.run import run_offline_command, run_serve_command

    return run_offline_command(args) if args.bench_mode == "offline" else run_serve_command(args)
