"""The `mixserve` command line: the only place that reads arguments and sets up processes."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

from cluster.engine_factory import build_local_engine
from cluster.errors import MixServeError
from cluster.ray_engine import ClusterOptions, RayExpertParallelEngine
from cluster.ray_session import ray_session
from cluster.requests import GenerationRequest
from cluster.settings import DEFAULT_MODEL_DIR, EngineSettings, resolve_device, resolve_dtype
from cluster.tokenizer import TextTokenizer, require_tokenizer
from workers.config import ModelConfig
from workers.model.checkpoint import CheckpointError
from workers.model.sampler import SamplingParams


def _add_engine_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", type=Path, default=DEFAULT_MODEL_DIR, help="Hugging Face Mixtral directory")
    parser.add_argument("--device", default=None, help="cpu or cuda[:N] (default: cuda if available)")
    parser.add_argument("--dtype", default=None, help="float32 (CPU default), bfloat16 (CUDA default), float16")
    parser.add_argument("--kv-cache-mib", type=int, default=256, help="KV-cache memory budget in MiB")
    parser.add_argument("--threads", type=int, default=None, help="torch intra-op threads for this process")
    parser.add_argument("--workers", type=int, default=0, help="Ray expert workers (0 = experts in-process)")
    parser.add_argument("--placement", default="PACK", help="placement group strategy: PACK, SPREAD, STRICT_*")
    parser.add_argument("--ray-address", default=None, help="join this Ray cluster instead of starting one")
    parser.add_argument("--collective-timeout", type=float, default=20.0, help="seconds before a collective fails")


def _add_sampling_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--max-new-tokens", type=int, default=32)
    parser.add_argument("--temperature", type=float, default=0.0)
    parser.add_argument("--top-k", type=int, default=0)
    parser.add_argument("--top-p", type=float, default=1.0)
    parser.add_argument("--seed", type=int, default=None)
    parser.add_argument("--ignore-eos", action="store_true")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="mixserve", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    gen = sub.add_parser("generate", help="offline generation with an in-process engine")
    _add_engine_args(gen)
    _add_sampling_args(gen)
    source = gen.add_mutually_exclusive_group(required=True)
    source.add_argument("--prompt", help="prompt text (needs tokenizer.json)")
    source.add_argument("--token-ids", help="comma-separated prompt token ids, e.g. 1,2,3")
    gen.add_argument("--json", action="store_true", help="print one JSON object")
    return parser


def _settings(args: argparse.Namespace) -> EngineSettings:
    device = resolve_device(args.device)
    return EngineSettings(
        model_dir=args.model, device=device, dtype=resolve_dtype(args.dtype, device),
        kv_cache_bytes=args.kv_cache_mib * 2**20, num_workers=args.workers,
    )


def _prompt_ids(args: argparse.Namespace, tokenizer: TextTokenizer | None) -> tuple[int, ...]:
    if args.token_ids is not None:
        try:
            return tuple(int(t) for t in args.token_ids.split(",") if t.strip())
        except ValueError as exc:
            raise SystemExit(f"--token-ids must be comma-separated integers: {exc}") from exc
    return tuple(require_tokenizer(tokenizer, "prompt").encode(args.prompt))


def _cluster_options(args: argparse.Namespace) -> ClusterOptions:
    return ClusterOptions(
        num_workers=args.workers, placement_strategy=args.placement, threads_per_rank=args.threads,
        collective_timeout_s=args.collective_timeout,
    )


def run_generate(args: argparse.Namespace) -> int:
    settings = _settings(args)
    cfg = ModelConfig.from_model_dir(settings.model_dir)
    tokenizer = TextTokenizer.from_model_dir(settings.model_dir, cfg.bos_token_id)
    sampling = SamplingParams(temperature=args.temperature, top_k=args.top_k, top_p=args.top_p, seed=args.seed)
    request = GenerationRequest(
        request_id="cli-0", prompt_token_ids=_prompt_ids(args, tokenizer), sampling=sampling,
        max_new_tokens=args.max_new_tokens, ignore_eos=args.ignore_eos,
    )
    if settings.num_workers == 0:
        (result,) = build_local_engine(settings).generate([request])
    else:
        with ray_session(args.ray_address, settings.num_workers), RayExpertParallelEngine(
            settings, _cluster_options(args)
        ) as engine:
            (result,) = engine.generate([request])
    text = tokenizer.decode(result.token_ids) if tokenizer else None
    if args.json:
        print(json.dumps({"token_ids": result.token_ids, "text": text, "finish_reason": result.finish_reason}))
    else:
        print(text if text is not None else " ".join(map(str, result.token_ids)))
    return 0


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    try:
        return {"generate": run_generate}[args.command](args)
    except (MixServeError, CheckpointError, ValueError) as exc:
        print(f"mixserve: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
