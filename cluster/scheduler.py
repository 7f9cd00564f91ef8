"""Iteration-level scheduling: which sequences run in the next step and how many tokens each.

Running sequences decode first (one token each), then unfinished prefills continue, then waiting
requests are admitted first-come-first-served, all under a per-step token budget (chunked prefill)
and the KV pool's free blocks. When decoding runs out of blocks the newest running sequence is
preempted and later recomputed. Knows nothing of the model: token counts and blocks only.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field

from cluster.requests import GenerationRequest
from workers.model.attention import SequenceChunk
from workers.model.kv_cache import CacheFull, KVCachePool, SequenceBlocks


@dataclass(frozen=True, kw_only=True)
class SchedulerConfig:
    max_num_seqs: int = 64
    max_batched_tokens: int = 1024
    max_waiting: int = 256

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

    def token_ids(self, start: int, end: int) -> list[int]:
        """Ids at positions [start, end) of prompt + output, without copying the rest (a decode step reads
        one id of a long sequence)."""
        prompt = self.request.prompt_token_ids
        if start >= len(prompt):
            return self.output_ids[start - len(prompt) : end - len(prompt)]
        return list(prompt[start:end]) + self.output_ids[: max(0, end - len(prompt))]

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
            num_new = min(seq.num_pending, budget)
            if not self._reserve_running(seq, num_new):
                continue
            plan.append(self._chunk(seq, num_new))
            budget -= num_new
        while self.waiting and budget > 0 and len(self.running) < self.config.max_num_seqs:
            seq = self.waiting[0]
            num_new = min(seq.num_pending, budget)
            try:
                self.pool.reserve(seq.blocks, num_new)
            except CacheFull:
                break
            self.running.append(self.waiting.popleft())
            plan.append(self._chunk(seq, num_new))
            budget -= num_new
        return plan

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
