"""RMSNorm exactly as Mixtral computes it: statistics in fp32, weight applied in the input dtype."""

import torch


def rms_norm(x_TD: torch.Tensor, weight_D: torch.Tensor, eps: float) -> torch.Tensor:
    x32_TD = x_TD.float()
    variance_T1 = x32_TD.pow(2).mean(-1, keepdim=True)
    normed_TD = (x32_TD * torch.rsqrt(variance_T1 + eps)).to(x_TD.dtype)
    return weight_D * normed_TD
