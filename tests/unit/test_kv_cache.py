"""The KV block pool: rings for sliding windows, all-or-nothing reservations, and the cache slots the
attention metadata gives each position (stable while a sequence grows, distinct inside a window)."""

from __future__ import annotations

import pytest
import torch

from workers.model.attention import SequenceChunk, build_attention_metadata
from workers.model.kv_cache import CacheFull, KVCachePool, KVCacheSpec, SequenceBlocks


def _pool(num_blocks: int = 10, window: int | None = None) -> KVCachePool:
    return KVCachePool(KVCacheSpec(num_layers=1, num_blocks=num_blocks, block_size=4, num_kv_heads=1, head_dim=2,
                                   sliding_window=window, dtype=torch.float32, device=torch.device("cpu")))


def _free_blocks(pool: KVCachePool) -> int:
    return round((1.0 - pool.usage) * pool.spec.num_blocks)


def test_sliding_window_sequence_never_holds_more_than_its_window():
    pool = _pool(window=10)  # ring of ceil(10 / 4) = 3 blocks
    seq = SequenceBlocks()
    for step in range(99):
        pool.reserve(seq, 1)
        seq.num_cached = step + 1
        assert len(seq.blocks) <= 3
    assert _free_blocks(pool) == 7
    pool.reserve(seq, 1)
    meta = build_attention_metadata(pool, [SequenceChunk(blocks=seq, start=99, num_new=1)])
    key_slots = meta.groups[0].key_slots_BLk[0].tolist()  # the window: positions 90..99
    ring = {b * 4 + i for b in seq.blocks for i in range(4)}
    assert len(key_slots) == 10 and len(set(key_slots)) == 10 and set(key_slots) <= ring


def test_full_pool_raises_and_changes_nothing():
    pool = _pool(num_blocks=3)
    a, b = SequenceBlocks(), SequenceBlocks()
    pool.reserve(a, 8)
    with pytest.raises(CacheFull):
        pool.reserve(b, 8)
    assert b.blocks == [] and _free_blocks(pool) == 1
    pool.release(a)
    assert _free_blocks(pool) == 3 and pool.usage == 0.0


def test_slots_of_a_growing_sequence_are_stable():
    pool = _pool()
    seq = SequenceBlocks()
    pool.reserve(seq, 5)
    first = build_attention_metadata(pool, [SequenceChunk(blocks=seq, start=0, num_new=5)])
    written = first.groups[0].write_slots_W.tolist()  # where positions 0..4 went
    seq.num_cached = 5
    pool.reserve(seq, 7)
    later = build_attention_metadata(pool, [SequenceChunk(blocks=seq, start=5, num_new=7)])
    assert later.groups[0].key_slots_BLk[0, :5].tolist() == written  # read back from where they were written
    assert len(set(later.groups[0].write_slots_W.tolist()) | set(written)) == 12
