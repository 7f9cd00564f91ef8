"""Every grouped expert path (padded bmm, expert by expert over stacked or packed weights) equals the plain
reference loop, including experts that get no tokens."""

from __future__ import annotations

import pytest
import torch

from workers.model.experts import LayerExperts, local_moe, pack_experts, packs_experts
from workers.model.linear import can_pack
from workers.model.reference_moe import reference_moe
from workers.model.router import route


def _experts(num_experts: int, d: int, f: int, gen: torch.Generator) -> LayerExperts:
    return LayerExperts(
        w13_e2FD=torch.randn(num_experts, 2 * f, d, generator=gen) * 0.2,
        w2_eDF=torch.randn(num_experts, d, f, generator=gen) * 0.2,
    )


@pytest.mark.parametrize(("num_tokens", "num_experts", "top_k"), [(1, 8, 2), (37, 8, 2), (64, 6, 3), (5, 4, 1)])
def test_grouped_path_equals_reference_loop(num_tokens, num_experts, top_k):
    gen = torch.Generator().manual_seed(num_tokens * 31 + top_k)
    d, f = 32, 48
    experts = _experts(num_experts, d, f, gen)
    x_TD = torch.randn(num_tokens, d, generator=gen)
    weights_TK, ids_TK = route(x_TD, torch.randn(num_experts, d, generator=gen), top_k)
    fast = local_moe(x_TD, weights_TK, ids_TK, experts)
    slow = reference_moe(x_TD, weights_TK, ids_TK, experts)
    torch.testing.assert_close(fast, slow, rtol=1e-5, atol=1e-5)


def test_experts_with_zero_tokens_are_skipped_correctly():
    gen = torch.Generator().manual_seed(0)
    experts = _experts(8, 16, 24, gen)
    x_TD = torch.randn(9, 16, generator=gen)
    ids_TK = torch.tensor([[0, 5]] * 4 + [[5, 7]] * 5)  # experts 1,2,3,4,6 get nothing
    weights_TK = torch.softmax(torch.randn(9, 2, generator=gen), dim=-1)
    assert torch.bincount(ids_TK.flatten(), minlength=8).eq(0).sum() == 5
    torch.testing.assert_close(
        local_moe(x_TD, weights_TK, ids_TK, experts),
        reference_moe(x_TD, weights_TK, ids_TK, experts),
        rtol=1e-5,
        atol=1e-5,
    )


def test_router_renormalises_top_k_of_full_softmax():
    x_TD = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    gate_ED = torch.tensor([[2.0, 0.5], [1.0, 0.0], [0.0, 3.0], [0.0, 0.0]])
    weights_TK, ids_TK = route(x_TD, gate_ED, 2)
    assert ids_TK.tolist() == [[0, 1], [2, 0]]
    e = torch.exp(torch.tensor([2.0, 1.0]))
    torch.testing.assert_close(weights_TK[0], e / e.sum())
    torch.testing.assert_close(weights_TK.sum(-1), torch.ones(2))


@pytest.mark.parametrize("pad_limit", [0.0, float("inf")])
def test_both_grouped_paths_equal_reference(monkeypatch, pad_limit):
    """The per-expert loop (pad limit 0) and the padded batched matmul (no limit) agree with the loop."""
    from workers.model import experts as experts_module

    monkeypatch.setattr(experts_module, "PAD_WASTE_LIMIT", pad_limit)
    gen = torch.Generator().manual_seed(3)
    layer = _experts(8, 32, 40, gen)
    x_TD = torch.randn(23, 32, generator=gen)
    ids_TK = torch.randint(0, 5, (23, 2), generator=gen)  # experts 5-7 get nothing
    ids_TK[:, 1] = (ids_TK[:, 0] + 1) % 5
    weights_TK = torch.softmax(torch.randn(23, 2, generator=gen), dim=-1)
    torch.testing.assert_close(
        local_moe(x_TD, weights_TK, ids_TK, layer), reference_moe(x_TD, weights_TK, ids_TK, layer), rtol=1e-5, atol=1e-5
    )


@pytest.mark.skipif(not can_pack("cpu", torch.float32), reason="oneDNN is not available")
@pytest.mark.parametrize("num_tokens", [1, 9, 300])
def test_packed_experts_equal_reference(num_tokens):
    """The oneDNN-packed expert-by-expert path (CPU) matches the reference loop over the stacked weights."""
    gen = torch.Generator().manual_seed(num_tokens)
    layer = _experts(8, 32, 40, gen)
    packed = pack_experts(layer.w13_e2FD.unbind(0), layer.w2_eDF.unbind(0))
    for expert in range(8):
        w13, w2 = packed.linears(expert)
        torch.testing.assert_close(w13.dense_weight(), layer.w13_e2FD[expert], rtol=0, atol=0)
        torch.testing.assert_close(w2.dense_weight(), layer.w2_eDF[expert], rtol=0, atol=0)
    x_TD = torch.randn(num_tokens, 32, generator=gen)
    ids_TK = torch.randint(0, 6, (num_tokens, 2), generator=gen)  # experts 6 and 7 get nothing
    ids_TK[:, 1] = (ids_TK[:, 0] + 1) % 6
    weights_TK = torch.softmax(torch.randn(num_tokens, 2, generator=gen), dim=-1)
    torch.testing.assert_close(
        local_moe(x_TD, weights_TK, ids_TK, packed), reference_moe(x_TD, weights_TK, ids_TK, layer), rtol=1e-5,
        atol=1e-5,
    )


def test_only_big_cpu_float_experts_are_packed():
    w2_elements = 16 * 24
    assert not packs_experts("cpu", torch.float32, w2_elements), "experts this small run faster as one padded bmm"
    assert not packs_experts("cpu", torch.float64, 1 << 20) and not packs_experts("cuda", torch.float32, 1 << 20)
    assert packs_experts("cpu", torch.float32, 1 << 20) == can_pack("cpu", torch.float32)
