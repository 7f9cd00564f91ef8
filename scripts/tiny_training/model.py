"""Building the ``MixtralForCausalLM`` from a TrainConfig and counting its parameters."""

from __future__ import annotations

from transformers import MixtralConfig, MixtralForCausalLM

from .config import TrainConfig


def build_model(cfg: TrainConfig, bos: int, eos: int) -> MixtralForCausalLM:
    config = MixtralConfig(
        vocab_size=cfg.vocab_size,
        hidden_size=cfg.hidden_size,
        intermediate_size=cfg.intermediate_size,
        num_hidden_layers=cfg.num_layers,
        num_attention_heads=cfg.num_heads,
        num_key_value_heads=cfg.num_kv_heads,
        head_dim=cfg.hidden_size // cfg.num_heads,
        num_local_experts=cfg.num_experts,
        num_experts_per_tok=cfg.top_k,
        sliding_window=cfg.sliding_window,
        max_position_embeddings=cfg.max_position_embeddings,
        rope_parameters={"rope_type": "default", "rope_theta": cfg.rope_theta},
        router_aux_loss_coef=cfg.router_aux_loss_coef,
        tie_word_embeddings=False,
        bos_token_id=bos,
        eos_token_id=eos,
        pad_token_id=None,
    )
    return MixtralForCausalLM(config)


def count_params(model: MixtralForCausalLM, cfg: TrainConfig) -> dict[str, int]:
    """Total parameters and those active per token (top_k of num_experts experts)."""
    total = sum(p.numel() for p in model.parameters())
    experts = sum(p.numel() for n, p in model.named_parameters() if ".experts." in n)
    return {"total": total, "active_per_token": total - experts + experts * cfg.top_k // cfg.num_experts}
