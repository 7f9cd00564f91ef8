"""Parity with transformers.MixtralForCausalLM: logits at every prefill and decode position, greedy tokens."""

from __future__ import annotations

import pytest
import torch

from cluster.engine import LLMEngine
from cluster.requests import GenerationRequest
from cluster.scheduler import SchedulerConfig
from tests.reference import hf_greedy, load_hf, relative_error, teacher_forced_logits
from tests.tiny_models import TINY_VARIANTS
from workers.model import linear as linear_module
from workers.model.experts import PackedLayerExperts
from workers.model.linear import PackedLinear
from workers.runtime.local_build import build_attention_rank

DECODE_STEPS = 32
PROMPT_LENS = [11, 3, 20]


def _prompts(vocab: int, seed: int) -> list[list[int]]:
    gen = torch.Generator().manual_seed(seed)
    return [torch.randint(3, vocab, (n,), generator=gen).tolist() for n in PROMPT_LENS]


def _rank(model_dir, block_size=4):
    return build_attention_rank(model_dir, dtype=torch.float32, device=torch.device("cpu"),
                                num_blocks=128, block_size=block_size)


@pytest.mark.parametrize("packed", [False, True], ids=["plain", "onednn-packed"])
@pytest.mark.parametrize("variant", sorted(TINY_VARIANTS))
def test_logits_and_greedy_tokens_match_transformers(tiny_checkpoints, variant, packed, monkeypatch):
    """packed: every matmul weight in oneDNN's layout (tiny weights are below the size that packs by default)."""
    if packed:
        monkeypatch.setattr(linear_module, "PACK_MIN_ELEMENTS", 0)
    model_dir = tiny_checkpoints[variant]
    hf = load_hf(model_dir)
    prompts = _prompts(hf.config.vocab_size, seed=len(variant))
    reference = [hf_greedy(hf, p, DECODE_STEPS) for p in prompts]

    rank = _rank(model_dir)
    assert isinstance(rank.model.weights.lm_head, PackedLinear) == packed
    assert isinstance(rank.experts.shard.layers[0], PackedLayerExperts) == packed
    full = [p + toks for p, (toks, _) in zip(prompts, reference, strict=True)]
    ours = teacher_forced_logits(rank, full, [len(p) for p in prompts])
    for (_, ref_logits), logits in zip(reference, ours, strict=True):
        assert logits.shape == ref_logits.shape
        err = relative_error(logits, ref_logits)
        assert err < 1e-4, f"{variant}: logits differ from transformers by {err:.2e} relative"

    engine = LLMEngine(rank)
    requests = [
        GenerationRequest(request_id=str(i), prompt_token_ids=tuple(p), max_new_tokens=DECODE_STEPS, ignore_eos=True)
        for i, p in enumerate(prompts)
    ]
    for result, (toks, _) in zip(engine.generate(requests), reference, strict=True):
        assert result.token_ids == toks, f"{variant}: greedy tokens differ from transformers"
    assert rank.pool.usage == 0.0


def test_chunked_prefill_matches_transformers(tiny_checkpoints):
    """A prompt prefilled in chunks of 5 (crossing the window of 8) gives the same logits."""
    model_dir = tiny_checkpoints["window8_top2_gqa2"]
    hf = load_hf(model_dir)
    prompts = _prompts(hf.config.vocab_size, seed=7)
    reference = [hf_greedy(hf, p, 4) for p in prompts]
    full = [p + toks for p, (toks, _) in zip(prompts, reference, strict=True)]
    ours = teacher_forced_logits(_rank(model_dir), full, [len(p) for p in prompts], prefill_chunk=5)
    for (_, ref_logits), logits in zip(reference, ours, strict=True):
        assert relative_error(logits, ref_logits) < 1e-4


def test_engine_with_small_token_budget_matches_transformers(tiny_checkpoints):
    """Chunked prefill through the scheduler (budget 7 tokens a step) keeps greedy parity."""
    model_dir = tiny_checkpoints["top3_gqa4_headdim"]
    hf = load_hf(model_dir)
    prompts = _prompts(hf.config.vocab_size, seed=3)
    engine = LLMEngine(_rank(model_dir), SchedulerConfig(max_batched_tokens=7))
    requests = [GenerationRequest(request_id=str(i), prompt_token_ids=tuple(p), max_new_tokens=8, ignore_eos=True)
                for i, p in enumerate(prompts)]
    for result, prompt in zip(engine.generate(requests), prompts, strict=True):
        assert result.token_ids == hf_greedy(hf, prompt, 8)[0]


def test_shipped_model_matches_transformers():
    """The embedded default model (models/mixserve-tiny) passes the same parity checks."""
    from cluster.settings import DEFAULT_MODEL_DIR
    from cluster.tokenizer import TextTokenizer

    hf = load_hf(DEFAULT_MODEL_DIR)
    tokenizer = TextTokenizer.from_model_dir(DEFAULT_MODEL_DIR, hf.config.bos_token_id)
    texts = ["def fibonacci(n):", "import os\n\nclass Cache:\n    def __init__(self", "x"]
    prompts = [tokenizer.encode(t) for t in texts]
    reference = [hf_greedy(hf, p, DECODE_STEPS) for p in prompts]
    rank = _rank(DEFAULT_MODEL_DIR, block_size=16)
    full = [p + toks for p, (toks, _) in zip(prompts, reference, strict=True)]
    for (_, ref_logits), logits in zip(reference, teacher_forced_logits(rank, full, [len(p) for p in prompts]),
                                       strict=True):
        assert relative_error(logits, ref_logits) < 1e-4
    requests = [GenerationRequest(request_id=str(i), prompt_token_ids=tuple(p), max_new_tokens=DECODE_STEPS,
                                  ignore_eos=True) for i, p in enumerate(prompts)]
    for result, (toks, _) in zip(LLMEngine(rank).generate(requests), reference, strict=True):
        assert result.token_ids == toks
