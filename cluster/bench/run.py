"""Runs a parsed `mixserve bench offline|serve` command: measure, print the tables, write JSON and PNG."""

from __future__ import annotations

import argparse

import torch

from cluster.bench.cli import engine_setup
from cluster.bench.offline import OfflineOptions, run_offline
from cluster.bench.offline_report import format_offline
from cluster.bench.plots import plot_offline, plot_serve
from cluster.bench.results import write_json
from cluster.bench.serve import run_serve
from cluster.bench.serve_report import format_serve
from cluster.bench.serve_types import ServeOptions
from cluster.bench.workload import Workload


def run_offline_command(args: argparse.Namespace) -> int:
    torch.set_num_threads(args.threads)
    workload = Workload(num_prompts=args.num_prompts, input_len=args.input_len, output_len=args.output_len,
                        seed=args.seed)
    opts = OfflineOptions(setup=engine_setup(args, max_num_seqs=args.num_prompts), workload=workload,
                          workers=args.workers, in_process=args.in_process, transformers=args.transformers,
                          ray_address=args.ray_address)
    report = run_offline(opts)
    print(format_offline(report, markdown=args.markdown))
    _write(report, args, plot_offline)
    return 0


def run_serve_command(args: argparse.Namespace) -> int:
    torch.set_num_threads(args.threads)
    concurrency = args.concurrency or (() if args.request_rate else (1, 8, 32))
    in_flight = max(concurrency) if concurrency else args.num_prompts
    opts = ServeOptions(
        setup=engine_setup(args, max_num_seqs=max(in_flight, 1)), input_len=args.input_len,
        output_len=args.output_len, num_prompts=args.num_prompts, seed=args.seed, concurrency=concurrency,
        request_rates=args.request_rate or (), workers=args.workers, transformers=args.transformers,
        target=args.target, metrics_url=args.metrics_url, ray_address=args.ray_address, timeout_s=args.timeout,
    )
    report = run_serve(opts)
    print(format_serve(report, markdown=args.markdown))
    _write(report, args, plot_serve)
    return 0


def _write(report, args: argparse.Namespace, plot) -> None:
    if args.out is not None:
        write_json(report, args.out)
        print(f"\nresults: {args.out}")
    if args.plot is not None:
        plot(report, args.plot)
        print(f"plot: {args.plot}")
