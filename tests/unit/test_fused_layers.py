"""Fused layer segments (compiled for small steps) give the eager engine's tokens, logprobs and routing."""

from __future__ import annotations

from collections import Counter

import pytest
import torch

from cluster.engine import LLMEngine
from cluster.requests import GenerationRequest
from cluster.scheduler import SchedulerConfig
from tests.tiny_models import TINY_VARIANTS
from workers.model import fused_decode
from workers.model.experts import pack_experts
from workers.model.fused_decode import FusedSegments, post_attention, pre_attention
from workers.model.weights import ExpertShard
from workers.runtime.attention_rank import LocalExperts
from workers.runtime.local_build import build_attention_rank, fused_layers_for

CPU = torch.device("cpu")


def _rank(model_dir, **kwargs):
    return build_attention_rank(model_dir, dtype=torch.float32, device=CPU, num_blocks=256, block_size=4, **kwargs)


def _requests(seed: int, lengths: tuple[int, ...], new_tokens: int = 20) -> list[GenerationRequest]:
    gen = torch.Generator().manual_seed(seed)
    prompts = [tuple(torch.randint(3, 256, (n,), generator=gen).tolist()) for n in lengths]
    return [
        GenerationRequest(request_id=f"r{i}", prompt_token_ids=p, max_new_tokens=new_tokens, ignore_eos=True)
        for i, p in enumerate(prompts)
    ]


def _run(rank, requests, max_batched_tokens: int = 32):
    results = LLMEngine(rank, SchedulerConfig(max_batched_tokens=max_batched_tokens)).generate(requests)
    return {r.request_id: r for r in results}


def _eager_segments() -> FusedSegments:
    """The segments uncompiled: the numerics reference for the compiled ones."""
    return FusedSegments(pre=pre_attention, post=post_attention)


def _counting(segments: FusedSegments, calls: Counter) -> FusedSegments:
    def pre(*args):
        calls["pre"] += 1
        return segments.pre(*args)

    def post(*args):
        calls["post"] += 1
        return segments.post(*args)

    return FusedSegments(pre=pre, post=post)


def _assert_same(fused: dict, eager: dict) -> None:
    assert fused.keys() == eager.keys()
    for rid, result in eager.items():
        assert fused[rid].token_ids == result.token_ids, rid
        torch.testing.assert_close(torch.tensor(fused[rid].logprobs), torch.tensor(result.logprobs), atol=1e-4, rtol=0)


@pytest.mark.parametrize("variant", sorted(TINY_VARIANTS))
def test_fused_segments_match_the_eager_layers(tiny_checkpoints, variant):
    """Every tiny variant (sliding windows that wrap, GQA, top-1/2/3): same tokens, logprobs within 1e-4,
    same routed-row counts; the fused path ran for the small steps and the eager one for the larger."""
    model_dir = tiny_checkpoints[variant]
    requests = _requests(3, (5, 31, 12, 1))
    eager_rank = _rank(model_dir)
    fused_rank = _rank(model_dir)
    calls: Counter = Counter()
    fused_rank.fused = fused_layers_for(fused_rank.model, fused_rank.experts, _counting(_eager_segments(), calls))
    assert fused_rank.fused is not None
    fused_rank.fused.max_tokens = 8  # steps of more tokens take the eager layers
    # a 10-token step budget: prefill chunks of up to 10 tokens, alone or beside decode tokens, both paths
    _assert_same(_run(fused_rank, requests, max_batched_tokens=10), _run(eager_rank, requests, max_batched_tokens=10))
    layers = fused_rank.model.cfg.num_hidden_layers
    assert calls["pre"] == calls["post"] > 0 and calls["pre"] % layers == 0
    assert torch.equal(fused_rank.routed_tokens_LE, eager_rank.routed_tokens_LE)


def test_compiled_engine_equals_the_eager_engine(tiny8):
    """torch.compile'd segments: decode batches of changing size (dynamic token count, and the one-token
    graph) past the sliding window give the eager engine's tokens and logprobs."""
    requests = _requests(4, (3, 40, 17, 9, 26), new_tokens=24)
    eager = _run(_rank(tiny8), requests)
    compiled_rank = _rank(tiny8, compile_small_steps=True)
    assert compiled_rank.fused is not None and compiled_rank.fused.max_tokens >= 32
    with torch._dynamo.config.patch(error_on_recompile=True):  # the start's warm-up compiled every graph used
        _assert_same(_run(compiled_rank, requests), eager)
        (alone,) = _run(compiled_rank, requests[:1]).values()  # batch of one: the T = 1 graph
    assert alone.token_ids == eager["r0"].token_ids


def test_the_segments_alone_match_on_one_token(tiny8):
    """The compiled segments themselves against their eager form at T = 1 and T = 5."""
    rank = _rank(tiny8)
    fused = fused_layers_for(rank.model, rank.experts, FusedSegments(pre=torch.compile(pre_attention),
                                                                        post=torch.compile(post_attention)))
    assert fused is not None
    reference = fused_layers_for(rank.model, rank.experts, _eager_segments())
    gen = torch.Generator().manual_seed(5)
    for tokens in (1, 5):
        h_TD = torch.randn(tokens, rank.model.cfg.hidden_size, generator=gen)
        attn_THd = torch.randn(tokens, rank.model.cfg.num_attention_heads * rank.model.cfg.head_dim, generator=gen)
        got_h, got_ids = fused.rest_of_layer(1, h_TD, attn_THd)
        want_h, want_ids = reference.rest_of_layer(1, h_TD, attn_THd)
        assert torch.equal(got_ids, want_ids)
        torch.testing.assert_close(got_h, want_h, atol=1e-5, rtol=1e-5)


def test_no_fused_layers_where_they_do_not_apply(tiny8, monkeypatch):
    """Packed experts (big enough to stream at full rate), remote experts, and experts too big to gather
    even for one token (stacked, as on CUDA) keep every step eager."""
    rank = _rank(tiny8)
    stacked = rank.experts.shard
    packed = ExpertShard(
        expert_ids=stacked.expert_ids, tensor_names=stacked.tensor_names,
        layers=tuple(pack_experts(layer.w13_e2FD.unbind(0), layer.w2_eDF.unbind(0)) for layer in stacked.layers),
    )
    assert fused_layers_for(rank.model, LocalExperts(packed), _eager_segments()) is None

    class RemoteExperts:
        overlaps = True

        def begin_step(self, micro_batch_tokens: tuple[int, ...]) -> None: ...

        def start_moe(self, layer, micro_batch, x_TD, weights_TK, ids_TK, timings):
            raise AssertionError("not called")

    assert fused_layers_for(rank.model, RemoteExperts(), _eager_segments()) is None
    assert fused_layers_for(rank.model, rank.experts, _eager_segments()) is not None
    monkeypatch.setattr(fused_decode, "FUSED_EXPERT_BYTES_LIMIT", 1000)  # below one token's K experts
    assert fused_layers_for(rank.model, rank.experts, _eager_segments()) is None
    assert _rank(tiny8, compile_small_steps=False).fused is None
