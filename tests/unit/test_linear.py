"""Prepared linears: the oneDNN-packed CPU weight computes what the plain matmul computes."""

from __future__ import annotations

import pytest
import torch

from workers.model.linear import PackedLinear, PlainLinear, can_pack, prepare_linear


@pytest.mark.parametrize("rows", [0, 1, 7, 64, 513])
def test_packed_linear_matches_matmul(rows):
    gen = torch.Generator().manual_seed(rows)
    w_OI = torch.randn(96, 40, generator=gen)
    x_NI = torch.randn(rows, 40, generator=gen)
    linear = PackedLinear(w_OI)
    y_NO = linear(x_NI)
    assert y_NO.shape == (rows, 96) and y_NO.dtype == torch.float32 and not y_NO.is_mkldnn
    torch.testing.assert_close(y_NO, x_NI @ w_OI.t(), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(linear.dense_weight(), w_OI, rtol=0, atol=0)


def test_packed_linear_takes_strided_rows():
    w_OI = torch.randn(16, 8)
    x_NI = torch.randn(5, 24)[:, 8:16]
    assert not x_NI.is_contiguous()
    torch.testing.assert_close(PackedLinear(w_OI)(x_NI), x_NI @ w_OI.t(), rtol=1e-5, atol=1e-5)


def test_packing_is_cpu_float_only_and_for_big_weights():
    assert can_pack("cpu", torch.float32) and can_pack("cpu", torch.bfloat16)
    assert not can_pack("cpu", torch.float64) and not can_pack("cuda", torch.float32)
    assert isinstance(prepare_linear(torch.randn(512, 512, dtype=torch.float64)), PlainLinear)
    assert isinstance(prepare_linear(torch.randn(4, 4)), PlainLinear), "too small to gain from packing"
    assert isinstance(prepare_linear(torch.randn(512, 512)), PackedLinear)
