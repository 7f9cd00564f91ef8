"""Routers that favour some experts, in a random Mixtral that stays an ordinary Hugging Face checkpoint
(`mixserve bench make-model --favour-experts`): the skewed expert load that expert replicas and the balancer are
for, which a random router (near-uniform) never shows. Three edits of the random weights:

1. The token embeddings are scaled up to EMBEDDING_DOMINANCE times what the layers add to the residual stream by
   the last layer, so every router reads mostly the token and the favoured share hardly changes with the prompt's
   length, the position or the depth (with the small random embeddings the layers' outputs dominate, and they
   shrink as attention averages over longer contexts).
2. Hidden dimension CHANNEL of every token embedding is a constant, and no layer reads or writes it (its columns in
   the attention, expert and final-norm inputs and its rows in the attention and expert outputs are zero), so the
   residual stream carries it unchanged and after every post-attention RMSNorm it is a positive x_c for every token.
3. The router logits are gate_ED @ x_D, so a weight `a` in that column of a favoured expert's gate row (the column
   is zero elsewhere) adds a * x_c to that expert's logit for every token. `a` is calibrated layer by layer in one
   forward pass over seeded random prompts, each layer's gate just before it runs (later layers see the skewed
   routing of earlier ones), for the favoured experts to take FAVOURED_PULL of the way from their uniform share of
   the top-k rows to all the rows they can take: 0.625 of the rows for 2 of 8 experts at top-2 (uniform 0.25).

Knows nothing of files, presets or how the prompts are drawn: it edits a transformers MixtralForCausalLM in place.

Shapes: B prompts, S tokens per prompt, T = B*S tokens, D hidden size, E experts, K top-k.
"""

from __future__ import annotations

import torch

CHANNEL = 0  # the hidden dimension that carries the constant
FAVOURED_PULL = 0.5  # the favoured experts' share: this far from uniform towards all they can take
EMBEDDING_DOMINANCE = 2.0  # token embeddings' rms over the rms of what the layers add to the residual stream


def check_favoured(favour: tuple[int, ...], num_experts: int) -> None:
    """favour: distinct experts in [0, num_experts), fewer than all (favouring every expert favours none)."""
    if len(set(favour)) != len(favour):
        raise ValueError(f"favour_experts names an expert twice: {favour}")
    if any(not 0 <= e < num_experts for e in favour):
        raise ValueError(f"favour_experts {favour} must be experts of 0..{num_experts - 1}")
    if len(favour) >= num_experts:
        raise ValueError(f"favour_experts {favour} names every one of the {num_experts} experts: favour fewer")


def target_share(favoured: int, num_experts: int, top_k: int) -> float:
    """The favoured experts' share of the top-k rows to calibrate for: between their uniform share and the most
    they can take (each token picks an expert at most once, so `favoured` experts take at most favoured/K)."""
    uniform = favoured / num_experts
    most = min(1.0, favoured / top_k)
    return uniform + FAVOURED_PULL * (most - uniform)


def favoured_share(logits_TE: torch.Tensor, favoured_E: torch.Tensor, top_k: int) -> float:
    """The share of the top-k rows (token, pick) that go to experts with favoured_E == 1."""
    topk_TK = logits_TE.topk(top_k, dim=-1).indices
    return favoured_E[topk_TK].mean().item()


def _boost(x_TD: torch.Tensor, gate_ED: torch.Tensor, favoured_E: torch.Tensor, top_k: int, target: float) -> float:
    """The gate weight `a` in column CHANNEL of the favoured rows (zero in gate_ED here) that gives the favoured
    experts `target` of these tokens' top-k rows, by bisection: their share only grows with `a` (x_c > 0)."""
    x_TD = x_TD.float()
    logits_TE = x_TD @ gate_ED.float().T  # [T, E]
    lift_TE = x_TD[:, CHANNEL, None] * favoured_E  # [T, E]: what a = 1 adds
    assert (x_TD[:, CHANNEL] > 0).all(), "the constant channel must stay positive after the norm"

    def share(a: float) -> float:
        return favoured_share(logits_TE + a * lift_TE, favoured_E, top_k)

    lo, hi = 0.0, 1.0
    for _ in range(64):
        if share(hi) >= target:
            break
        lo, hi = hi, hi * 2
    else:
        raise RuntimeError(f"no gate weight gives the favoured experts {target:.2f} of the rows")
    for _ in range(40):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if share(mid) < target else (lo, mid)
    return hi


@torch.no_grad()
def _constant_channel(model, value: float) -> None:
    """Hidden dimension CHANNEL: `value` in every token embedding, read only by the routers (through the
    post-attention norms), written by no layer."""
    inner = model.model
    inner.embed_tokens.weight[:, CHANNEL] = value
    inner.norm.weight[CHANNEL] = 0.0  # the LM head does not read it
    for layer in inner.layers:
        layer.input_layernorm.weight[CHANNEL] = 0.0  # attention does not read it ...
        layer.self_attn.o_proj.weight[CHANNEL, :] = 0.0  # ... nor write it
        layer.post_attention_layernorm.weight[CHANNEL] = 1.0  # the router reads it
        layer.mlp.experts.gate_up_proj[:, :, CHANNEL] = 0.0  # the experts do not read it ...
        layer.mlp.experts.down_proj[:, CHANNEL, :] = 0.0  # ... nor write it
        layer.mlp.gate.weight[:, CHANNEL] = 0.0  # set per layer by the calibration


@torch.no_grad()
def _layers_added_rms(model, prompts_BS: torch.Tensor) -> float:
    """The rms of what the layers add to the residual stream by the last layer: the final norm's input minus the
    token embeddings."""
    captured: list[torch.Tensor] = []
    hook = model.model.norm.register_forward_pre_hook(lambda _, args: captured.append(args[0]))
    try:
        model.model(input_ids=prompts_BS, use_cache=False)
    finally:
        hook.remove()
    added_BSD = captured[0] - model.model.embed_tokens(prompts_BS)
    return added_BSD.pow(2).mean().sqrt().item()


@torch.no_grad()
def skew_routers(model, favour: tuple[int, ...], prompts_BS: torch.Tensor) -> list[float]:
    """Makes every layer's router of a random transformers MixtralForCausalLM (fp32, eval) send most rows to the
    experts `favour`, calibrated on the token ids prompts_BS; returns each layer's favoured share on them."""
    cfg = model.config
    check_favoured(favour, cfg.num_local_experts)
    favoured_E = torch.zeros(cfg.num_local_experts)
    favoured_E[list(favour)] = 1.0
    target = target_share(len(favour), cfg.num_local_experts, cfg.num_experts_per_tok)
    embed_VD = model.model.embed_tokens.weight
    embed_rms = embed_VD[prompts_BS].pow(2).mean().sqrt().item()
    embed_VD.mul_(max(1.0, EMBEDDING_DOMINANCE * _layers_added_rms(model, prompts_BS) / embed_rms))
    # the channel's norm equals an embedding row's: it dilutes the other dimensions by about sqrt(2)
    _constant_channel(model, embed_VD.pow(2).mean().sqrt().item() * cfg.hidden_size ** 0.5)
    shares: list[float] = []

    def calibrate(gate: torch.nn.Module, args: tuple) -> None:
        x_TD = args[0].reshape(-1, cfg.hidden_size)
        gate.weight[list(favour), CHANNEL] = _boost(x_TD, gate.weight, favoured_E, cfg.num_experts_per_tok, target)
        shares.append(favoured_share(x_TD.float() @ gate.weight.float().T, favoured_E, cfg.num_experts_per_tok))

    hooks = [layer.mlp.gate.register_forward_pre_hook(calibrate) for layer in model.model.layers]
    try:
        model.model(input_ids=prompts_BS, use_cache=False)
    finally:
        for hook in hooks:
            hook.remove()
    return shares
