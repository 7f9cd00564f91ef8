"""Random Mixtral checkpoints for benchmarks, written once with transformers' `save_pretrained` and reused.

A directory counts as present when its config.json carries the preset's shape; it is written into a
temporary sibling first and renamed, so an interrupted write is never mistaken for a checkpoint.
Memory stays near one copy of the model: weights are created once, in fp32, and saved in 1 GB shards.
"""

from __future__ import annotations

import json
import shutil
import time
from pathlib import Path

import torch

PRESETS: dict[str, dict] = {
    # stands in for models/mixserve-tiny until it exists (W1)
    "w1-random": dict(vocab_size=4096, hidden_size=256, intermediate_size=512, num_hidden_layers=4,
                      num_attention_heads=8, num_key_value_heads=4, num_local_experts=8, num_experts_per_tok=2,
                      sliding_window=None, max_position_embeddings=4096),
    # the "medium" Mixtral of W2: ~0.73 B parameters, ~2.8 GB in fp32
    "w2-medium": dict(vocab_size=32000, hidden_size=1024, intermediate_size=3584, num_hidden_layers=8,
                      num_attention_heads=16, num_key_value_heads=4, num_local_experts=8, num_experts_per_tok=2,
                      sliding_window=None, max_position_embeddings=4096),
}
SHAPE_KEYS = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
              "num_key_value_heads", "num_local_experts", "num_experts_per_tok")


def matches(out_dir: Path, spec: dict) -> bool:
    try:
        raw = json.loads((out_dir / "config.json").read_text())
    except (OSError, json.JSONDecodeError):
        return False
    weights = (out_dir / "model.safetensors").exists() or (out_dir / "model.safetensors.index.json").exists()
    return weights and all(raw.get(k) == spec[k] for k in SHAPE_KEYS)


def write_random_mixtral(out_dir: Path, spec: dict, *, seed: int = 0, initializer_range: float = 0.02) -> Path:
    """Writes a random MixtralForCausalLM to out_dir unless a checkpoint of this shape is already there."""
    from transformers import MixtralConfig, MixtralForCausalLM

    if matches(out_dir, spec):
        return out_dir
    cfg = MixtralConfig(initializer_range=initializer_range, tie_word_embeddings=False, bos_token_id=1,
                        eos_token_id=2, **spec)
    torch.manual_seed(seed)
    model = MixtralForCausalLM(cfg).eval()
    tmp = out_dir.with_name(out_dir.name + f".tmp-{int(time.time())}")
    model.save_pretrained(tmp, max_shard_size="1GB")
    del model
    if out_dir.exists():
        shutil.rmtree(out_dir)
    tmp.rename(out_dir)
    return out_dir


def write_preset(name: str, out_dir: Path, *, seed: int = 0) -> Path:
    if name not in PRESETS:
        raise ValueError(f"preset must be one of {sorted(PRESETS)}, got {name!r}")
    return write_random_mixtral(out_dir, PRESETS[name], seed=seed)
