"""y = x Wᵀ with the weight prepared once, at load time, for the fastest kernel of its device.

On CPU (float32 or bfloat16, oneDNN built in) the weight is reordered once into oneDNN's blocked layout
and applied with oneDNN's matmul. BLAS sgemm repacks the weight on every call; at the few rows per
expert of a decode step that halves the rate at which the weights stream from memory (measured on
this project's 2-core CPU: 8 rows through one W2 layer's experts, 14 ms packed vs 28-52 ms sgemm),
and large prefill matmuls gain ~1.2-2x. Anywhere else it is a plain matmul.
Shapes: N rows, I input features, O output features.
"""

from __future__ import annotations

from typing import Protocol

import torch

_PACKABLE_DTYPES = (torch.float32, torch.bfloat16)
# Below ~2^18 weights oneDNN's per-call cost outweighs what it saves (measured at 1 and 32 rows on this
# project's CPU: even at 2^18, 1.3x faster at 32 rows; at 2^15, 3x slower at 1 row).
PACK_MIN_ELEMENTS = 1 << 18


class Linear(Protocol):
    dtype: torch.dtype

    def __call__(self, x_NI: torch.Tensor) -> torch.Tensor: ...

    def dense_weight(self) -> torch.Tensor:
        """The weight [O, I] as a plain tensor (for reference math and checks, not the hot path)."""
        ...


def can_pack(device: torch.device | str, dtype: torch.dtype) -> bool:
    """oneDNN can hold weights of this device and dtype."""
    return (
        torch.device(device).type == "cpu"
        and dtype in _PACKABLE_DTYPES
        and torch.backends.mkldnn.is_available()
        and torch.backends.mkldnn.enabled
    )


def worth_packing(num_elements: int) -> bool:
    return num_elements >= PACK_MIN_ELEMENTS


class PackedLinear:
    """A CPU weight in oneDNN's layout; holds no plain copy."""

    def __init__(self, w_OI: torch.Tensor) -> None:
        assert w_OI.dim() == 2, f"a linear weight is 2-D, got shape {tuple(w_OI.shape)}"
        self.dtype = w_OI.dtype
        self._packed = torch.ops.mkldnn._reorder_linear_weight(w_OI.contiguous(), None)

    def __call__(self, x_NI: torch.Tensor) -> torch.Tensor:
        return torch.ops.mkldnn._linear_pointwise(x_NI, self._packed, None, "none", [None], "")  # [N, O]

    def dense_weight(self) -> torch.Tensor:
        return self._packed.to_dense()


class PlainLinear:
    def __init__(self, w_OI: torch.Tensor) -> None:
        assert w_OI.dim() == 2, f"a linear weight is 2-D, got shape {tuple(w_OI.shape)}"
        self.dtype = w_OI.dtype
        self.w_OI = w_OI

    def __call__(self, x_NI: torch.Tensor) -> torch.Tensor:
        return x_NI @ self.w_OI.t()  # [N, O]

    def dense_weight(self) -> torch.Tensor:
        return self.w_OI


def prepare_linear(w_OI: torch.Tensor) -> Linear:
    """The packed form where the device supports it and the weight is big enough to gain, the plain weight
    otherwise."""
    if can_pack(w_OI.device, w_OI.dtype) and worth_packing(w_OI.numel()):
        return PackedLinear(w_OI)
    return PlainLinear(w_OI)
