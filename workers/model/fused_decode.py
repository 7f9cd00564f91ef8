"""torch.compile'd layer segments for small steps (decode), around the eager paged attention: the MoE path
for small steps with every (small) expert in-process, opt-in with --compile (W1 offline 1.02x -> 1.41x
transformers in-process; docs/PERFORMANCE.md).

An eager decode layer runs ~60 small ops, most of them elementwise (RMSNorm, RoPE, routing, SwiGLU,
the weighted sum); on a small model their dispatch, not their arithmetic, is the step's cost. Each
layer here is two compiled segments with the paged attention (which reads and writes the KV cache in
place) between them:

    pre:  h → rms_norm → fused qkv → RoPE                                → q, k, v
    post: h, attn → h + o_proj(attn) → rms_norm → route → experts → residual → h', topk ids

In `post` each routed row reads its own expert's weights (gathered by expert id, fused by the compiler
into the matmul-vector products), so no sort, no bincount and no host sync break the graph. A step of
R = T·K rows reads R experts' weights instead of each expert's once: that is cheap only while the
experts are small or R is small, so `worth_fusing` bounds it and larger steps stay eager.
One graph serves every layer (weights are arguments) and every row count (the token dimension is
dynamic after the first two sizes; T = 1 gets its own graph).
Shapes: T tokens, D model dim, H / Hkv heads, Dh head dim, E experts, K experts per token, F ffn dim.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from workers.model.attention import split_qkv_with_rope
from workers.model.experts import LayerExperts, weight_and_sum
from workers.model.norm import rms_norm
from workers.model.router import route

# A fused step's expert weights read per layer (bytes): R rows x one expert each. Past this the grouped
# eager path (each expert's weights read once) wins. 64 MiB covers W1's tiny model at 32 decode rows.
FUSED_EXPERT_BYTES_LIMIT = 64 * 2**20


class CompileFailed(RuntimeError):
    """torch.compile could not build the segments (on CPU it needs a C++ compiler, e.g. g++)."""


@dataclass(frozen=True, kw_only=True)
class LayerShape:
    num_heads: int
    num_kv_heads: int
    head_dim: int
    top_k: int
    eps: float


def pre_attention(
    h_TD: torch.Tensor,
    input_norm_D: torch.Tensor,
    qkv_QD: torch.Tensor,
    cos_TDh: torch.Tensor,
    sin_TDh: torch.Tensor,
    shape: LayerShape,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(q [T, H, Dh], k [T, Hkv, Dh], v [T, Hkv, Dh]) of norm(h), RoPE applied."""
    x_TD = rms_norm(h_TD, input_norm_D, shape.eps)
    return split_qkv_with_rope(
        x_TD @ qkv_QD.t(), num_heads=shape.num_heads, num_kv_heads=shape.num_kv_heads, head_dim=shape.head_dim,
        cos_TDh=cos_TDh, sin_TDh=sin_TDh,
    )


def post_attention(
    h_TD: torch.Tensor,
    attn_THd: torch.Tensor,
    o_DHd: torch.Tensor,
    post_norm_D: torch.Tensor,
    gate_ED: torch.Tensor,
    w13_E2FD: torch.Tensor,
    w2_EDF: torch.Tensor,
    shape: LayerShape,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(h + attention out + MoE out [T, D], topk ids [T, K]); the MoE math of `local_moe`, row by row."""
    h_TD = h_TD + attn_THd @ o_DHd.t()
    x_TD = rms_norm(h_TD, post_norm_D, shape.eps)
    weights_TK, ids_TK = route(x_TD, gate_ED, shape.top_k)
    # multiply + sum over gathered weights: the compiler fuses the gather into the reduction
    gate_up_TK2F = (w13_E2FD[ids_TK] * x_TD[:, None, None, :]).sum(-1)
    gate_TKF, up_TKF = gate_up_TK2F.chunk(2, dim=-1)
    act_TKF = F.silu(gate_TKF) * up_TKF
    y_TKD = (w2_EDF[ids_TK] * act_TKF[:, :, None, :]).sum(-1)
    return h_TD + weight_and_sum(y_TKD.flatten(0, 1), weights_TK), ids_TK


def worth_fusing(experts: LayerExperts, num_rows: int) -> bool:
    """A fused step reads num_rows experts' weights; keep that under FUSED_EXPERT_BYTES_LIMIT."""
    per_expert = (experts.w13_e2FD[0].numel() + experts.w2_eDF[0].numel()) * experts.w13_e2FD.element_size()
    return num_rows * per_expert <= FUSED_EXPERT_BYTES_LIMIT


@dataclass(frozen=True)
class FusedSegments:
    """The two compiled segments; `warm_up` compiles them before the first request needs them."""

    pre: Callable[..., tuple[torch.Tensor, torch.Tensor, torch.Tensor]]
    post: Callable[..., tuple[torch.Tensor, torch.Tensor]]


def compile_segments() -> FusedSegments:
    return FusedSegments(pre=torch.compile(pre_attention), post=torch.compile(post_attention))

