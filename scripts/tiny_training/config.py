"""TrainConfig: every setting that determines a training run, validated on construction."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True, kw_only=True)
class TrainConfig:
    """Everything that determines a run; the CLI sets the first five fields."""

    out_dir: Path
    steps: int = 2200
    seed: int = 0
    threads: int = 2
    max_minutes: float = 25.0
    # tokenizer
    vocab_size: int = 512
    special_tokens: tuple[str, ...] = ("<unk>", "<s>", "</s>")
    bos_token: str = "<s>"
    eos_token: str = "</s>"
    # model
    hidden_size: int = 192
    intermediate_size: int = 256
    num_layers: int = 4
    num_heads: int = 4
    num_kv_heads: int = 2
    num_experts: int = 8
    top_k: int = 2
    sliding_window: int = 128
    max_position_embeddings: int = 4096
    rope_theta: float = 10000.0
    router_aux_loss_coef: float = 0.01
    # optimisation
    seq_len: int = 256
    batch_size: int = 8
    lr: float = 3e-3
    min_lr_ratio: float = 0.05
    warmup_steps: int = 100
    weight_decay: float = 0.1
    grad_clip: float = 1.0
    log_every: int = 25
    eval_batch_size: int = 32
    # data
    held_out: tuple[str, ...] = ("email", "http", "json")
    excluded_dirs: tuple[str, ...] = (
        "site-packages",
        "lib-dynload",
        "__pycache__",
        "test",
        "tests",
        "idle_test",
        "pydoc_data",
        "encodings",
    )
    sample_prompt: str = "def fibonacci(n):"
    sample_tokens: int = 40

    def __post_init__(self) -> None:
        if self.num_heads % self.num_kv_heads or self.num_kv_heads >= self.num_heads:
            raise ValueError(
                f"num_kv_heads ({self.num_kv_heads}) must divide and be smaller than "
                f"num_heads ({self.num_heads}) for grouped-query attention"
            )
        if self.hidden_size % self.num_heads:
            raise ValueError(f"hidden_size ({self.hidden_size}) is not divisible by num_heads ({self.num_heads})")
        if not 0 < self.top_k <= self.num_experts:
            raise ValueError(f"top_k ({self.top_k}) must be in 1..num_experts ({self.num_experts})")
        if self.sliding_window >= self.max_position_embeddings:
            raise ValueError(
                f"sliding_window ({self.sliding_window}) must be shorter than "
                f"max_position_embeddings ({self.max_position_embeddings})"
            )
        if self.steps <= 0 or self.max_minutes <= 0 or self.threads <= 0:
            raise ValueError(
                f"steps ({self.steps}), max_minutes ({self.max_minutes}) and threads ({self.threads}) must be > 0"
            )
        for token in (self.bos_token, self.eos_token):
            if token not in self.special_tokens:
                raise ValueError(f"special token {token!r} is not in special_tokens {self.special_tokens}")
