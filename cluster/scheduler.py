"""Iteration-level scheduling: which sequences run in the next step and how many tokens each.

Running sequences decode first (one token each), then unfinished prefills continue, then waiting
requests are admitted first-come-first-served, all under a per-step token budget (chunked prefill)
and the KV pool's free blocks. When decoding runs out of blocks the newest running sequence is
preempted and later recomputed. Knows nothing of the model: token counts and blocks only.

Prefix caching (on by default; `SchedulerConfig.enable_prefix_caching`): a sequence admitted from the waiting
queue (new, or preempted and now recomputed) starts after the longest run of cached blocks its tokens reuse
(never its last token: the step must yield its logits), and after every step the blocks it filled are offered
to the cache (`commit`). See workers.model.kv_cache for blocks, sharing, eviction and sliding windows.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field

from cluster.requests import GenerationRequest
from workers.model.attention import SequenceChunk
from workers.model.kv_cache import CacheFull, KVCachePool, PrefixHit, SequenceBlocks
from workers.model.prefix_cache import BlockHash, hash_block


@dataclass(frozen=True, kw_only=True)
class SchedulerConfig:
    max_num_seqs: int = 64
    max_batched_tokens: int = 1024
    max_waiting: int = 256
    enable_prefix_caching: bool = True  # reuse the KV blocks of shared prompt prefixes (workers.model.kv_cache)

    def __post_init__(self) -> None:
        for name in ("max_num_seqs", "max_batched_tokens", "max_waiting"):
            if getattr(self, name) <= 0:
                raise ValueError(f"{name} must be positive, got {getattr(self, name)}")


@dataclass(eq=False)
class Sequence:
    request: GenerationRequest
    seed: int | None  # the sampling noise's seed (None for greedy requests); see workers.model.sampler
    blocks: SequenceBlocks = field(default_factory=SequenceBlocks)
    output_ids: list[int] = field(default_factory=list)
    finish_reason: str | None = None
    arrival: float = 0.0
    first_scheduled: float | None = None
    block_hashes: list[BlockHash] = field(default_factory=list)  # names of its first full blocks (a hash chain)

    def token_ids(self, start: int, end: int) -> list[int]:
        """Ids at positions [start, end) of prompt + output, without copying the rest (a decode step reads
        one id of a long sequence)."""
        prompt = self.request.prompt_token_ids
        if start >= len(prompt):
            return self.output_ids[start - len(prompt) : end - len(prompt)]
        return list(prompt[start:end]) + self.output_ids[: max(0, end - len(prompt))]

    def full_block_hashes(self, num_blocks: int, block_size: int) -> list[BlockHash]:
        """The names of (at least) its first num_blocks full blocks, hashing only those not named before."""
        hashes = self.block_hashes
        while len(hashes) < num_blocks:
            start = len(hashes) * block_size
            hashes.append(hash_block(hashes[-1] if hashes else None, self.token_ids(start, start + block_size)))
        return hashes

    @property
    def num_tokens(self) -> int:
        return len(self.request.prompt_token_ids) + len(self.output_ids)

    @property
    def num_pending(self) -> int:
        """Tokens whose K/V are not cached yet (the rest of the prompt, or the last sampled token)."""
        return self.num_tokens - self.blocks.num_cached


@dataclass(frozen=True)
class ScheduledChunk:
    seq: Sequence
    chunk: SequenceChunk

    @property
    def completes(self) -> bool:
        """After this chunk the sequence is fully cached, so its last row is sampled."""
        return self.chunk.start + self.chunk.num_new == self.seq.num_tokens


class Scheduler:
    def __init__(self, config: SchedulerConfig, pool: KVCachePool) -> None:
        self.config = config
        self.pool = pool
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []
        self.num_preemptions = 0  # running sequences evicted so far to free KV blocks (recomputed later)
        self.prefix_cache_queries = 0  # tokens of admitted sequences looked up in the prefix cache so far
        self.prefix_cache_hits = 0  # of those, tokens whose cached K/V were reused (not computed)
        pool.set_prefix_caching(config.enable_prefix_caching)

    def has_work(self) -> bool:
        return bool(self.waiting or self.running)

    def add(self, seq: Sequence) -> None:
        self.waiting.append(seq)

    def remove(self, seq: Sequence) -> None:
        """Drop a sequence wherever it is and free its blocks at once."""
        if seq in self.running:
            self.running.remove(seq)
        elif seq in self.waiting:
            self.waiting.remove(seq)
        self.pool.release(seq.blocks)

    def schedule(self) -> list[ScheduledChunk]:
        budget = self.config.max_batched_tokens
        plan: list[ScheduledChunk] = []
        for seq in list(self.running):
            if budget <= 0:
                break
            if seq not in self.running:  # preempted while making room for an earlier one
                continue
            num_new = min(seq.num_pending, budget, self.pool.max_new_tokens(seq.blocks))
            if not self._reserve_running(seq, num_new):
                continue
            plan.append(self._chunk(seq, num_new))
            budget -= num_new
        while self.waiting and budget > 0 and len(self.running) < self.config.max_num_seqs:
            seq = self.waiting[0]
            num_new = self._admit(seq, budget)
            if num_new is None:
                break
            self.running.append(self.waiting.popleft())
            plan.append(self._chunk(seq, num_new))
            budget -= num_new
        return plan

    def _admit(self, seq: Sequence, budget: int) -> int | None:
        """Reserves the first chunk of a waiting sequence, after the cached prefix it reuses; the chunk's tokens,
        or None when the pool has no room for it."""
        hit = PrefixHit()
        if self.pool.prefix_caching:
            size = self.pool.spec.block_size
            usable = (seq.num_tokens - 1) // size  # the last token's block is computed: its step samples
            hit = self.pool.find_prefix(seq.full_block_hashes(usable, size)[:usable])
        reused = hit.num_blocks * self.pool.spec.block_size
        num_new = min(seq.num_tokens - reused, budget, self.pool.max_new_tokens(seq.blocks, hit))
        try:
            self.pool.reserve(seq.blocks, num_new, hit)
        except CacheFull:
            return None
        if self.pool.prefix_caching:
            self.prefix_cache_queries += seq.num_tokens
            self.prefix_cache_hits += reused
        return num_new

    def commit(self, plan: list[ScheduledChunk]) -> None:
        """After the step's forward pass wrote the plan's K/V: offers the blocks it filled to the prefix cache
        (and lets windowed sequences release the blocks their windows passed)."""
        if not self.pool.prefix_caching:
            return
        size = self.pool.spec.block_size
        for scheduled in plan:
            blocks = scheduled.seq.blocks
            self.pool.commit(blocks, scheduled.seq.full_block_hashes(blocks.num_cached // size, size))

    def _chunk(self, seq: Sequence, num_new: int) -> ScheduledChunk:
        return ScheduledChunk(seq, SequenceChunk(seq.blocks, seq.blocks.num_cached, num_new))

    def _reserve_running(self, seq: Sequence, num_new: int) -> bool:
        """Reserve blocks for a running sequence, preempting the newest others; False if seq itself went."""
        while True:
            try:
                self.pool.reserve(seq.blocks, num_new)
                return True
            except CacheFull:
                victim = self.running[-1]
                self.num_preemptions += 1
                self.running.remove(victim)
                self.pool.release(victim.blocks)
                self.waiting.appendleft(victim)
                if victim is seq:
                    return False
