"""Evaluation: held-out cross-entropy, the unigram baseline on the same tokens, and a greedy sample."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from tokenizers import Tokenizer
from transformers import MixtralForCausalLM

from .config import TrainConfig


@torch.inference_mode()
def held_out_loss(model: MixtralForCausalLM, stream: torch.Tensor, cfg: TrainConfig) -> tuple[float, torch.Tensor]:
    """Mean CE (nats/token) over non-overlapping seq_len + 1 windows of the held-out stream.

    The first token of each window is context only; the targets are its other seq_len tokens. Returns
    the loss and the target ids [N] (for the unigram baseline on exactly the same tokens).
    """
    model.eval()
    n_windows = stream.numel() // (cfg.seq_len + 1)
    windows = stream[: n_windows * (cfg.seq_len + 1)].view(n_windows, cfg.seq_len + 1)  # [W, T+1]
    total = 0.0
    for i in range(0, n_windows, cfg.eval_batch_size):
        batch_BT1 = windows[i : i + cfg.eval_batch_size]
        logits_BTV = model(input_ids=batch_BT1[:, :-1], use_cache=False).logits
        total += F.cross_entropy(
            logits_BTV.reshape(-1, cfg.vocab_size).float(), batch_BT1[:, 1:].reshape(-1), reduction="sum"
        ).item()
    targets_N = windows[:, 1:].reshape(-1)
    return total / targets_N.numel(), targets_N


def unigram_loss(train_stream: torch.Tensor, targets_N: torch.Tensor, vocab_size: int) -> float:
    """CE (nats/token) of add-one-smoothed unigram frequencies of the training tokens on targets_N."""
    counts_V = torch.bincount(train_stream, minlength=vocab_size).double() + 1.0
    log_probs_V = torch.log(counts_V / counts_V.sum())
    return -log_probs_V[targets_N].mean().item()


@torch.inference_mode()
def generate_sample(model: MixtralForCausalLM, tokenizer: Tokenizer, cfg: TrainConfig, bos: int) -> str:
    """Greedy continuation of cfg.sample_prompt (with <s> prepended, as the server does)."""
    model.eval()
    ids = torch.tensor([[bos, *tokenizer.encode(cfg.sample_prompt).ids]])  # [1, T]
    out = model.generate(
        input_ids=ids,
        attention_mask=torch.ones_like(ids),
        max_new_tokens=cfg.sample_tokens,
        do_sample=False,
        pad_token_id=bos,
    )
    return tokenizer.decode(out[0, 1:].tolist())
