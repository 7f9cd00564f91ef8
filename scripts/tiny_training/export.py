"""Writing the output directory: the Hugging Face model and tokenizer, then the model card."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from tokenizers import Tokenizer
from transformers import MixtralForCausalLM

from .config import TrainConfig
from .data import Data
from .model_card import model_card


def save(model: MixtralForCausalLM, tokenizer: Tokenizer, out_dir: Path) -> None:
    out_dir.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out_dir)
    tokenizer.save(str(out_dir / "tokenizer.json"))


def dir_size_bytes(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def write_model_card(cfg: TrainConfig, data: Data, metrics: dict[str, Any]) -> dict[str, Any]:
    """Writes README.md (twice, so the size it states includes itself); returns metrics with size_bytes."""
    metrics = {**metrics, "size_bytes": dir_size_bytes(cfg.out_dir)}
    for _ in range(2):
        (cfg.out_dir / "README.md").write_text(model_card(cfg, data.corpus, metrics), encoding="utf-8")
        metrics["size_bytes"] = dir_size_bytes(cfg.out_dir)
    return metrics
