"""The `mixserve` command line: the only place that reads arguments and sets up processes."""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from pathlib import Path

import torch

from cluster.allocator import MallocSettings
from cluster.chat_template import ChatTemplate
from cluster.cpu_tuning import CpuPolicy
from cluster.engine_factory import build_local_engine
from cluster.errors import MixServeError, WorkerStartError
from cluster.expert_balance import RoutingProfile
from cluster.gateway.security import DEFAULT_MAX_MESSAGE_BYTES, SecurityOptions, load_api_keys, load_security
from cluster.gateway.validation import RequestLimits
from cluster.ray_engine import ClusterOptions, RayExpertParallelEngine
from cluster.ray_session import ray_session
from cluster.requests import GenerationRequest
from cluster.scheduler import SchedulerConfig
from cluster.settings import (
    DEFAULT_MODEL_DIR,
    EngineSettings,
    resolve_device,
    resolve_dtype,
    resolve_micro_batches,
    resolve_reserved_cpus,
)
from cluster.tokenizer import TextTokenizer, require_tokenizer
from workers.config import ModelConfig
from workers.model.checkpoint import CheckpointError
from workers.model.fused_decode import CompileFailed
from workers.model.sampler import SamplingParams
from workers.runtime.attention_rank import MicroBatching

DEFAULTS = argparse.ArgumentDefaultsHelpFormatter  # every option's help shows its default
API_KEY_ENV = "MIXSERVE_API_KEY"  # read by `mixserve client` only, when --api-key-file is not given


def _add_engine_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", type=Path, default=DEFAULT_MODEL_DIR, help="Hugging Face Mixtral directory")
    parser.add_argument("--device", default=None, help="cpu or cuda[:N] (default: cuda if available)")
    parser.add_argument("--dtype", default=None, help="float32 (CPU default), bfloat16 (CUDA default), float16")
    parser.add_argument("--kv-cache-mib", type=int, default=None,
                        help="KV-cache memory budget in MiB; None: 256 on CPU, on CUDA what "
                             "--gpu-memory-utilization leaves after the weights")
    parser.add_argument("--gpu-memory-utilization", type=float, default=0.9,
                        help="CUDA without --kv-cache-mib: the share of the device's memory mixserve may hold "
                             "(weights, activations and the KV cache, which gets the rest)")
    parser.add_argument("--threads", type=int, default=None, help="torch intra-op threads for this process")
    parser.add_argument("--workers", type=int, default=0, help="Ray expert workers (0 = experts in-process)")
    parser.add_argument("--coordinators", type=int, default=1,
                        help="attention ranks sharing the expert workers, each with its own scheduler and KV cache "
                             "(the gateway places each request on the least loaded); more than 1 needs --workers")
    parser.add_argument("--redundant-experts", type=int, default=0,
                        help="extra physical expert copies (replicas) spread over the expert workers: copies of "
                             "experts 0, 1, ... in turn; each expert's rows are split between its copies, and "
                             "--workers may exceed the experts; a dead worker whose experts all have copies "
                             "elsewhere is left out at once and its replacement rejoins later; needs --workers")
    parser.add_argument("--routing-profile", type=Path, default=None,
                        help="place the expert copies for this routing profile (JSON rows per layer and expert, "
                             "written by `serve --save-routing-profile`): hot experts get the redundant copies and "
                             "the copies are spread to even out the workers' rows; None: contiguous blocks; needs "
                             "--workers")
    parser.add_argument("--placement", default="PACK", help="placement group strategy: PACK, SPREAD, STRICT_*")
    parser.add_argument("--ray-address", default=None, help="join this Ray cluster instead of starting one")
    parser.add_argument("--collective-timeout", type=float, default=20.0, help="seconds before a collective fails")
    parser.add_argument("--compile", action="store_true",
                        help="torch.compile the layers of small (decode) steps when the experts are in-process "
                             "(--workers 0); compiles at start")
    parser.add_argument("--micro-batches", type=int, default=None,
                        help="ping-pong with expert workers: split a step into this many micro-batches whose "
                             "attention overlaps the others' experts; 1 turns overlap off; None: 2 on CUDA, 1 on "
                             "CPU (where the ranks share the cores, measured no faster)")
    parser.add_argument("--micro-batch-min-tokens", type=int, default=MicroBatching().min_tokens,
                        help="split only steps whose micro-batches get at least this many tokens each (smaller "
                             "steps are bound by the experts' weight reads, which a split repeats)")


def _add_sampling_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--max-new-tokens", type=int, default=32)
    parser.add_argument("--temperature", type=float, default=0.0)
    parser.add_argument("--top-k", type=int, default=0)
    parser.add_argument("--top-p", type=float, default=1.0)
    parser.add_argument("--seed", type=int, default=None)
    parser.add_argument("--ignore-eos", action="store_true")


def _add_serve_security_args(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("security", "TLS, API keys and request limits (see cluster/gateway/security.py)")
    group.add_argument("--tls-cert", type=Path, default=None, help="PEM server certificate chain; enables TLS")
    group.add_argument("--tls-key", type=Path, default=None, help="PEM private key of --tls-cert")
    group.add_argument("--tls-client-ca", type=Path, default=None,
                       help="PEM CA bundle; clients must present a certificate it signed (mTLS)")
    group.add_argument("--api-keys-file", type=Path, default=None,
                       help="one key per line ('#' comments, blank lines ignored); every MixServe RPC then needs "
                            "metadata 'authorization: Bearer <key>', every /v1 HTTP request the header "
                            "'Authorization: Bearer <key>'; health and reflection stay open")
    group.add_argument("--max-message-bytes", type=int, default=DEFAULT_MAX_MESSAGE_BYTES,
                       help="largest gRPC request (larger gets RESOURCE_EXHAUSTED) or HTTP body (larger gets 413) "
                            "accepted")
    group.add_argument("--max-prompt-chars", type=int, default=RequestLimits().max_prompt_chars,
                       help="longest text prompt accepted (longer gets INVALID_ARGUMENT)")
    group.add_argument("--health-port", type=int, default=None,
                       help="also serve grpc.health.v1 alone, in plaintext, on this port (Kubernetes gRPC probes "
                            "cannot speak TLS)")


def _add_client_security_args(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("security")
    group.add_argument("--tls", action="store_true", help="use TLS, verifying the server with the system roots")
    group.add_argument("--tls-ca", type=Path, default=None, help="PEM CA bundle that signed the server; implies --tls")
    group.add_argument("--tls-cert", type=Path, default=None, help="PEM client certificate (for mTLS)")
    group.add_argument("--tls-key", type=Path, default=None, help="PEM private key of --tls-cert")
    group.add_argument("--tls-server-name", default=None, help="expected name in the server certificate")
    group.add_argument("--api-key-file", type=Path, default=None,
                       help=f"file holding the API key (default: ${API_KEY_ENV} if set)")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="mixserve", formatter_class=DEFAULTS,
        description="Serve Mixtral-family mixture-of-experts models with expert parallelism on Ray: gRPC and the "
                    "OpenAI HTTP API, Prometheus metrics, requests that survive a dead rank. Start with "
                    "`mixserve serve` (the embedded default model) and `mixserve client`.")
    sub = parser.add_subparsers(dest="command", required=True)
    gen = sub.add_parser("generate", help="offline generation with an in-process engine", formatter_class=DEFAULTS)
    _add_engine_args(gen)
    _add_sampling_args(gen)
    source = gen.add_mutually_exclusive_group(required=True)
    source.add_argument("--prompt", help="prompt text (needs tokenizer.json)")
    source.add_argument("--token-ids", help="comma-separated prompt token ids, e.g. 1,2,3")
    gen.add_argument("--json", action="store_true", help="print one JSON object")

    srv = sub.add_parser("serve", help="serve the gRPC and OpenAI-compatible HTTP APIs (gateway + Ray coordinator and "
                                       "expert workers)",
                         formatter_class=DEFAULTS)
    _add_engine_args(srv)
    srv.add_argument("--host", default="127.0.0.1", help="gRPC and HTTP bind address (0.0.0.0 for all interfaces)")
    srv.add_argument("--port", type=int, default=50051, help="gRPC port")
    srv.add_argument("--http-port", type=int, default=8000,
                     help="OpenAI-compatible HTTP API port (/v1/models, /v1/completions, /v1/chat/completions); "
                          "0 picks a free port")
    srv.add_argument("--no-http", action="store_true", help="serve gRPC only: no HTTP API")
    srv.add_argument("--metrics-host", default="127.0.0.1",
                     help="metrics bind address (0.0.0.0 in Kubernetes, so Prometheus can scrape the pod IP)")
    srv.add_argument("--metrics-port", type=int, default=9400)
    srv.add_argument("--max-num-seqs", type=int, default=64, help="sequences in one batch at most")
    srv.add_argument("--max-batched-tokens", type=int, default=1024, help="tokens per engine step (chunked prefill)")
    srv.add_argument("--max-waiting", type=int, default=256, help="waiting queue bound (then RESOURCE_EXHAUSTED)")
    srv.add_argument("--prefix-caching", action=argparse.BooleanOptionalAction, default=True,
                     help="reuse the KV blocks of shared prompt prefixes (system prompts, multi-turn chats); "
                          "--no-prefix-caching turns it off")
    srv.add_argument("--max-new-tokens-limit", type=int, default=4096)
    srv.add_argument("--grace", type=float, default=30.0, help="seconds in-flight streams get on SIGTERM")
    srv.add_argument("--chat-template", type=Path, default=None,
                     help="Jinja chat template file for chat requests (gRPC `messages`); None: the model's "
                          "chat_template.jinja or tokenizer_config.json chat_template")
    srv.add_argument("--replay-timeout", type=float, default=60.0,
                     help="seconds a request in flight waits, after an engine failure, to be replayed on the "
                          "recovered engine before it fails with UNAVAILABLE")
    srv.add_argument("--rejoin-delay", type=float, default=0.0,
                     help="after a failover onto surviving expert copies (--redundant-experts): seconds between the "
                          "dead worker's replacement being loaded and its rejoin, a short pause that replays the "
                          "streams in flight")
    srv.add_argument("--reserved-cpus", type=int, default=None,
                     help="logical CPUs the ranks on this host leave to the gateway: they run that many fewer torch "
                          "threads (at least 1); None: 1 for models of under 50M active parameters per token, "
                          "whose tokens are cheap next to streaming them, else 0 (measured: docs/PERFORMANCE.md)")
    balance = srv.add_argument_group("expert balancer", "moves expert copies to follow the traffic while serving "
                                     "(docs/SCALING.md, 'Expert replicas and the balancer')")
    balance.add_argument("--balance-interval", type=float, default=0.0,
                         help="seconds between balancer runs; each plans a placement from the routed rows of the "
                              "window and moves copies when it pays; 0: off; needs --workers")
    balance.add_argument("--balance-window", type=float, default=300.0,
                         help="seconds of routed rows (a sliding window) each balancer run plans from")
    balance.add_argument("--balance-threshold", type=float, default=0.05,
                         help="move only when the predicted imbalance (sum over layers of the busiest worker's rows "
                              "over the mean) drops by more than this share")
    balance.add_argument("--save-routing-profile", type=Path, default=None,
                         help="at shutdown, write the rows routed per layer and expert since start to this JSON file "
                              "(for a later --routing-profile)")
    _add_serve_security_args(srv)

    cli = sub.add_parser("client", help="stream a completion from a running server", formatter_class=DEFAULTS)
    cli.add_argument("--target", default="127.0.0.1:50051")
    source = cli.add_mutually_exclusive_group(required=True)
    source.add_argument("--prompt")
    source.add_argument("--token-ids")
    _add_sampling_args(cli)
    cli.add_argument("--stop", action="append", default=[], help="stop string (repeatable)")
    cli.add_argument("--timeout", type=float, default=120.0, help="deadline in seconds")
    _add_client_security_args(cli)
    # Registered for `mixserve --help` only: main() hands `mixserve bench ...` to cluster.bench.cli before this
    # parser runs, so serving never imports the bench (or its extra dependencies).
    sub.add_parser("bench", add_help=False,
                   help="benchmark mixserve against transformers (offline or over gRPC); see `mixserve bench --help`")
    return parser


def _settings(args: argparse.Namespace) -> EngineSettings:
    in_process = args.command == "generate" and args.workers == 0  # `serve` always runs its ranks as Ray actors
    device = resolve_device(args.device, ranks_run_here=in_process)
    return EngineSettings(
        model_dir=args.model, device=device, dtype=resolve_dtype(args.dtype, device),
        kv_cache_bytes=None if args.kv_cache_mib is None else args.kv_cache_mib * 2**20,
        gpu_memory_utilization=args.gpu_memory_utilization, num_workers=args.workers,
        compile_small_steps=args.compile,
        micro_batching=MicroBatching(micro_batches=resolve_micro_batches(args.micro_batches, device),
                                     min_tokens=args.micro_batch_min_tokens),
    )


def _prompt_ids(args: argparse.Namespace, tokenizer: TextTokenizer | None) -> tuple[int, ...]:
    if args.token_ids is not None:
        try:
            return tuple(int(t) for t in args.token_ids.split(",") if t.strip())
        except ValueError as exc:
            raise SystemExit(f"--token-ids must be comma-separated integers: {exc}") from exc
    return tuple(require_tokenizer(tokenizer, "prompt").encode(args.prompt))


def _cluster_options(args: argparse.Namespace) -> ClusterOptions:
    """The scale flags, checked against the model's experts before anything starts."""
    cfg = ModelConfig.from_model_dir(args.model)
    profile = None
    if args.routing_profile is not None:
        profile = RoutingProfile.load(args.routing_profile, num_layers=cfg.num_hidden_layers,
                                      num_experts=cfg.num_local_experts)
    options = ClusterOptions(
        num_workers=args.workers, num_coordinators=args.coordinators, redundant_experts=args.redundant_experts,
        routing_profile=profile, placement_strategy=args.placement,
        collective_timeout_s=args.collective_timeout,
        cpu=CpuPolicy(threads_per_rank=args.threads, reserved_cpus=_reserved_cpus(args)),
    )
    options.placement(cfg.num_local_experts)
    return options


def _reserved_cpus(args: argparse.Namespace) -> int:
    return resolve_reserved_cpus(args.reserved_cpus, args.model) if args.command == "serve" else 0  # else no gateway


def run_generate(args: argparse.Namespace) -> int:
    settings = _settings(args)
    cfg = ModelConfig.from_model_dir(settings.model_dir)
    tokenizer = TextTokenizer.from_model_dir(settings.model_dir, cfg.bos_token_id)
    sampling = SamplingParams(temperature=args.temperature, top_k=args.top_k, top_p=args.top_p, seed=args.seed)
    request = GenerationRequest(
        request_id="cli-0", prompt_token_ids=_prompt_ids(args, tokenizer), sampling=sampling,
        max_new_tokens=args.max_new_tokens, ignore_eos=args.ignore_eos,
    )
    options = _cluster_options(args)
    if settings.num_workers == 0:
        (result,) = build_local_engine(settings).generate([request])
    else:
        with ray_session(args.ray_address, options.num_coordinators + options.num_workers), \
                RayExpertParallelEngine(settings, options) as engine:
            (result,) = engine.generate([request])
    text = tokenizer.decode(result.token_ids) if tokenizer else None
    if args.json:
        print(json.dumps({"token_ids": result.token_ids, "text": text, "finish_reason": result.finish_reason}))
    else:
        print(text if text is not None else " ".join(map(str, result.token_ids)))
    return 0


def run_serve(args: argparse.Namespace) -> int:
    from cluster.gateway.balancer import BalancerSettings
    from cluster.gateway.server import GatewayOptions
    from cluster.serve import serve

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    scheduler = SchedulerConfig(max_num_seqs=args.max_num_seqs, max_batched_tokens=args.max_batched_tokens,
                                max_waiting=args.max_waiting, enable_prefix_caching=args.prefix_caching)
    security = SecurityOptions(tls_cert=args.tls_cert, tls_key=args.tls_key, tls_client_ca=args.tls_client_ca,
                               api_keys_file=args.api_keys_file, max_message_bytes=args.max_message_bytes)
    options = GatewayOptions(host=args.host, port=args.port, metrics_host=args.metrics_host,
                             metrics_port=args.metrics_port, grace_s=args.grace,
                             replay_timeout_s=args.replay_timeout, rejoin_delay_s=args.rejoin_delay, security=security,
                             health_port=args.health_port, chat_template=args.chat_template,
                             http_port=None if args.no_http else args.http_port,
                             limits=RequestLimits(max_new_tokens=args.max_new_tokens_limit,
                                                  max_prompt_chars=args.max_prompt_chars),
                             balancer=BalancerSettings(interval_s=args.balance_interval, window_s=args.balance_window,
                                                       threshold=args.balance_threshold),
                             save_routing_profile=args.save_routing_profile)
    if options.balancer.enabled and not args.workers:
        raise ValueError("--balance-interval moves expert copies between expert workers: it needs --workers >= 1")
    load_security(security)  # fail on a bad file now, not after the cluster has started; the gateway reloads once
    ChatTemplate.from_model_dir(args.model, path=args.chat_template)  # a bad template fails before the cluster starts
    serve(_settings(args), _cluster_options(args), scheduler, options, args.ray_address)
    return 0


def _client_api_key(args: argparse.Namespace) -> str | None:
    if args.api_key_file is not None:
        keys = load_api_keys(args.api_key_file, "api_key_file")
        if len(keys) != 1:
            raise ValueError(f"api_key_file {args.api_key_file} holds {len(keys)} keys; the client sends one")
        return keys[0]
    return os.environ.get(API_KEY_ENV, "").strip() or None


def run_client(args: argparse.Namespace) -> int:
    from cluster.client import ClientSecurity, stream_completion
    from protos import mixserve_pb2 as pb

    sampling = pb.SamplingParams(max_new_tokens=args.max_new_tokens, temperature=args.temperature, top_k=args.top_k,
                                 top_p=args.top_p, ignore_eos=args.ignore_eos, stop=args.stop)
    if args.seed is not None:
        sampling.seed = args.seed
    request = pb.GenerateRequest(sampling=sampling)
    if args.prompt is not None:
        request.prompt = args.prompt
    else:
        request.prompt_token_ids.extend(int(t) for t in args.token_ids.split(","))
    security = ClientSecurity(tls=args.tls, tls_ca=args.tls_ca, tls_cert=args.tls_cert, tls_key=args.tls_key,
                              tls_server_name=args.tls_server_name, api_key=_client_api_key(args))
    return stream_completion(args.target, request, timeout_s=args.timeout, security=security)


def _run_bench(argv: list[str]) -> int:
    try:
        from cluster.bench.cli import main as bench_main
    except ModuleNotFoundError as exc:
        raise ValueError(f"`mixserve bench` needs {exc.name}: pip install 'mixserve[bench]'") from exc
    return bench_main(argv)


def main(argv: list[str] | None = None) -> int:
    MallocSettings().apply_now()  # before any thread starts; the bench's transformers baseline gets it too
    argv = sys.argv[1:] if argv is None else argv
    try:
        if argv[:1] == ["bench"]:
            return _run_bench(argv[1:])
        args = build_parser().parse_args(argv)
        if getattr(args, "threads", None):
            torch.set_num_threads(args.threads)
        return {"generate": run_generate, "serve": run_serve, "client": run_client}[args.command](args)
    except (MixServeError, CheckpointError, CompileFailed, WorkerStartError, ValueError) as exc:
        print(f"mixserve: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
