"""What scripts/gpu_check.py measures on one device, mixserve's attention rank (in-process experts) against
transformers, driven directly (no scheduler, no engine: one prefill of a batch, then one-token decode steps):

1. Low-precision parity on a tiny random checkpoint: greedy tokens of a batch, and teacher-forced logits at
   every position, against `MixtralForCausalLM`. A greedy mismatch counts as a near tie when transformers'
   own top-2 logits there differ by less than the logit tolerance: at bf16 either token is correct there.
2. Decode steps of a few full-size Mixtral layers against transformers' `MixtralModel` holding the same
   weights, and the bandwidth floor. transformers creates the random weights once, on the device, in the
   benchmark dtype; mixserve's weight dataclasses are views of the same tensors (the fused qkv is the only
   copy), so both route identically and memory holds one model. After a prefill of `context_len` random
   tokens per sequence and a few warm-up steps, `timed_steps` steps are each synchronised and timed alone
   (the median is reported). The GPU run and the CPU dry run differ only in `device` and shapes.

Imports torch, transformers and workers only (no Ray, no gRPC): the device image may have neither.
Shapes: B sequences, C context tokens, T tokens in a step, D model dim, V vocab, S steps.
"""

from __future__ import annotations

import statistics
import time
import warnings
from dataclasses import dataclass
from pathlib import Path

import torch

from cluster.bench.machine import layer_elements, sync
from cluster.bench.workload import RESERVED_IDS, load_transformers
from workers.config import ModelConfig
from workers.model.attention import SequenceChunk
from workers.model.experts import LayerExperts
from workers.model.kv_cache import SequenceBlocks
from workers.model.linear import prepare_linear
from workers.model.norm import rms_norm
from workers.model.weights import DenseWeights, ExpertShard, LayerWeights
from workers.runtime.attention_rank import AttentionRank, LocalExperts
from workers.runtime.local_build import assemble_attention_rank, build_attention_rank
from workers.runtime.timing import StepTimings

TINY_SPEC = dict(vocab_size=512, hidden_size=128, intermediate_size=256, num_hidden_layers=2, num_attention_heads=4,
                 num_key_value_heads=2, num_local_experts=8, num_experts_per_tok=2, sliding_window=None,
                 max_position_embeddings=512)


def relative_error(actual: torch.Tensor, expected: torch.Tensor) -> float:
    """max |actual − expected| / max |expected|, in float32 (the parity measure; tests/reference.py uses it)."""
    return float((actual.float() - expected.float()).abs().max() / expected.float().abs().max())


class RankDriver:
    def __init__(self, rank: AttentionRank) -> None:
        self.rank = rank
        self.blocks: list[SequenceBlocks] = []
        self.lengths: list[int] = []  # tokens cached per sequence
        self.timings = StepTimings()

    def prefill(self, sequences: list[list[int]]) -> torch.Tensor:
        """Caches every sequence in one step; returns every position's final hidden state [T, D]."""
        assert not self.blocks, "prefill once per driver; release() first"
        self.blocks = [SequenceBlocks() for _ in sequences]
        chunks = []
        for blocks, seq in zip(self.blocks, sequences, strict=True):
            self.rank.pool.reserve(blocks, len(seq))
            chunks.append(SequenceChunk(blocks, 0, len(seq)))
        ids_T = torch.tensor([t for s in sequences for t in s], dtype=torch.int64)
        self.lengths = [len(s) for s in sequences]
        return self.rank.forward(ids_T, chunks, self.timings)

    def last_positions(self, h_TD: torch.Tensor) -> torch.Tensor:
        """Each sequence's last position of a prefill's hidden states [B, D]."""
        last_B = torch.tensor(self.lengths).cumsum(0) - 1
        return h_TD[last_B.to(h_TD.device)]

    def decode(self, tokens: list[int]) -> torch.Tensor:
        """Feeds one new token per sequence; returns their final hidden states [B, D]."""
        assert len(tokens) == len(self.blocks), f"{len(tokens)} tokens for {len(self.blocks)} sequences"
        chunks = []
        for blocks, cached in zip(self.blocks, self.lengths, strict=True):
            self.rank.pool.reserve(blocks, 1)
            chunks.append(SequenceChunk(blocks, cached, 1))
        h_BD = self.rank.forward(torch.tensor(tokens, dtype=torch.int64), chunks, self.timings)
        self.lengths = [n + 1 for n in self.lengths]
        return h_BD

    def greedy(self, prompts: list[list[int]], new_tokens: int) -> list[list[int]]:
        """Greedy continuation of every prompt, new_tokens each."""
        out: list[list[int]] = [[] for _ in prompts]
        h_BD = self.last_positions(self.prefill(prompts))
        for step in range(new_tokens):
            next_B = self.rank.logits(h_BD).argmax(dim=-1).tolist()
            for seq, token in zip(out, next_B, strict=True):
                seq.append(token)
            if step + 1 < new_tokens:
                h_BD = self.decode(next_B)
        return out

    def release(self) -> None:
        for blocks in self.blocks:
            self.rank.pool.release(blocks)
        self.blocks, self.lengths = [], []


@dataclass(frozen=True, kw_only=True)
class ParityResult:
    device: str
    dtype: str
    batch: int
    prompt_len: int
    new_tokens: int
    tokens_equal: bool
    first_mismatch: tuple[int | None, ...]  # per sequence
    mismatches_are_near_ties: bool
    max_rel_error: float  # max |mixserve − transformers| / max |transformers| over all logits
    tolerance: float
    passed: bool


def _first_mismatch(a: list[int], b: list[int]) -> int | None:
    return next((i for i, (x, y) in enumerate(zip(a, b, strict=True)) if x != y), None)


def _near_tie(logits_V: torch.Tensor, tolerance: float) -> bool:
    top2 = logits_V.float().topk(2).values
    return float(top2[0] - top2[1]) <= tolerance * float(logits_V.float().abs().max())


@torch.inference_mode()
def check_parity(model_dir: Path, *, device: torch.device, dtype: torch.dtype, batch: int = 4, prompt_len: int = 12,
                 new_tokens: int = 16, tolerance: float = 5e-2, seed: int = 0) -> ParityResult:
    from transformers import GenerationConfig

    hf = load_transformers(model_dir, dtype, device)
    rank = build_attention_rank(model_dir, dtype=dtype, device=device, num_blocks=batch * 8, block_size=16)
    gen = torch.Generator().manual_seed(seed)
    prompts_BP = torch.randint(RESERVED_IDS, hf.config.vocab_size, (batch, prompt_len), generator=gen)
    gen_cfg = GenerationConfig(max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False, pad_token_id=0,
                               eos_token_id=None)
    hf_seqs_BL = hf.generate(input_ids=prompts_BP.to(device), attention_mask=torch.ones_like(prompts_BP).to(device),
                             generation_config=gen_cfg)
    hf_new = hf_seqs_BL[:, prompt_len:].tolist()
    driver = RankDriver(rank)
    mix_new = driver.greedy(prompts_BP.tolist(), new_tokens)
    driver.release()
    hf_logits_BLV = hf(input_ids=hf_seqs_BL).logits  # teacher forcing on transformers' sequences
    mix_logits_BLV = rank.logits(driver.prefill(hf_seqs_BL.tolist())).view(hf_logits_BLV.shape)
    driver.release()
    err = relative_error(mix_logits_BLV, hf_logits_BLV)
    firsts = tuple(_first_mismatch(m, h) for m, h in zip(mix_new, hf_new, strict=True))
    ties = all(i is None or _near_tie(hf_logits_BLV[b, prompt_len + i - 1], tolerance) for b, i in enumerate(firsts))
    equal = all(i is None for i in firsts)
    return ParityResult(device=str(device), dtype=str(dtype).removeprefix("torch."), batch=batch,
                        prompt_len=prompt_len, new_tokens=new_tokens, tokens_equal=equal, first_mismatch=firsts,
                        mismatches_are_near_ties=ties, max_rel_error=err, tolerance=tolerance,
                        passed=err <= tolerance and (equal or ties))


@dataclass(frozen=True, kw_only=True)
class DecodeShapes:
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_experts: int
    top_k: int
    num_heads: int
    num_kv_heads: int
    vocab_size: int
    context_len: int  # prompt tokens cached before the timed decode steps
    warmup_steps: int
    timed_steps: int
    batches: tuple[int, ...]


SHAPES = {
    "mixtral-8x7b-2layers": DecodeShapes(hidden_size=4096, intermediate_size=14336, num_layers=2, num_experts=8,
                                         top_k=2, num_heads=32, num_kv_heads=8, vocab_size=32000, context_len=128,
                                         warmup_steps=3, timed_steps=20, batches=(1, 16, 64)),
    "dry-run": DecodeShapes(hidden_size=64, intermediate_size=128, num_layers=2, num_experts=8, top_k=2, num_heads=4,
                            num_kv_heads=2, vocab_size=256, context_len=16, warmup_steps=1, timed_steps=3,
                            batches=(1, 4)),
}


@dataclass(frozen=True, kw_only=True)
class DecodePoint:
    batch: int
    context_len: int
    mixserve_step_s: float  # median over the timed steps
    transformers_step_s: float
    speedup_vs_transformers: float  # transformers step time ÷ mixserve step time
    mixserve_tok_s: float
    transformers_tok_s: float
    experts_touched_per_layer: float  # mean over layers and timed steps (mixserve's routing)
    bytes_per_step: dict[str, int]  # attention, router, experts (touched), kv cache reads, total
    floor_s: float  # total bytes ÷ measured copy bandwidth
    mixserve_floor_fraction: float  # floor ÷ mixserve step time
    transformers_floor_fraction: float
    first_step_rel_error: float  # mixserve vs transformers final hidden states on the first decode step


def build_transformers(s: DecodeShapes, device: torch.device, dtype: torch.dtype):
    """transformers' MixtralModel of these shapes with random weights, created on the device."""
    from transformers import MixtralConfig, MixtralModel

    cfg = MixtralConfig(vocab_size=s.vocab_size, hidden_size=s.hidden_size, intermediate_size=s.intermediate_size,
                        num_hidden_layers=s.num_layers, num_attention_heads=s.num_heads,
                        num_key_value_heads=s.num_kv_heads, num_local_experts=s.num_experts,
                        num_experts_per_tok=s.top_k, max_position_embeddings=4096, sliding_window=None,
                        bos_token_id=1, eos_token_id=2, tie_word_embeddings=True)
    torch.manual_seed(0)
    with torch.device(device):
        return MixtralModel._from_config(cfg, dtype=dtype).eval()


def _one(t: dict[str, torch.Tensor], prefix: str, suffix: str) -> torch.Tensor:
    """The tensor named prefix…suffix, whatever transformers 5.x calls the MoE block in between."""
    names = [n for n in t if n.startswith(prefix) and n.endswith(suffix)]
    assert len(names) == 1, f"expected one tensor {prefix}*{suffix}, found {names}"
    return t[names[0]]


def _mixserve_weights(hf_model, num_layers: int, num_experts: int) -> tuple[DenseWeights, ExpertShard]:
    """mixserve's weight dataclasses over transformers' tensors (views; the fused qkv is concatenated).
    transformers keeps each layer's experts fused: gate_up_proj [E, 2F, D] (gate rows, then up) and
    down_proj [E, D, F], which are exactly mixserve's w13_e2FD and w2_eDF."""
    t = hf_model.state_dict(keep_vars=False)
    layers, experts = [], []
    for i in range(num_layers):
        p = f"layers.{i}."
        wqkv_QD = torch.cat([t[f"{p}self_attn.{n}_proj.weight"] for n in "qkv"]).contiguous()
        layers.append(LayerWeights(input_norm_D=t[f"{p}input_layernorm.weight"], qkv_proj=prepare_linear(wqkv_QD),
                                   o_proj=prepare_linear(t[f"{p}self_attn.o_proj.weight"]),
                                   post_norm_D=t[f"{p}post_attention_layernorm.weight"],
                                   gate_ED=_one(t, p, ".gate.weight")))
        experts.append(LayerExperts(w13_e2FD=_one(t, p, "experts.gate_up_proj"),
                                    w2_eDF=_one(t, p, "experts.down_proj")))
    embed_VD = t["embed_tokens.weight"]
    dense = DenseWeights(embed_VD=embed_VD, layers=tuple(layers), final_norm_D=t["norm.weight"],
                         lm_head=prepare_linear(embed_VD), tensor_names=())
    return dense, ExpertShard(expert_ids=tuple(range(num_experts)), layers=tuple(experts), tensor_names=())


def build_rank(hf_model, s: DecodeShapes, block_size: int = 16) -> AttentionRank:
    """mixserve's attention rank with in-process experts over the transformers model's weights."""
    cfg = ModelConfig.from_hf_dict(hf_model.config.to_dict())
    dense, shard = _mixserve_weights(hf_model, s.num_layers, s.num_experts)
    tokens = s.context_len + s.warmup_steps + s.timed_steps + 1
    num_blocks = max(s.batches) * (-(-tokens // block_size) + 1)
    return assemble_attention_rank(cfg, dense, LocalExperts(shard), num_blocks=num_blocks, block_size=block_size)


def _tokens(s: DecodeShapes, batch: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    prompts_BC = torch.randint(RESERVED_IDS, s.vocab_size, (batch, s.context_len), generator=gen)
    steps_SB = torch.randint(RESERVED_IDS, s.vocab_size, (s.warmup_steps + s.timed_steps, batch), generator=gen)
    return prompts_BC, steps_SB


@torch.inference_mode()
def _time_mixserve(rank: AttentionRank, s: DecodeShapes, batch: int) -> tuple[list[float], float, torch.Tensor]:
    """(step seconds, experts touched per layer per step, first decode step's normed hidden states [B, D])."""
    prompts_BC, steps_SB = _tokens(s, batch, seed=0)
    driver = RankDriver(rank)
    driver.prefill(prompts_BC.tolist())
    device = rank.model.device
    times, touched, first = [], [], None
    for step, tokens_B in enumerate(steps_SB.tolist()):
        before_LE = rank.routed_tokens_LE.clone()
        sync(device)
        start = time.perf_counter()
        h_BD = driver.decode(tokens_B)
        sync(device)
        if step == 0:
            first = rms_norm(h_BD, rank.model.weights.final_norm_D, rank.model.cfg.rms_norm_eps)
        if step >= s.warmup_steps:
            times.append(time.perf_counter() - start)
            touched.append(float(((rank.routed_tokens_LE - before_LE) > 0).sum(dim=1).float().mean()))
    driver.release()
    return times, statistics.fmean(touched), first


@torch.inference_mode()
def _time_transformers(model, s: DecodeShapes, batch: int) -> tuple[list[float], torch.Tensor]:
    """(step seconds, first decode step's final hidden states [B, D])."""
    prompts_BC, steps_SB = _tokens(s, batch, seed=0)
    device = model.device
    times, first = [], None
    with warnings.catch_warnings():  # past_key_values is renamed in later 5.x; the device image has an earlier one
        warnings.filterwarnings("ignore", message=".*past_key_values.*", category=FutureWarning)
        cache = model(input_ids=prompts_BC.to(device), use_cache=True).past_key_values
        for step, tokens_B in enumerate(steps_SB):
            sync(device)
            start = time.perf_counter()
            out = model(input_ids=tokens_B[:, None].to(device), past_key_values=cache, use_cache=True)
            sync(device)
            cache = out.past_key_values
            if step == 0:
                first = out.last_hidden_state[:, -1]
            if step >= s.warmup_steps:
                times.append(time.perf_counter() - start)
    return times, first


def decode_bytes(cfg: ModelConfig, batch: int, context: int, experts_touched: float, itemsize: int) -> dict[str, int]:
    """Bytes a decode step of `batch` sequences reads in the layers (no lm_head here), by part, and the total."""
    parts = layer_elements(cfg, experts_per_layer=experts_touched, keys_read=batch * context)
    out = {k: int(int(v) * itemsize) for k, v in parts.items()}
    return out | {"total": sum(out.values())}


def decode_point(rank: AttentionRank, model, s: DecodeShapes, batch: int, bandwidth: float) -> DecodePoint:
    mix_times, touched, mix_first = _time_mixserve(rank, s, batch)
    hf_times, hf_first = _time_transformers(model, s, batch)
    mix, hf = statistics.median(mix_times), statistics.median(hf_times)
    context = s.context_len + s.warmup_steps + s.timed_steps // 2  # the mean context of the timed steps
    nbytes = decode_bytes(rank.model.cfg, batch, context, touched, rank.model.dtype.itemsize)
    floor = nbytes["total"] / bandwidth
    return DecodePoint(
        batch=batch, context_len=context, mixserve_step_s=mix, transformers_step_s=hf, speedup_vs_transformers=hf / mix,
        mixserve_tok_s=batch / mix, transformers_tok_s=batch / hf, experts_touched_per_layer=touched,
        bytes_per_step=nbytes, floor_s=floor, mixserve_floor_fraction=floor / mix,
        transformers_floor_fraction=floor / hf, first_step_rel_error=relative_error(mix_first, hf_first),
    )
