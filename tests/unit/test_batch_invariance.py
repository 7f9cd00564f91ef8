"""A sequence decoded alone and inside a batch of other lengths gives the same greedy tokens."""

from __future__ import annotations

import torch

from cluster.engine import LLMEngine
from cluster.requests import GenerationRequest
from cluster.scheduler import SchedulerConfig
from workers.runtime.local_build import build_attention_rank


def _engine(model_dir, **scheduler) -> LLMEngine:
    rank = build_attention_rank(model_dir, dtype=torch.float32, device=torch.device("cpu"), num_blocks=256,
                                block_size=4)
    return LLMEngine(rank, SchedulerConfig(**scheduler))


def _request(rid: str, prompt: list[int], n: int = 24) -> GenerationRequest:
    return GenerationRequest(request_id=rid, prompt_token_ids=tuple(prompt), max_new_tokens=n, ignore_eos=True)


def test_alone_equals_in_batch(tiny8):
    gen = torch.Generator().manual_seed(1)
    target = torch.randint(3, 256, (13,), generator=gen).tolist()
    others = [torch.randint(3, 256, (n,), generator=gen).tolist() for n in (2, 30, 7, 19, 1)]
    (alone,) = _engine(tiny8).generate([_request("t", target)])
    batch = [_request(f"o{i}", p, n=8 + 5 * i) for i, p in enumerate(others[:3])]
    batch += [_request("t", target)] + [_request(f"o{i + 3}", p) for i, p in enumerate(others[3:])]
    results = {r.request_id: r for r in _engine(tiny8).generate(batch)}
    assert results["t"].token_ids == alone.token_ids
    assert len(alone.token_ids) == 24


def test_arrival_mid_decode_and_preemption_keep_tokens(tiny8):
    """Requests joining while others decode, under a cache too small for all of them: running sequences are
    preempted (their blocks freed, their tokens recomputed later), and every sequence still gives the tokens
    it gives alone."""
    gen = torch.Generator().manual_seed(2)
    prompts = [torch.randint(3, 256, (n,), generator=gen).tolist() for n in (9, 17, 4, 12)]
    solo = [_engine(tiny8).generate([_request(str(i), p)])[0].token_ids for i, p in enumerate(prompts)]
    # tiny8's window is 16 tokens: a sequence of more than 12 tokens holds a ring of 4 blocks of 4, and
    # every sequence here grows past that. Four of them want 16 blocks; the pool has 10.
    rank = build_attention_rank(tiny8, dtype=torch.float32, device=torch.device("cpu"), num_blocks=10, block_size=4)
    engine = LLMEngine(rank, SchedulerConfig(max_batched_tokens=16))
    preempted = _count_preemptions(engine)
    outputs: dict[str, list[int]] = {}
    pending = [_request(str(i), p) for i, p in enumerate(prompts)]
    engine.add_request(pending.pop(0))
    while engine.has_work() or pending:
        if pending and len(outputs.get("0", [])) in (3, 6, 9):
            engine.add_request(pending.pop(0))
        for update in engine.step():
            outputs.setdefault(update.request_id, []).extend(update.token_ids)
    assert preempted, "the cache never ran out: nothing was preempted"
    assert engine.scheduler.num_preemptions == len(preempted)
    snapshot = engine.stats.take(num_running=0, num_waiting=0, kv_cache_usage=0.0)  # what the metrics export
    assert snapshot.preemptions == len(preempted)
    assert any(len(tokens) > 0 for tokens in preempted), f"only sequences without output were preempted: {preempted}"
    assert [outputs[str(i)] for i in range(4)] == solo
    assert rank.pool.usage == 0.0


def _count_preemptions(engine: LLMEngine) -> list[list[int]]:
    """Records, for each preemption, the output the preempted sequence had: a preemption is the scheduler
    freeing the blocks of a live, unfinished sequence (a finished one has its finish reason set first)."""
    preempted: list[list[int]] = []
    pool = engine.scheduler.pool
    release = pool.release

    def spy(blocks):
        for seq in engine.sequences.values():
            if seq.blocks is blocks and seq.finish_reason is None:
                preempted.append(list(seq.output_ids))
        release(blocks)

    pool.release = spy
    return preempted
