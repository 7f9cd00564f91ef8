"""GPU check for a lent H100/H200, in one run of a few minutes:

1. bf16 parity against transformers on a tiny random checkpoint: greedy tokens equal (or differing only
   at a near tie) and teacher-forced logits within tolerance; reports the max relative error.
2. Decode benchmark of two Mixtral-8x7B-sized layers (hidden 4096, ffn 14336, 8 experts top-2, 32 heads /
   8 KV heads), random bf16 weights created on the GPU and shared by mixserve and transformers'
   MixtralModel, at batch 1, 16 and 64, against the bandwidth floor (weight and KV bytes read per step
   over the measured device copy bandwidth).

`--dry-run` runs the same code on CPU with tiny shapes (CI runs it). JSON goes to --out (default $OUT).
Imports torch, transformers and the cluster.bench modules that need neither Ray nor gRPC (gpu, machine, workload).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch

from cluster.bench.gpu import SHAPES, TINY_SPEC, build_rank, build_transformers, check_parity, decode_point
from cluster.bench.machine import copy_bandwidth
from cluster.bench.workload import write_random_mixtral


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--dry-run", action="store_true", help="tiny shapes on CPU (CI)")
    p.add_argument("--out", type=Path, default=Path(os.environ.get("OUT", "gpu_check_out")), help="JSON folder")
    p.add_argument("--device", default=None, help="default: cuda, or cpu with --dry-run")
    p.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16", "float32"])
    p.add_argument("--batches", default=None, help="comma-separated decode batch sizes (default: the preset's)")
    return p.parse_args(argv)


def run_parity(device: torch.device, dtype: torch.dtype) -> dict:
    with tempfile.TemporaryDirectory(prefix="gpu_check_") as tmp:
        model_dir = write_random_mixtral(Path(tmp) / "tiny", TINY_SPEC, initializer_range=0.08)
        return dataclasses.asdict(check_parity(model_dir, device=device, dtype=dtype))


def run_decode(device: torch.device, dtype: torch.dtype, preset: str, batches: tuple[int, ...] | None) -> dict:
    shapes = SHAPES[preset]
    if batches:
        shapes = dataclasses.replace(shapes, batches=batches)
    bandwidth = copy_bandwidth(device, (2 << 30) if device.type == "cuda" else (64 << 20))
    model = build_transformers(shapes, device, dtype)
    rank = build_rank(model, shapes)
    points = []
    for batch in shapes.batches:
        point = decode_point(rank, model, shapes, batch, bandwidth)
        points.append(dataclasses.asdict(point))
        print(f"  batch {batch:3d}: mixserve {1e3 * point.mixserve_step_s:8.2f} ms/step "
              f"({100 * point.mixserve_floor_fraction:5.1f}% of floor), transformers "
              f"{1e3 * point.transformers_step_s:8.2f} ms ({100 * point.transformers_floor_fraction:5.1f}%), "
              f"speedup {point.speedup_vs_transformers:.2f}×, hidden rel err {point.first_step_rel_error:.1e}",
              flush=True)
    return {"preset": preset, "shapes": dataclasses.asdict(shapes), "copy_bandwidth_bytes_per_s": bandwidth,
            "attn_implementation": str(model.config._attn_implementation),
            "experts_implementation": str(getattr(model.config, "_experts_implementation", None)), "points": points}


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    device = torch.device(args.device or ("cpu" if args.dry_run else "cuda"))
    if device.type == "cuda" and not torch.cuda.is_available():
        print("gpu_check: CUDA is not available (use --dry-run on CPU)", file=sys.stderr)
        return 2
    dtype = getattr(torch, args.dtype)
    started = time.perf_counter()
    gpu = torch.cuda.get_device_name(device) if device.type == "cuda" else None
    print(f"gpu_check on {gpu or device} ({args.dtype}){' [dry run]' if args.dry_run else ''}", flush=True)
    parity = run_parity(device, dtype)
    print(f"parity: tokens equal {parity['tokens_equal']} (near ties only: {parity['mismatches_are_near_ties']}), "
          f"max relative logit error {parity['max_rel_error']:.2e} (tolerance {parity['tolerance']:.0e}): "
          f"{'PASS' if parity['passed'] else 'FAIL'}", flush=True)
    batches = tuple(int(b) for b in args.batches.split(",")) if args.batches else None
    decode = run_decode(device, dtype, "dry-run" if args.dry_run else "mixtral-8x7b-2layers", batches)
    result = {"device": str(device), "gpu": gpu, "dtype": args.dtype, "dry_run": args.dry_run,
              "torch": torch.__version__, "seconds": time.perf_counter() - started, "parity": parity,
              "decode": decode, "passed": parity["passed"]}
    args.out.mkdir(parents=True, exist_ok=True)
    path = args.out / ("gpu_check_dry_run.json" if args.dry_run else "gpu_check.json")
    path.write_text(json.dumps(result, indent=2) + "\n")
    print(f"results: {path} ({result['seconds']:.0f} s) — {'PASS' if result['passed'] else 'FAIL'}")
    return 0 if result["passed"] else 1


if __name__ == "__main__":
    sys.exit(main())
