"""The plain reference MoE loop (after mistral-inference): the oracle for every fast path.

Deliberately simple and slow: for each expert, find the (token, slot) pairs routed to it.
"""

import torch

from workers.model.experts import LayerExperts, swiglu_expert


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
