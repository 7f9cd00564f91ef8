"""One whole run: data, model, training, evaluation, export and the acceptance check, in that order."""

from __future__ import annotations

import json
import os
import platform
import random
import time
from dataclasses import asdict

import torch
import transformers

from .config import TrainConfig
from .data import prepare_data
from .evaluation import generate_sample, held_out_loss, unigram_loss
from .export import save, write_model_card
from .model import build_model, count_params
from .training import train


def run(cfg: TrainConfig, *, command: str, started: float) -> None:
    """Trains, evaluates and saves the model into cfg.out_dir; raises SystemExit if the acceptance check fails.

    ``command`` is the command line quoted in the model card; ``started`` is the script's
    ``time.perf_counter()`` at start, for the total wall time.
    """
    torch.set_num_threads(cfg.threads)
    random.seed(cfg.seed)
    torch.manual_seed(cfg.seed)
    data = prepare_data(cfg)
    model = build_model(cfg, data.bos, data.eos)
    params = count_params(model, cfg)
    print(f"model: {params['total']:,} params, {params['active_per_token']:,} active per token", flush=True)
    stats = train(model, data.train_stream, cfg)
    load_1m = os.getloadavg()[0]
    loss, targets_N = held_out_loss(model, data.held_stream, cfg)
    unigram = unigram_loss(data.train_stream, targets_N, cfg.vocab_size)
    print(f"held-out loss {loss:.4f} nats/token  unigram loss {unigram:.4f}  ratio {loss / unigram:.3f}", flush=True)
    sample = generate_sample(model, data.tokenizer, cfg, data.bos)
    print(f"sample:\n{sample}", flush=True)
    save(model, data.tokenizer, cfg.out_dir)
    metrics = {
        **stats,
        "held_out_loss": loss,
        "held_targets": targets_N.numel(),
        "transformers_version": transformers.__version__,
        "unigram_loss": unigram,
        "sample": sample,
        "params_total": params["total"],
        "params_active": params["active_per_token"],
        "bos_token_id": data.bos,
        "eos_token_id": data.eos,
        "train_tokens": data.train_stream.numel(),
        "held_tokens": data.held_stream.numel(),
        "epochs": stats["train_tokens_seen"] / data.train_stream.numel(),
        "python_version": platform.python_version(),
        "machine": f"{cfg.threads} torch threads on a {os.cpu_count()}-core {platform.machine()} CPU shared with "
        f"other work (1-minute load average {load_1m:.1f} at the end of training)",
        "command": command,
        "total_seconds": time.perf_counter() - started,
    }
    metrics = write_model_card(cfg, data, metrics)
    print(json.dumps({k: v for k, v in metrics.items() if k != "sample"} | {"config": asdict(cfg)}, default=str))
    if loss > unigram / 2:
        raise SystemExit(f"acceptance failed: held-out loss {loss:.4f} > unigram loss / 2 ({unigram / 2:.4f})")
