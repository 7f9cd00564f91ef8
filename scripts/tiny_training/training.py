"""The training loop: AdamW, the warmup + cosine schedule, random batches and the time budget."""

from __future__ import annotations

import math
import time

import torch
import torch.nn.functional as F
from transformers import MixtralForCausalLM

from .config import TrainConfig


def make_optimizer(model: MixtralForCausalLM, cfg: TrainConfig) -> torch.optim.AdamW:
    """AdamW with weight decay on matrices (and expert stacks) only, not on norms."""
    decay = [p for p in model.parameters() if p.dim() >= 2]
    no_decay = [p for p in model.parameters() if p.dim() < 2]
    groups = [
        {"params": decay, "weight_decay": cfg.weight_decay},
        {"params": no_decay, "weight_decay": 0.0},
    ]
    return torch.optim.AdamW(groups, lr=cfg.lr, betas=(0.9, 0.95), eps=1e-8)


def lr_at(step: int, cfg: TrainConfig) -> float:
    """Linear warmup over warmup_steps, then cosine from lr down to min_lr_ratio * lr at cfg.steps."""
    if step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    progress = (step - cfg.warmup_steps) / max(1, cfg.steps - cfg.warmup_steps)
    cosine = 0.5 * (1.0 + math.cos(math.pi * min(progress, 1.0)))
    return cfg.lr * (cfg.min_lr_ratio + (1.0 - cfg.min_lr_ratio) * cosine)


def sample_batch(stream: torch.Tensor, cfg: TrainConfig, gen: torch.Generator) -> torch.Tensor:
    """Random windows of seq_len + 1 tokens from the training stream. Returns ids [B, T+1]."""
    starts = torch.randint(0, stream.numel() - cfg.seq_len - 1, (cfg.batch_size,), generator=gen)
    offsets = torch.arange(cfg.seq_len + 1)
    return stream[starts[:, None] + offsets[None, :]]  # [B, T+1]


def train_step(model: MixtralForCausalLM, opt: torch.optim.AdamW, batch_BT1: torch.Tensor, cfg: TrainConfig) -> float:
    """One AdamW step on next-token cross-entropy plus the router load-balancing loss; returns the CE."""
    out = model(input_ids=batch_BT1[:, :-1], use_cache=False, output_router_logits=True)
    logits_BTV = out.logits
    ce = F.cross_entropy(logits_BTV.reshape(-1, cfg.vocab_size).float(), batch_BT1[:, 1:].reshape(-1))
    loss = ce + cfg.router_aux_loss_coef * out.aux_loss
    opt.zero_grad(set_to_none=True)
    loss.backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
    opt.step()
    return ce.item()


def train(model: MixtralForCausalLM, stream: torch.Tensor, cfg: TrainConfig) -> dict[str, float]:
    """Run up to cfg.steps steps or cfg.max_minutes of wall time, whichever ends first."""
    gen = torch.Generator().manual_seed(cfg.seed)
    opt = make_optimizer(model, cfg)
    budget_s = cfg.max_minutes * 60.0
    model.train()
    start = time.perf_counter()
    window_start, window_tokens, window_loss, window_steps = start, 0, 0.0, 0
    step, elapsed, loss = 0, 0.0, float("nan")
    while step < cfg.steps and elapsed < budget_s:
        lr = lr_at(step, cfg)
        for group in opt.param_groups:
            group["lr"] = lr
        loss = train_step(model, opt, sample_batch(stream, cfg, gen), cfg)
        step += 1
        window_tokens += cfg.batch_size * cfg.seq_len
        window_loss, window_steps = window_loss + loss, window_steps + 1
        now = time.perf_counter()
        elapsed = now - start
        if step % cfg.log_every == 0 or step == cfg.steps or elapsed >= budget_s:
            print(
                f"step {step:5d}/{cfg.steps}  train_loss {window_loss / window_steps:.4f}  lr {lr:.2e}  "
                f"tok/s {window_tokens / (now - window_start):7.0f}  elapsed {elapsed / 60:5.1f} min",
                flush=True,
            )
            window_start, window_tokens, window_loss, window_steps = now, 0, 0.0, 0
    if step < cfg.steps:
        print(f"time budget of {cfg.max_minutes} min reached after {step} of {cfg.steps} steps", flush=True)
    return {
        "steps_done": step,
        "train_seconds": elapsed,
        "final_train_loss": loss,
        "train_tokens_seen": step * cfg.batch_size * cfg.seq_len,
    }
