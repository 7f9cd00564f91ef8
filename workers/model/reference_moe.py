"""Test oracle: the plain reference MoE loop (after mistral-inference), against which every fast MoE path
(`workers.model.experts`, `workers.model.fused_decode`) is checked. No serving code calls it.

Deliberately simple and slow: for each expert, find the (token, slot) pairs routed to it.
Shapes: T tokens, D model dim, F expert ffn dim, K experts per token.
"""

import torch
import torch.nn.functional as F

from workers.model.experts import LayerExperts


def swiglu_expert(x_ND: torch.Tensor, w13_2FD: torch.Tensor, w2_DF: torch.Tensor) -> torch.Tensor:
    """w2(silu(w1 x) * w3 x) for the rows of one expert."""
    gate_NF, up_NF = (x_ND @ w13_2FD.t()).chunk(2, dim=-1)  # [N, F] each
    return (F.silu(gate_NF) * up_NF) @ w2_DF.t()  # [N, D]


def reference_moe(
    x_TD: torch.Tensor, topk_weights_TK: torch.Tensor, topk_ids_TK: torch.Tensor, experts: LayerExperts
) -> torch.Tensor:
    out_TD = torch.zeros_like(x_TD, dtype=torch.float32)
    for expert in range(experts.num_experts):
        batch_idx, nth_expert = torch.where(topk_ids_TK == expert)
        if batch_idx.numel() == 0:
            continue
        y = swiglu_expert(x_TD[batch_idx], experts.w13_e2FD[expert], experts.w2_eDF[expert])
        out_TD.index_add_(0, batch_idx, (topk_weights_TK[batch_idx, nth_expert, None] * y).float())
    return out_TD.to(x_TD.dtype)
