"""The engine: requests in, token updates out, one batched forward pass per step.

Knows nothing of tokenization or transport; it validates token-level limits, schedules, runs the
attention rank (whose experts may live anywhere) and samples.
"""

from __future__ import annotations

import time
from itertools import accumulate

import torch

from cluster.engine_stats import EngineStats
from cluster.errors import InvalidRequest
from cluster.requests import GenerationRequest, GenerationResult, SequenceUpdate
from cluster.scheduler import ScheduledChunk, Scheduler, SchedulerConfig, Sequence
from workers.model.sampler import draw_seed, sample_next
from workers.runtime.attention_rank import AttentionRank
from workers.runtime.timing import StepTimings


class LLMEngine:
    def __init__(self, rank: AttentionRank, config: SchedulerConfig | None = None) -> None:
        self.rank = rank
        self.cfg = rank.model.cfg
        self.scheduler = Scheduler(config or SchedulerConfig(), rank.pool)
        self.sequences: dict[str, Sequence] = {}
        self.stats = EngineStats(rank.model.cfg.num_hidden_layers, rank.model.cfg.num_local_experts, rank.model.device)
        rank.routed_tokens_LE = self.stats.routed_tokens_LE

    @property
    def max_model_len(self) -> int:
        return self.cfg.max_position_embeddings

    def validate(self, request: GenerationRequest) -> None:
        prompt = request.prompt_token_ids
        if not prompt:
            raise InvalidRequest("prompt_token_ids", "the prompt is empty")
        if len(prompt) >= self.max_model_len:
            raise InvalidRequest(
                "prompt_token_ids", f"prompt has {len(prompt)} tokens; the context holds {self.max_model_len}"
            )
        bad = next((t for t in prompt if not 0 <= t < self.cfg.vocab_size), None)
        if bad is not None:
            raise InvalidRequest("prompt_token_ids", f"token id {bad} is outside [0, {self.cfg.vocab_size})")
        if request.max_new_tokens < 1:
            raise InvalidRequest("max_new_tokens", f"must be at least 1, got {request.max_new_tokens}")
        total = min(len(prompt) + request.max_new_tokens, self.max_model_len)
        if self.rank.pool.max_blocks_held(total) > self.rank.pool.spec.num_blocks:
            raise InvalidRequest("max_new_tokens", f"{total} tokens do not fit in the KV cache")
        if request.request_id in self.sequences:
            raise InvalidRequest("request_id", f"{request.request_id!r} is already running")

    def add_request(self, request: GenerationRequest) -> None:
        self.validate(request)
        sampling = request.sampling
        seed = None if sampling.greedy else (sampling.seed if sampling.seed is not None else draw_seed())
        seq = Sequence(request=request, seed=seed, arrival=time.monotonic())
        self.sequences[request.request_id] = seq
        self.scheduler.add(seq)

    def abort(self, request_id: str) -> SequenceUpdate | None:
        seq = self.sequences.pop(request_id, None)
        if seq is None:
            return None
        self.scheduler.remove(seq)
        return SequenceUpdate(request_id, (), (), "abort")

    def has_work(self) -> bool:
        return self.scheduler.has_work()

    def step(self) -> list[SequenceUpdate]:
        scheduler = self.scheduler
        before = (scheduler.num_preemptions, scheduler.prefix_cache_queries, scheduler.prefix_cache_hits)
        plan = scheduler.schedule()
        self.stats.preemptions += scheduler.num_preemptions - before[0]
        self.stats.prefix_cache_queries += scheduler.prefix_cache_queries - before[1]
        self.stats.prefix_cache_hits += scheduler.prefix_cache_hits - before[2]
        if not plan:
            return []
        timings = StepTimings.for_device(self.rank.model.device)
        now = time.monotonic()
        for s in plan:
            if s.seq.first_scheduled is None:
                s.seq.first_scheduled = now
        token_ids = [t for s in plan for t in s.seq.token_ids(s.chunk.start, s.chunk.start + s.chunk.num_new)]
        h_TD = self.rank.forward(torch.tensor(token_ids, dtype=torch.int64), [s.chunk for s in plan], timings)
        scheduler.commit(plan)  # before sampling, which frees the blocks of the sequences it finishes
        sampled = [s for s in plan if s.completes]
        updates = self._sample(plan, sampled, h_TD, timings) if sampled else []
        self.stats.record_step(len(plan), len(token_ids), timings)
        return updates

    def _sample(
        self, plan: list[ScheduledChunk], sampled: list[ScheduledChunk], h_TD: torch.Tensor, timings: StepTimings
    ) -> list[SequenceUpdate]:
        last_rows = [end - 1 for end in accumulate(s.chunk.num_new for s in plan)]
        rows = torch.tensor([row for row, s in zip(last_rows, plan, strict=True) if s.completes])
        with timings.phase("sampling"):
            logits_BV = self.rank.logits(h_TD[rows.to(h_TD.device)])
            params = [s.seq.request.sampling for s in sampled]
            seqs = [s.seq for s in sampled]
            ids_B, logprobs_B = sample_next(logits_BV, params, [q.seed for q in seqs], [q.num_tokens for q in seqs])
            ids, logprobs = ids_B.tolist(), logprobs_B.tolist()
            return [self._append(s, t, lp) for s, t, lp in zip(sampled, ids, logprobs, strict=True)]

    def _append(self, scheduled: ScheduledChunk, token_id: int, logprob: float) -> SequenceUpdate:
        seq = scheduled.seq
        seq.output_ids.append(token_id)
        reason = self._finish_reason(seq, token_id)
        if reason is not None:
            seq.finish_reason = reason
            self.scheduler.remove(seq)
            del self.sequences[seq.request.request_id]
        queue_s = None
        if len(seq.output_ids) == 1 and seq.first_scheduled is not None:
            queue_s = seq.first_scheduled - seq.arrival
        return SequenceUpdate(seq.request.request_id, (token_id,), (logprob,), reason, queue_seconds=queue_s)

    def _finish_reason(self, seq: Sequence, token_id: int) -> str | None:
        request = seq.request
        if not request.ignore_eos and token_id in self.cfg.eos_token_ids:
            return "eos"
        if token_id in request.stop_token_ids:
            return "stop"
        if len(seq.output_ids) >= request.max_new_tokens or seq.num_tokens >= self.max_model_len:
            return "length"
        return None

    def generate(self, requests: list[GenerationRequest]) -> list[GenerationResult]:
        """Offline: run the given requests to completion together; results in request order."""
        results = {r.request_id: GenerationResult(r.request_id, r.prompt_token_ids) for r in requests}
        for request in requests:
            self.add_request(request)
        while self.has_work():
            for update in self.step():
                result = results[update.request_id]
                result.token_ids.extend(update.token_ids)
                result.logprobs.extend(update.logprobs)
                result.finish_reason = update.finish_reason or result.finish_reason
        return [results[r.request_id] for r in requests]
