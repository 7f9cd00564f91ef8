"""Low-precision parity against transformers on a tiny random checkpoint: greedy tokens of a batch, and
teacher-forced logits at every position, mixserve's attention rank vs `MixtralForCausalLM` on one device.

A greedy mismatch counts as a near tie when transformers' own top-2 logits at that position differ by
less than the logit tolerance: at bf16 precision either token is a correct answer there.
Imports torch, transformers and workers only (no Ray).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from cluster.bench.rank_driver import RankDriver
from workers.runtime.local_build import build_attention_rank

TINY_SPEC = dict(vocab_size=512, hidden_size=128, intermediate_size=256, num_hidden_layers=2, num_attention_heads=4,
                 num_key_value_heads=2, num_local_experts=8, num_experts_per_tok=2, sliding_window=None,
                 max_position_embeddings=512)


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


def relative_error(actual: torch.Tensor, expected: torch.Tensor) -> float:
    return float((actual.float() - expected.float()).abs().max() / expected.float().abs().max())


def _first_mismatch(a: list[int], b: list[int]) -> int | None:
    return next((i for i, (x, y) in enumerate(zip(a, b, strict=True)) if x != y), None)


def _near_tie(logits_V: torch.Tensor, tolerance: float) -> bool:
    top2 = logits_V.float().topk(2).values
    return float(top2[0] - top2[1]) <= tolerance * float(logits_V.float().abs().max())


@torch.inference_mode()
def check_parity(model_dir: Path, *, device: torch.device, dtype: torch.dtype, batch: int = 4, prompt_len: int = 12,
                 new_tokens: int = 16, tolerance: float = 5e-2, seed: int = 0) -> ParityResult:
    from transformers import GenerationConfig, MixtralForCausalLM

    hf = MixtralForCausalLM.from_pretrained(model_dir, dtype=dtype).to(device).eval()
    rank = build_attention_rank(model_dir, dtype=dtype, device=device, num_blocks=batch * 8, block_size=16)
    gen = torch.Generator().manual_seed(seed)
    prompts = torch.randint(3, hf.config.vocab_size, (batch, prompt_len), generator=gen)
    gen_cfg = GenerationConfig(max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False, pad_token_id=0,
                               eos_token_id=None)
    hf_seqs_BL = hf.generate(input_ids=prompts.to(device), attention_mask=torch.ones_like(prompts).to(device),
                             generation_config=gen_cfg)
    hf_new = hf_seqs_BL[:, prompt_len:].tolist()
    driver = RankDriver(rank)
    mix_new = driver.greedy(prompts.tolist(), new_tokens)
    driver.release()
    hf_logits_BLV = hf(input_ids=hf_seqs_BL).logits  # teacher forcing on transformers' sequences
    h_TD = driver.prefill_all_positions(hf_seqs_BL.tolist())
    mix_logits_BLV = rank.logits(h_TD).view(hf_logits_BLV.shape)
    driver.release()
    err = relative_error(mix_logits_BLV, hf_logits_BLV)
    firsts = tuple(_first_mismatch(m, h) for m, h in zip(mix_new, hf_new, strict=True))
    ties = all(i is None or _near_tie(hf_logits_BLV[b, prompt_len + i - 1], tolerance) for b, i in enumerate(firsts))
    equal = all(i is None for i in firsts)
    return ParityResult(device=str(device), dtype=str(dtype).removeprefix("torch."), batch=batch,
                        prompt_len=prompt_len, new_tokens=new_tokens, tokens_equal=equal, first_mismatch=firsts,
                        mismatches_are_near_ties=ties, max_rel_error=err, tolerance=tolerance,
                        passed=err <= tolerance and (equal or ties))
