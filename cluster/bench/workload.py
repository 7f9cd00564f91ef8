"""What a benchmark runs: seeded random prompts of one length (optionally one shared random prefix followed by
each prompt's own random tokens), every request producing exactly `output_len` tokens (greedy, end-of-sequence
ignored); the random checkpoints it runs on; and the setup every mixserve engine of one benchmark shares.
Knows nothing of how an engine is driven, timed or reported.

Needs neither Ray nor gRPC (scripts/gpu_check.py writes its checkpoint with this module).
"""

from __future__ import annotations

import json
import shutil
import time
from dataclasses import dataclass, field, replace
from pathlib import Path

import torch

from cluster.bench.router_skew import check_favoured, skew_routers
from cluster.requests import GenerationRequest
from cluster.scheduler import SchedulerConfig
from cluster.settings import EngineSettings
from workers.config import ModelConfig
from workers.model.sampler import SamplingParams
from workers.runtime.attention_rank import MicroBatching
from workers.runtime.local_build import kv_cache_spec

RESERVED_IDS = 3  # <unk>, <s>, </s> in Mixtral vocabularies: never used as prompt tokens


@dataclass(frozen=True, kw_only=True)
class Workload:
    num_prompts: int
    input_len: int  # each prompt's own tokens (after the shared prefix, when there is one)
    output_len: int
    seed: int = 0
    shared_prefix_len: int = 0  # tokens every prompt starts with, the same for all (0: none)

    def __post_init__(self) -> None:
        for name in ("num_prompts", "input_len", "output_len"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be at least 1, got {getattr(self, name)}")
        if self.shared_prefix_len < 0:
            raise ValueError(f"shared_prefix_len must be >= 0, got {self.shared_prefix_len}")

    @property
    def prompt_len(self) -> int:
        """Tokens per prompt: the shared prefix, then the prompt's own."""
        return self.shared_prefix_len + self.input_len

    @property
    def output_tokens(self) -> int:
        return self.num_prompts * self.output_len

    @property
    def forwarded_tokens(self) -> int:
        """Tokens that go through the layer stack: every prompt token, then every sampled token but the last."""
        return self.num_prompts * (self.prompt_len + self.output_len - 1)


def make_prompts(workload: Workload, vocab_size: int) -> list[tuple[int, ...]]:
    """Seeded random ids above the reserved ones: each prompt's own `input_len`, after the one shared prefix
    of `shared_prefix_len` (drawn first, from the same seed; without one the prompts are as they always were)."""
    if vocab_size <= RESERVED_IDS:
        raise ValueError(f"vocab_size ({vocab_size}) leaves no ids above the {RESERVED_IDS} reserved ones")
    gen = torch.Generator().manual_seed(workload.seed)
    prefix: tuple[int, ...] = ()
    if workload.shared_prefix_len:
        prefix = tuple(torch.randint(RESERVED_IDS, vocab_size, (workload.shared_prefix_len,), generator=gen).tolist())
    ids_NP = torch.randint(RESERVED_IDS, vocab_size, (workload.num_prompts, workload.input_len), generator=gen)
    return [prefix + tuple(row) for row in ids_NP.tolist()]


def engine_requests(prompts: list[tuple[int, ...]], output_len: int, tag: str) -> list[GenerationRequest]:
    """Greedy requests that ignore end-of-sequence, so each produces exactly output_len tokens."""
    greedy = SamplingParams(temperature=0.0)
    return [
        GenerationRequest(request_id=f"{tag}-{i}", prompt_token_ids=p, sampling=greedy, max_new_tokens=output_len,
                          ignore_eos=True)
        for i, p in enumerate(prompts)
    ]


# Random Mixtral checkpoints, written once with transformers' `save_pretrained` and reused: a directory counts
# as present when its config.json carries the preset's shape and its BENCH_RECORD the same favoured experts (none
# when it has no record: checkpoints written before the record). Written into a temporary sibling and renamed, so
# an interrupted write is never mistaken for a checkpoint; weights are created once, in fp32, in 1 GB shards.
PRESETS: dict[str, dict] = {
    # stands in for models/mixserve-tiny until it exists (W1)
    "w1-random": dict(vocab_size=4096, hidden_size=256, intermediate_size=512, num_hidden_layers=4,
                      num_attention_heads=8, num_key_value_heads=4, num_local_experts=8, num_experts_per_tok=2,
                      sliding_window=None, max_position_embeddings=4096),
    # the "medium" Mixtral of W2: ~0.73 B parameters, ~2.8 GB in fp32
    "w2-medium": dict(vocab_size=32000, hidden_size=1024, intermediate_size=3584, num_hidden_layers=8,
                      num_attention_heads=16, num_key_value_heads=4, num_local_experts=8, num_experts_per_tok=2,
                      sliding_window=None, max_position_embeddings=4096),
}
SHAPE_KEYS = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
              "num_key_value_heads", "num_local_experts", "num_experts_per_tok")
# Beside config.json: how the bench made the checkpoint beyond its shape ({"favour_experts": [...], ...}). No
# mixserve or transformers code reads it; the checkpoint stays a plain Hugging Face directory.
BENCH_RECORD = "mixserve-bench.json"
CALIBRATION = Workload(num_prompts=8, input_len=64, output_len=1)  # the prompts a favouring router is tuned on


def recorded_favour(model_dir: Path) -> tuple[int, ...]:
    """The experts a bench checkpoint's routers favour, from its BENCH_RECORD (none without one)."""
    try:
        return tuple(json.loads((model_dir / BENCH_RECORD).read_text())["favour_experts"])
    except FileNotFoundError:
        return ()


def _has_checkpoint(out_dir: Path, spec: dict, favour_experts: tuple[int, ...]) -> bool:
    try:
        raw = json.loads((out_dir / "config.json").read_text())
        favoured = recorded_favour(out_dir)
    except (OSError, json.JSONDecodeError, KeyError, TypeError):
        return False
    weights = (out_dir / "model.safetensors").exists() or (out_dir / "model.safetensors.index.json").exists()
    return weights and all(raw.get(k) == spec[k] for k in SHAPE_KEYS) and favoured == favour_experts


def write_random_mixtral(out_dir: Path, spec: dict, *, seed: int = 0, initializer_range: float = 0.02,
                         favour_experts: tuple[int, ...] = ()) -> Path:
    """Writes a random MixtralForCausalLM to out_dir unless a checkpoint of this shape, favouring the same experts,
    is already there (one of another shape or favouring others is replaced). favour_experts: every layer's router
    sends most rows to these experts (cluster/bench/router_skew.py); (): a plain random router, near-uniform."""
    from transformers import MixtralConfig, MixtralForCausalLM

    favour_experts = tuple(favour_experts)
    check_favoured(favour_experts, spec["num_local_experts"])
    if _has_checkpoint(out_dir, spec, favour_experts):
        return out_dir
    cfg = MixtralConfig(initializer_range=initializer_range, tie_word_embeddings=False, bos_token_id=1,
                        eos_token_id=2, **spec)
    torch.manual_seed(seed)
    model = MixtralForCausalLM(cfg).eval()
    record: dict = {"favour_experts": list(favour_experts)}
    if favour_experts:
        prompts = torch.tensor(make_prompts(replace(CALIBRATION, seed=seed), spec["vocab_size"]))
        shares = skew_routers(model, favour_experts, prompts)
        record["favoured_share_per_layer"] = [round(s, 4) for s in shares]
    tmp = out_dir.with_name(out_dir.name + f".tmp-{int(time.time())}")
    model.save_pretrained(tmp, max_shard_size="1GB")
    (tmp / BENCH_RECORD).write_text(json.dumps(record) + "\n")
    del model
    if out_dir.exists():
        shutil.rmtree(out_dir)
    tmp.rename(out_dir)
    return out_dir


def load_transformers(model_dir: Path, dtype: torch.dtype, device: torch.device):
    """transformers' MixtralForCausalLM over a checkpoint, in eval mode (the baseline and the parity oracle)."""
    from transformers import MixtralForCausalLM

    return MixtralForCausalLM.from_pretrained(model_dir, dtype=dtype).to(device).eval()


def write_preset(name: str, out_dir: Path, *, seed: int = 0, favour_experts: tuple[int, ...] = ()) -> Path:
    if name not in PRESETS:
        raise ValueError(f"preset must be one of {sorted(PRESETS)}, got {name!r}")
    return write_random_mixtral(out_dir, PRESETS[name], seed=seed, favour_experts=favour_experts)


@dataclass(frozen=True, kw_only=True)
class EngineSetup:
    """What every mixserve engine of one benchmark shares."""

    model_dir: Path
    device: torch.device
    dtype: torch.dtype
    threads_per_rank: int
    max_batched_tokens: int
    max_num_seqs: int
    block_size: int = 16
    warmup_tokens: int = 4
    rounds: int = 1  # each engine runs once per round; rounds interleave the engines
    progress: bool = True
    timeout_s: float = 3600.0
    ray_worker_niceness: str = "Ray's default"  # recorded here; the entry point applies it before Ray starts
    reserved_cpus: int = 0  # Ray ranks run threads_per_rank minus this (the gateway's share in serve)
    compile_small_steps: bool = False  # EngineSettings.compile_small_steps for every mixserve engine
    micro_batching: MicroBatching = field(default_factory=MicroBatching)  # EngineSettings.micro_batching
    # off by default: offline, mixed and failover warm up (and run later rounds) on the measured prompts, so a
    # prefix cache would let the measured run skip their prefill, which transformers cannot; serve draws other
    # prompts for the warm-up and for every round and point, and may run each engine with it off and on
    prefix_caching: bool = False

    def __post_init__(self) -> None:
        for name in ("threads_per_rank", "max_batched_tokens", "max_num_seqs", "block_size", "warmup_tokens",
                     "rounds"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be at least 1, got {getattr(self, name)}")
        if not self.timeout_s > 0:
            raise ValueError(f"timeout_s must be positive, got {self.timeout_s}")

    def summary(self) -> dict[str, str]:
        """The settings a report records."""
        return {"device": str(self.device), "dtype": str(self.dtype).removeprefix("torch."),
                "threads_per_rank": str(self.threads_per_rank), "max_batched_tokens": str(self.max_batched_tokens),
                "max_num_seqs": str(self.max_num_seqs), "block_size": str(self.block_size),
                "warmup_tokens": str(self.warmup_tokens), "rounds": str(self.rounds),
                "ray_worker_niceness": self.ray_worker_niceness, "reserved_cpus": str(self.reserved_cpus),
                "compile_small_steps": "on" if self.compile_small_steps else "off",
                "micro_batches": str(self.micro_batching.micro_batches),
                "micro_batch_min_tokens": str(self.micro_batching.min_tokens),
                "prefix_caching": "on" if self.prefix_caching else "off"}


def engine_settings(cfg: ModelConfig, setup: EngineSetup, workload: Workload, workers: int = 0) -> EngineSettings:
    """KV cache room for every running sequence at full length, plus one spare block each: no preemption."""
    spec = kv_cache_spec(cfg, num_blocks=1, block_size=setup.block_size, dtype=setup.dtype, device=setup.device)
    per_sequence = spec.max_blocks_per_sequence(workload.prompt_len + workload.output_len) + 1
    kv_bytes = per_sequence * min(setup.max_num_seqs, workload.num_prompts) * spec.bytes_per_block
    return EngineSettings(model_dir=setup.model_dir, device=setup.device, dtype=setup.dtype, kv_cache_bytes=kv_bytes,
                          block_size=setup.block_size, num_workers=workers,
                          compile_small_steps=setup.compile_small_steps, micro_batching=setup.micro_batching)


def scheduler_config(setup: EngineSetup) -> SchedulerConfig:
    return SchedulerConfig(max_num_seqs=setup.max_num_seqs, max_batched_tokens=setup.max_batched_tokens,
                           max_waiting=max(256, setup.max_num_seqs), enable_prefix_caching=setup.prefix_caching)
