"""Prefix caching in the KV pool: the block hash chain, reference counts, LRU eviction, the usable prefix of full
attention and of a sliding window, and all-or-nothing reservations that start from a cached prefix."""

from __future__ import annotations

import pytest
import torch

from cluster.requests import GenerationRequest
from cluster.scheduler import Scheduler, SchedulerConfig, Sequence
from workers.model.kv_cache import NULL_BLOCK, CacheFull, KVCachePool, KVCacheSpec, PrefixHit, SequenceBlocks
from workers.model.prefix_cache import BlockAllocator, hash_block

S = 4  # block size


def _pool(num_blocks: int = 16, window: int | None = None, caching: bool = True) -> KVCachePool:
    pool = KVCachePool(KVCacheSpec(num_layers=1, num_blocks=num_blocks, block_size=S, num_kv_heads=1, head_dim=2,
                                   sliding_window=window, dtype=torch.float32, device=torch.device("cpu")))
    pool.set_prefix_caching(caching)
    return pool


def _chain(tokens: list[int]) -> list[bytes]:
    hashes: list[bytes] = []
    for start in range(0, len(tokens) - S + 1, S):
        hashes.append(hash_block(hashes[-1] if hashes else None, tokens[start : start + S]))
    return hashes


def _run(pool: KVCachePool, tokens: list[int], hit: PrefixHit | None = None) -> SequenceBlocks:
    """A sequence that caches all of `tokens` in one step (as the engine would: reserve, forward, commit)."""
    seq = SequenceBlocks()
    cached = hit.num_blocks * S if hit else 0
    pool.reserve(seq, len(tokens) - cached, hit)
    seq.num_cached = len(tokens)  # what the forward pass marks
    pool.commit(seq, _chain(tokens))
    return seq


def test_hash_chain_names_a_block_by_its_tokens_and_everything_before():
    a = list(range(10, 22))  # three blocks
    b = [*a[:4], 99, *a[5:]]  # differs in the second block only
    ha, hb = _chain(a), _chain(b)
    assert len(ha) == 3 and len(set(ha)) == 3
    assert ha[0] == hb[0], "same first block, same name"
    assert ha[1] != hb[1] and ha[2] != hb[2], "a different earlier block renames every later one"
    assert hash_block(None, a[8:12]) != ha[2], "the parent is part of the name"
    assert _chain(a) == ha, "deterministic"
    assert hash_block(None, [1, 2, 3, 4]) != hash_block(None, [1, 2, 3, 4 + 2**40]), "ids are hashed as int64"


def test_sequence_hashes_prompt_and_output_incrementally():
    request = GenerationRequest(request_id="r", prompt_token_ids=tuple(range(3, 9)), max_new_tokens=8)
    seq = Sequence(request=request, seed=None)
    assert len(seq.full_block_hashes(1, S)) == 1
    seq.output_ids.extend([40, 41, 42])
    hashes = seq.full_block_hashes(2, S)
    assert hashes == _chain([*list(range(3, 9)), 40, 41]), "blocks spanning prompt and output chain the same way"


def test_shared_prefix_is_reference_counted():
    pool = _pool()
    prompt = list(range(3, 3 + 10))  # 2 full blocks + 2 tokens
    a = _run(pool, prompt)
    hit = pool.find_prefix(_chain([*prompt, 50, 51])[:2])
    assert hit.blocks == tuple(a.blocks[:2]) and hit.first == 0
    b = _run(pool, [*prompt, 50, 51], hit)
    assert b.blocks[:2] == a.blocks[:2] and b.blocks[2] != a.blocks[2]
    refs = pool.allocator.ref_counts
    assert [refs[x] for x in a.blocks] == [2, 2, 1]
    pool.release(a)
    assert [refs[x] for x in b.blocks] == [1, 1, 1]
    assert pool.usage == 3 / 16
    shared = tuple(b.blocks[:2])
    pool.release(b)
    assert pool.usage == 0.0 and not any(refs) and b.blocks == []
    assert pool.find_prefix(_chain(prompt)).blocks == shared, "freed blocks stay cached"


def _evict(pool: KVCachePool, name: bytes) -> list[int]:
    """Allocates the free blocks up to and including the one named `name` (evicting it); returns them, held."""
    block = pool.allocator.lookup(name)
    assert block is not None and pool.allocator.ref_counts[block] == 0
    return pool.allocator.allocate(pool.allocator.free_order().index(block) + 1)


def test_eviction_takes_unnamed_blocks_first_then_least_recently_released():
    pool = _pool(num_blocks=8)
    prompts = {name: [i * 10 + t for t in range(S)] for i, name in enumerate("abc")}
    seqs = {name: _run(pool, [*p, 7]) for name, p in prompts.items()}  # a named full block, an unnamed partial one
    block = {name: seqs[name].blocks[0] for name in "abc"}
    for name in "abc":
        pool.release(seqs[name])
    order = pool.allocator.free_order()
    assert order[-3:] == [block["a"], block["b"], block["c"]], "named blocks last, in the order released"
    assert all(pool.allocator.name_of(b) is None for b in order[:-3])
    # a's block serves a cache hit, then is released again: now the most recently used
    pool.release(_run(pool, prompts["a"] + [8], pool.find_prefix(_chain(prompts["a"]))))
    assert pool.allocator.free_order()[-3:] == [block["b"], block["c"], block["a"]]
    pool.allocator.allocate(pool.allocator.num_free - 2)  # every unnamed block, then the least recently used
    assert pool.find_prefix(_chain(prompts["b"])) == PrefixHit()
    assert pool.find_prefix(_chain(prompts["c"])).blocks == (block["c"],)
    assert pool.find_prefix(_chain(prompts["a"])).blocks == (block["a"],)
    assert pool.allocator.num_evicted == 1


def test_full_attention_release_evicts_a_prefix_from_its_tail():
    pool = _pool()
    tokens = list(range(3, 3 + 16))
    hashes = _chain(tokens)
    seq = _run(pool, tokens)
    table = list(seq.blocks)
    pool.release(seq)
    assert pool.allocator.free_order()[-4:] == table[::-1], "the last block is the first to be evicted"
    _evict(pool, hashes[3])
    assert pool.find_prefix(hashes) == PrefixHit(0, tuple(table[:3])), "the rest of the prefix still serves"
    _evict(pool, hashes[1])
    assert pool.find_prefix(hashes) == PrefixHit(0, (table[0],))


def test_window_prefix_needs_only_the_blocks_of_the_window_before_its_end():
    pool = _pool(num_blocks=32, window=10)  # the first new token needs ceil(9 / 4) = 3 blocks before it
    tokens = list(range(3, 3 + 32))  # 8 blocks
    hashes = _chain(tokens)
    seq = _run(pool, tokens)
    assert seq.num_dropped == (32 - 10 + 1) // S == 5, "blocks the next query's window passed are released"
    assert seq.blocks[:5] == [NULL_BLOCK] * 5 and pool.usage == 3 / 32
    pool.release(seq)
    hit = pool.find_prefix(hashes)
    assert (hit.first, len(hit.blocks)) == (5, 3)
    missing = hash_block(None, [0] * S)  # a name no block holds
    holed = pool.find_prefix([*hashes[:6], missing, *hashes[7:]])
    assert (holed.first, holed.num_blocks) == (3, 6), "the prefix ends before a hole in its last window"
    _evict(pool, hashes[3])  # blocks 0..3 (released first) and every never-used block
    assert [pool.allocator.lookup(h) is None for h in hashes] == [True] * 4 + [False] * 4
    assert pool.find_prefix(hashes) == hit, "the head of the prefix is not needed"
    assert pool.find_prefix([*hashes[:6], missing, *hashes[7:]]) == PrefixHit(), (
        "blocks 4 and 5 are fewer than a window, and block 0 is gone")


def test_window_sequence_reads_the_window_after_a_hit():
    """The table after a hit is linear: NULL entries before the window, the hit blocks, then new blocks; the next
    query's keys are all in held blocks."""
    from workers.model.attention import SequenceChunk, build_attention_metadata

    pool = _pool(num_blocks=32, window=10)
    tokens = list(range(3, 3 + 30))
    pool.release(_run(pool, tokens))
    hit = pool.find_prefix(_chain(tokens)[:7])
    seq = SequenceBlocks()
    pool.reserve(seq, 2, hit)
    assert seq.num_cached == 28 and len(seq.blocks) == 8 and seq.blocks[: hit.first] == [NULL_BLOCK] * hit.first
    meta = build_attention_metadata(pool, [SequenceChunk(seq, 28, 2)])
    key_slots = meta.groups[0].key_slots_BLk[0].tolist()
    held = {b * S + i for b in seq.blocks[seq.num_dropped :] for i in range(S)}
    assert len(key_slots) == 11 and set(key_slots) <= held  # positions 19..29


def test_reservation_from_a_prefix_is_all_or_nothing():
    pool = _pool(num_blocks=5)
    tokens = list(range(3, 3 + 12))
    pool.release(_run(pool, tokens))  # 3 named blocks, all free
    hit = pool.find_prefix(_chain(tokens)[:2])
    seq = SequenceBlocks()
    with pytest.raises(CacheFull):  # 2 revived + 4 new > 5 free
        pool.reserve(seq, 16, hit)
    assert seq.blocks == [] and seq.num_cached == 0 and pool.usage == 0.0
    pool.reserve(seq, 12, hit)  # 2 revived + 3 new
    assert pool.usage == 1.0 and seq.num_cached == 8 and seq.num_committed == 2


def test_a_block_computed_twice_keeps_its_first_name():
    pool = _pool()
    tokens = list(range(3, 3 + 8))
    a, b = _run(pool, tokens), _run(pool, tokens)
    assert pool.allocator.lookup(_chain(tokens)[0]) == a.blocks[0]
    assert pool.allocator.name_of(b.blocks[0]) is None
    private = set(b.blocks)
    pool.release(b)
    assert set(pool.allocator.free_order()[:2]) == private, "unnamed blocks are the first to go"


def test_no_caching_keeps_the_ring_and_names_nothing():
    pool = _pool(window=10, caching=False)
    seq = _run(pool, list(range(3, 3 + 40)))
    assert len(seq.blocks) == 3 and pool.allocator.num_named == 0
    assert pool.find_prefix(_chain(list(range(3, 3 + 40)))) == PrefixHit()


def test_switching_needs_an_idle_pool_and_off_forgets():
    pool = _pool()
    seq = _run(pool, list(range(3, 3 + 8)))
    with pytest.raises(RuntimeError, match="hold 2 KV blocks"):
        pool.set_prefix_caching(False)
    pool.release(seq)
    pool.set_prefix_caching(False)
    assert pool.allocator.num_named == 0


def test_scheduler_never_reuses_the_last_token_and_counts_lookups():
    pool = _pool(num_blocks=32)
    scheduler = Scheduler(SchedulerConfig(max_batched_tokens=64), pool)
    held: list[Sequence] = []

    def admit(rid: str, prompt: list[int]) -> Sequence:
        seq = Sequence(request=GenerationRequest(request_id=rid, prompt_token_ids=tuple(prompt), max_new_tokens=4),
                       seed=None)
        scheduler.add(seq)
        (scheduled,) = scheduler.schedule()
        seq.blocks.num_cached = scheduled.chunk.start + scheduled.chunk.num_new  # what the forward pass marks
        scheduler.commit([scheduled])
        scheduler.running.remove(seq)  # parked, blocks held: the next schedule() sees only the next one
        held.append(seq)
        return seq

    prompt = list(range(3, 3 + 12))  # exactly 3 blocks
    a = admit("a", prompt)
    assert (scheduler.prefix_cache_queries, scheduler.prefix_cache_hits) == (12, 0)
    b = admit("b", prompt)
    assert scheduler.prefix_cache_hits == 8, "the last block is computed again: its last token must be"
    assert b.blocks.blocks[:2] == a.blocks.blocks[:2] and b.blocks.blocks[2] != a.blocks.blocks[2]
    admit("c", [*prompt, 7])
    assert (scheduler.prefix_cache_queries, scheduler.prefix_cache_hits) == (37, 20)
    assert [pool.allocator.ref_counts[x] for x in a.blocks.blocks] == [3, 3, 2]
    for seq in held:
        pool.release(seq.blocks)
    assert pool.usage == 0.0


def test_allocator_asserts_its_invariants():
    allocator = BlockAllocator(2)
    (block,) = allocator.allocate(1)
    allocator.release([block])
    with pytest.raises(AssertionError):
        allocator.release([block])
    with pytest.raises(AssertionError):
        allocator.share(block)  # holds no name
