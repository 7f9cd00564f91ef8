"""Ragged attention: a step's sequences attend in groups that are never padded to another group's lengths,
with the same result as one padded call over the whole step and the same logits as transformers when long
prompts arrive among decoding sequences."""

from __future__ import annotations

import pytest
import torch

from tests.reference import hf_greedy, load_hf, relative_error, teacher_forced_logits
from workers.model import attention as attention_module
from workers.model.attention import (
    AttentionMetadata,
    SequenceChunk,
    build_attention_metadata,
    group_chunks,
    paged_attention,
)
from workers.model.kv_cache import KVCachePool, KVCacheSpec, SequenceBlocks
from workers.runtime.local_build import build_attention_rank

HEADS, KV_HEADS, HEAD_DIM, BLOCK = 4, 2, 8, 4


def _chunk(start: int, num_new: int) -> SequenceChunk:
    return SequenceChunk(SequenceBlocks(), start, num_new)


def test_a_long_prefill_chunk_is_not_grouped_with_decodes():
    decodes = [_chunk(30, 1), _chunk(41, 1), _chunk(35, 1)]  # contexts 31, 42, 36: one group
    prefill = _chunk(0, 512)
    groups = group_chunks([*decodes, prefill, _chunk(50, 1)], window=None)
    assert [len(g) for g in groups] == [3, 1, 1]
    assert groups[1] == [prefill]
    equal_prefills = [_chunk(0, 64) for _ in range(4)]  # padding wastes nothing: one batched call
    assert [len(g) for g in group_chunks(equal_prefills, window=None)] == [4]


def test_a_window_bounds_the_keys_a_decode_is_grouped_by():
    # with a window of 16, decodes at positions 100 and 1000 both read 16 keys: no padding between them
    assert [len(g) for g in group_chunks([_chunk(100, 1), _chunk(1000, 1)], window=16)] == [2]
    short_and_long = [_chunk(10, 1), _chunk(10, 1), _chunk(1000, 1)]  # 11, 11, 1001 keys; 11, 11, 16 in a window
    assert [len(g) for g in group_chunks(short_and_long, window=None)] == [2, 1]
    assert [len(g) for g in group_chunks(short_and_long, window=16)] == [3]


def _pool(window: int | None) -> KVCachePool:
    return KVCachePool(KVCacheSpec(num_layers=1, num_blocks=256, block_size=BLOCK, num_kv_heads=KV_HEADS,
                                   head_dim=HEAD_DIM, sliding_window=window, dtype=torch.float32,
                                   device=torch.device("cpu")))


def _mixed_step(pool: KVCachePool, gen: torch.Generator) -> list[SequenceChunk]:
    """Decodes of several contexts, a long prefill chunk, a later chunk of a partly cached prompt."""
    chunks = []
    for cached, new in [(40, 1), (7, 1), (0, 37), (23, 1), (12, 9), (55, 1)]:
        blocks = SequenceBlocks()
        pool.reserve(blocks, cached + new)
        k = pool.k_LBSHd[0].view(-1, KV_HEADS, HEAD_DIM)
        v = pool.v_LBSHd[0].view(-1, KV_HEADS, HEAD_DIM)
        for b in blocks.blocks:  # random past K/V in every block the sequence holds
            k[b * BLOCK : (b + 1) * BLOCK] = torch.randn(BLOCK, KV_HEADS, HEAD_DIM, generator=gen)
            v[b * BLOCK : (b + 1) * BLOCK] = torch.randn(BLOCK, KV_HEADS, HEAD_DIM, generator=gen)
        blocks.num_cached = cached
        chunks.append(SequenceChunk(blocks, cached, new))
    return chunks


def _one_padded_call(pool: KVCachePool, chunks: list[SequenceChunk]) -> AttentionMetadata:
    """The previous design, the oracle: every sequence of the step padded into one SDPA call."""
    group, positions_T = attention_module._group_metadata(pool, chunks, 0)
    return AttentionMetadata(positions_T=positions_T, groups=(group,))


@pytest.mark.parametrize("window", [None, 16])
def test_ragged_groups_equal_one_padded_call(window):
    results = []
    for build in (build_attention_metadata, _one_padded_call):
        gen = torch.Generator().manual_seed(5)
        pool = _pool(window)
        chunks = _mixed_step(pool, gen)
        num_tokens = sum(c.num_new for c in chunks)
        q = torch.randn(num_tokens, HEADS, HEAD_DIM, generator=gen)
        k, v = torch.randn(2, num_tokens, KV_HEADS, HEAD_DIM, generator=gen)
        meta = build(pool, chunks)
        out = paged_attention(q, k, v, pool.k_LBSHd[0], pool.v_LBSHd[0], meta)
        results.append((meta, out, pool.k_LBSHd.clone(), pool.v_LBSHd.clone()))
    (meta, out, k_cache, v_cache), (padded_meta, padded_out, padded_k, padded_v) = results
    assert len(meta.groups) >= 3, f"the mixed step should split into groups, got {len(meta.groups)}"
    assert torch.equal(meta.positions_T, padded_meta.positions_T)
    torch.testing.assert_close(out, padded_out, rtol=1e-5, atol=1e-6)
    assert torch.equal(k_cache, padded_k) and torch.equal(v_cache, padded_v), "the groups wrote other K/V"


@pytest.mark.parametrize("variant", ["window8_top2_gqa2", "top1_mha"])
def test_long_prompts_arriving_among_decodes_match_transformers(tiny_checkpoints, variant):
    """Two short sequences decode while a long prompt arrives in chunks of 16 (and later another): the steps
    mix decodes with long prefill chunks, and every position's logits stay those of transformers."""
    model_dir = tiny_checkpoints[variant]
    hf = load_hf(model_dir)
    gen = torch.Generator().manual_seed(9)
    prompts = [torch.randint(3, hf.config.vocab_size, (n,), generator=gen).tolist() for n in (4, 2, 45, 30)]
    reference = [hf_greedy(hf, p, 12) for p in prompts]
    rank = build_attention_rank(model_dir, dtype=torch.float32, device=torch.device("cpu"), num_blocks=128,
                                block_size=BLOCK)
    seen = []
    build = attention_module.build_attention_metadata

    def counting(pool, chunks):
        meta = build(pool, chunks)
        seen.append(len(meta.groups))
        return meta

    full = [p + toks for p, (toks, _) in zip(prompts, reference, strict=True)]
    import workers.runtime.attention_rank as attention_rank_module

    original = attention_rank_module.build_attention_metadata
    attention_rank_module.build_attention_metadata = counting
    try:
        ours = teacher_forced_logits(rank, full, [len(p) for p in prompts], prefill_chunk=16, join_steps=[0, 0, 3, 6])
    finally:
        attention_rank_module.build_attention_metadata = original
    assert max(seen) >= 2, f"no step mixed decodes with a long prefill chunk: groups per step {seen}"
    for (_, ref_logits), logits in zip(reference, ours, strict=True):
        assert relative_error(logits, ref_logits) < 1e-4
