from __future__ import annotations

import pytest
import torch

from workers.model.kv_cache import CacheFull, KVCachePool, KVCacheSpec, SequenceBlocks


def _pool(num_blocks: int = 10, window: int | None = None) -> KVCachePool:
    return KVCachePool(KVCacheSpec(num_layers=1, num_blocks=num_blocks, block_size=4, num_kv_heads=1, head_dim=2,
                                   sliding_window=window, dtype=torch.float32, device=torch.device("cpu")))


def test_sliding_window_sequence_never_holds_more_than_its_window():
    pool = _pool(window=10)  # ring of ceil(10 / 4) = 3 blocks
    seq = SequenceBlocks()
    for step in range(100):
        pool.reserve(seq, 1)
        seq.num_cached = step + 1
        assert len(seq.blocks) <= 3
    assert pool.num_free_blocks == 7
    slots = pool.slots(seq, 88, 100).tolist()
    assert len(set(slots)) == 12  # the last 12 positions occupy distinct slots of the ring


def test_full_pool_raises_and_changes_nothing():
    pool = _pool(num_blocks=3)
    a, b = SequenceBlocks(), SequenceBlocks()
    pool.reserve(a, 8)
    with pytest.raises(CacheFull):
        pool.reserve(b, 8)
    assert b.blocks == [] and pool.num_free_blocks == 1
    pool.release(a)
    assert pool.num_free_blocks == 3 and pool.usage == 0.0


def test_slots_of_a_growing_sequence_are_stable():
    pool = _pool()
    seq = SequenceBlocks()
    pool.reserve(seq, 5)
    before = pool.slots(seq, 0, 5).tolist()
    seq.num_cached = 5
    pool.reserve(seq, 7)
    assert pool.slots(seq, 0, 5).tolist() == before
