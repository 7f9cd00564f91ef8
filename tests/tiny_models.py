"""Tiny random Mixtral checkpoints written with transformers' save_pretrained (the reference)."""

from __future__ import annotations

import json
from pathlib import Path

import torch

TINY_VARIANTS: dict[str, dict] = {
    # sliding window shorter than prompt + 32 decode steps; GQA ratio 2; top-2
    "window8_top2_gqa2": dict(
        hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, num_local_experts=8, num_experts_per_tok=2, sliding_window=8,
    ),
    # top-1 routing, GQA ratio 1 (plain multi-head attention), no window
    "top1_mha": dict(
        hidden_size=64, intermediate_size=80, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=4, num_local_experts=4, num_experts_per_tok=1, sliding_window=None,
    ),
    # top-3 routing, GQA ratio 4, explicit head_dim that differs from hidden/heads, window
    "top3_gqa4_headdim": dict(
        hidden_size=64, intermediate_size=64, num_hidden_layers=3, num_attention_heads=8,
        num_key_value_heads=2, head_dim=16, num_local_experts=6, num_experts_per_tok=3, sliding_window=24,
    ),
    # sharded safetensors with an index file; GQA ratio 4; 8 experts
    "sharded_top2_gqa4": dict(
        hidden_size=96, intermediate_size=128, num_hidden_layers=2, num_attention_heads=8,
        num_key_value_heads=2, num_local_experts=8, num_experts_per_tok=2, sliding_window=None,
        shard="40KB",
    ),
}


def write_tiny_mixtral(out_dir: Path, *, seed: int = 0, vocab_size: int = 256, shard: str | None = None,
                       initializer_range: float = 0.08, tie_word_embeddings: bool = False,
                       favour_experts: tuple[int, ...] = (), **overrides) -> Path:
    """favour_experts: every layer's router sends most rows to these (cluster/bench/router_skew.py)."""
    from transformers import MixtralConfig, MixtralForCausalLM

    cfg = MixtralConfig(
        vocab_size=vocab_size, max_position_embeddings=256, initializer_range=initializer_range,
        tie_word_embeddings=tie_word_embeddings, bos_token_id=1, eos_token_id=2, **overrides,
    )
    torch.manual_seed(seed)
    model = MixtralForCausalLM(cfg).eval()
    if favour_experts:
        from cluster.bench.router_skew import skew_routers

        calibration = torch.randint(3, vocab_size, (8, 32), generator=torch.Generator().manual_seed(seed))
        skew_routers(model, tuple(favour_experts), calibration)
    kwargs = {"max_shard_size": shard} if shard else {}
    model.save_pretrained(out_dir, **kwargs)
    return out_dir


def write_variant(root: Path, name: str) -> Path:
    spec = dict(TINY_VARIANTS[name])
    return write_tiny_mixtral(root / name, **spec)


CORPUS = [
    "def fibonacci(n):\n    if n < 2:\n        return n\n    return fibonacci(n - 1) + fibonacci(n - 2)\n",
    "The quick brown fox jumps over the lazy dog. Über café naïve — 東京 日本語 😀 emoji.\n",
    "import os\nimport sys\n\nclass Stack:\n    def push(self, item):\n        self.items.append(item)\n",
]


def write_byte_bpe_tokenizer(out_dir: Path, vocab_size: int) -> None:
    """A byte-level BPE with <unk>=0, <s>=1, </s>=2 that covers every byte, trained on a tiny corpus."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tokenizer = Tokenizer(models.BPE(unk_token="<unk>"))
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=["<unk>", "<s>", "</s>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tokenizer.train_from_iterator(CORPUS * 20, trainer)
    assert tokenizer.get_vocab_size() <= vocab_size
    tokenizer.save(str(out_dir / "tokenizer.json"))


def write_served_model(out_dir: Path) -> Path:
    """The e2e tests' model: 8 experts top-2, window, with a real tokenizer."""
    write_tiny_mixtral(out_dir, vocab_size=320, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                       num_attention_heads=4, num_key_value_heads=2, num_local_experts=8, num_experts_per_tok=2,
                       sliding_window=32)
    write_byte_bpe_tokenizer(out_dir, 320)
    (out_dir / "tokenizer_config.json").write_text(json.dumps({"chat_template": SERVED_CHAT_TEMPLATE}))
    return out_dir


SERVED_CHAT_TEMPLATE = (
    "{% for m in messages %}{% if m['role'] not in ('system', 'user', 'assistant') %}"
    "{{ raise_exception('unknown role ' + m['role']) }}{% endif %}[{{ m['role'] }}] {{ m['content'] }}\n"
    "{% endfor %}{% if add_generation_prompt %}[assistant] {% endif %}"
)
