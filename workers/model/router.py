"""Top-k routing exactly as Mixtral defines it.

softmax over all experts in fp32, keep the top k, renormalise the kept weights to sum to one.
Shapes: T tokens, D model dim, E experts, K experts per token.
"""

import torch


def route(x_TD: torch.Tensor, gate_ED: torch.Tensor, top_k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Returns (topk_weights_TK in fp32, topk_ids_TK int64)."""
    logits_TE = x_TD @ gate_ED.t()  # [T, E]
    probs_TE = torch.softmax(logits_TE.float(), dim=-1)
    weights_TK, ids_TK = torch.topk(probs_TE, top_k, dim=-1)  # [T, K]
    weights_TK = weights_TK / weights_TK.sum(dim=-1, keepdim=True)
    return weights_TK, ids_TK
