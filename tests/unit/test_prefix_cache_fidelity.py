"""Prefix caching changes no token: the in-process engine gives the same greedy tokens with the cache on and off,
and the same as transformers, on prompts that share long prefixes (one system prompt; multi-turn chats that
resend the whole conversation), for full attention and sliding windows, with a KV cache roomy enough to keep
every block and with one so small that cached blocks are evicted and running sequences preempted."""

from __future__ import annotations

from dataclasses import dataclass

import pytest
import torch

from cluster.engine import LLMEngine
from cluster.engine_stats import StatsSnapshot
from cluster.requests import GenerationRequest
from cluster.scheduler import SchedulerConfig
from tests.reference import hf_greedy, load_hf
from workers.runtime.local_build import build_attention_rank

BLOCK = 4
NEW_TOKENS = 10
MODELS = ["tiny8", "window8_top2_gqa2", "top1_mha"]  # windows of 16 and 8 tokens, full attention


@dataclass(frozen=True)
class Workload:
    waves: list[list[GenerationRequest]]  # each wave runs to completion before the next arrives
    reference: dict[str, list[int]]  # transformers' greedy tokens per request id


def _request(rid: str, prompt: list[int]) -> GenerationRequest:
    return GenerationRequest(request_id=rid, prompt_token_ids=tuple(prompt), max_new_tokens=NEW_TOKENS,
                             ignore_eos=True)


def _workload(model_dir) -> Workload:
    """A 41-token system prompt before six user turns, the same request twice, the system prompt cut at a block
    boundary, and two chats of three turns, each turn the whole conversation so far plus 5 new tokens."""
    hf = load_hf(model_dir)
    gen = torch.Generator().manual_seed(5)

    def tokens(n: int) -> list[int]:
        return torch.randint(3, hf.config.vocab_size, (n,), generator=gen).tolist()

    system = tokens(41)
    users = {f"sys{i}": system + tokens(n) for i, n in enumerate((3, 9, 1, 6, 12, 4))}
    users["repeat"] = list(users["sys0"])
    users["aligned"] = system[:40]
    reference = {rid: hf_greedy(hf, prompt, NEW_TOKENS)[0] for rid, prompt in users.items()}
    chats: dict[str, list[int]] = {}
    for chat in "ab":
        prompt = system + tokens(6)
        for turn in range(3):
            rid = f"chat{chat}{turn}"
            chats[rid] = prompt
            reference[rid] = hf_greedy(hf, prompt, NEW_TOKENS)[0]
            prompt = prompt + reference[rid] + tokens(5)
    prompts = users | chats
    waves = [["sys0"], ["sys1", "sys2", "sys3"], ["chata0", "chatb0", "sys4"],
             ["chata1", "chatb1", "sys5", "repeat"], ["chata2", "chatb2", "aligned"]]
    return Workload([[_request(rid, prompts[rid]) for rid in wave] for wave in waves], reference)


@pytest.fixture(scope="module")
def workloads(tiny8, tiny_checkpoints):
    """model name -> (checkpoint dir, workload), built once per module (transformers' greedy runs are the cost)."""
    cache: dict[str, tuple] = {}

    def get(name: str) -> tuple:
        if name not in cache:
            model_dir = tiny8 if name == "tiny8" else tiny_checkpoints[name]
            cache[name] = (model_dir, _workload(model_dir))
        return cache[name]

    return get


def _run(model_dir, workload: Workload, *, caching: bool, num_blocks: int,
         max_batched_tokens: int) -> tuple[dict[str, list[int]], StatsSnapshot, LLMEngine]:
    rank = build_attention_rank(model_dir, dtype=torch.float32, device=torch.device("cpu"), num_blocks=num_blocks,
                                block_size=BLOCK)
    engine = LLMEngine(rank, SchedulerConfig(max_batched_tokens=max_batched_tokens,
                                             enable_prefix_caching=caching))
    outputs = {}
    for wave in workload.waves:
        for result in engine.generate(wave):
            outputs[result.request_id] = result.token_ids
    stats = engine.stats.take(num_running=0, num_waiting=0, kv_cache_usage=rank.pool.usage)
    assert rank.pool.usage == 0.0 and not any(rank.pool.allocator.ref_counts), "every reference was dropped"
    return outputs, stats, engine


# (num_blocks, max_batched_tokens): every block stays cached; a cache so small that cached blocks are evicted
# and running sequences preempted (the longest sequence, 87 tokens, needs 22 blocks with full attention, 5
# between steps with a window of 16)
ROOMY, TIGHT = (512, 64), {"tiny8": (14, 16), "window8_top2_gqa2": (10, 16), "top1_mha": (30, 16)}


@pytest.mark.parametrize("model", MODELS)
@pytest.mark.parametrize("pressure", ["roomy", "tight"])
def test_same_tokens_with_and_without_prefix_cache(workloads, model, pressure):
    model_dir, workload = workloads(model)
    num_blocks, budget = ROOMY if pressure == "roomy" else TIGHT[model]
    cached, stats, engine = _run(model_dir, workload, caching=True, num_blocks=num_blocks, max_batched_tokens=budget)
    uncached, off_stats, _ = _run(model_dir, workload, caching=False, num_blocks=num_blocks,
                                  max_batched_tokens=budget)
    assert cached == uncached == workload.reference, f"{model}, {pressure}: tokens differ"
    assert off_stats.prefix_cache_queries == off_stats.prefix_cache_hits == 0
    hit_rate = stats.prefix_cache_hits / stats.prefix_cache_queries
    print(f"{model} {pressure}: prefix-cache hit rate {hit_rate:.1%} ({stats.prefix_cache_hits} of "
          f"{stats.prefix_cache_queries} tokens), {stats.preemptions} preemptions, "
          f"{engine.rank.pool.allocator.num_evicted} cached blocks evicted")
    if pressure == "roomy":
        assert hit_rate > 0.5, f"{model}: only {hit_rate:.1%} of looked-up tokens reused"
        assert stats.preemptions == 0 and engine.rank.pool.allocator.num_evicted == 0
    else:
        assert stats.prefix_cache_hits > 0, f"{model}: no prefix reused under pressure"
        assert stats.preemptions > 0, f"{model}: the cache never ran out: nothing was preempted"
        assert engine.rank.pool.allocator.num_evicted > 0, f"{model}: no cached block was evicted"
