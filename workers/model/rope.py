"""Rotary position embeddings (the "default" RoPE of Mixtral / Llama, rotate-half layout).

Shapes: T tokens, H heads, Dh head dim.
"""

import torch


def rope_cos_sin(
    positions_T: torch.Tensor, *, head_dim: int, theta: float, dtype: torch.dtype
) -> tuple[torch.Tensor, torch.Tensor]:
    """cos and sin tables for the given absolute positions, each [T, Dh]."""
    exponents = torch.arange(0, head_dim, 2, dtype=torch.int64, device=positions_T.device).float() / head_dim
    inv_freq_half = 1.0 / (theta**exponents)  # [Dh/2]
    freqs_T_half = positions_T.float()[:, None] * inv_freq_half[None, :]  # [T, Dh/2]
    emb_TDh = torch.cat((freqs_T_half, freqs_T_half), dim=-1)  # [T, Dh]
    return emb_TDh.cos().to(dtype), emb_TDh.sin().to(dtype)


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


def apply_rope(x_THDh: torch.Tensor, cos_TDh: torch.Tensor, sin_TDh: torch.Tensor) -> torch.Tensor:
    cos_T1Dh, sin_T1Dh = cos_TDh[:, None, :], sin_TDh[:, None, :]
    return x_THDh * cos_T1Dh + _rotate_half(x_THDh) * sin_T1Dh
