"""Train mixserve-tiny, the embedded default model: a small Mixtral trained on Python stdlib source.

The script trains a byte-level BPE tokenizer and an 8-expert, top-2 ``MixtralForCausalLM`` (GQA,
sliding-window attention) with a plain AdamW loop on CPU, then saves a Hugging Face directory
(``config.json``, ``generation_config.json``, ``model.safetensors``, ``tokenizer.json``,
``README.md``) that loads unchanged with ``MixtralForCausalLM.from_pretrained`` and
``tokenizers.Tokenizer.from_file``.

Corpus: the ``.py`` files under ``sysconfig.get_paths()["stdlib"]`` in sorted order, minus test
suites, ``site-packages``, generated tables and docs (see ``TrainConfig.excluded_dirs``); the
packages in ``TrainConfig.held_out`` are never trained on (not even by the tokenizer) and give the
held-out loss, reported next to an add-one-smoothed unigram baseline fitted on the training tokens.

The script knows nothing about serving: it never imports mixserve. The tokenizer has no
post-processor; callers prepend ``<s>`` themselves (each training document is ``<s> text </s>``).

Reproducibility: file order, tokenizer training, batch sampling and init are seeded and ordered,
and the learning-rate schedule depends on the step only, so a run that finishes its ``--steps``
is deterministic for a given torch build and thread count. ``--max-minutes`` is a hard stop: if
it binds, training ends early (with the learning rate not yet decayed) and the log says so.

Shape legend: B batch, T sequence length, V vocab size, N held-out target tokens.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import random
import shlex
import sys
import sysconfig
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
import transformers
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import MixtralConfig, MixtralForCausalLM


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


@dataclass(frozen=True, kw_only=True)
class Corpus:
    """Source texts, split by package, in sorted path order."""

    train_paths: tuple[str, ...]
    held_paths: tuple[str, ...]
    train_texts: tuple[str, ...]
    held_texts: tuple[str, ...]


def parse_args(argv: list[str]) -> TrainConfig:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out-dir", type=Path, default=Path("models/mixserve-tiny"), help="output directory")
    parser.add_argument("--steps", type=int, default=TrainConfig.steps, help="optimizer steps (sets the schedule)")
    parser.add_argument("--seed", type=int, default=TrainConfig.seed, help="seed for init and batch sampling")
    parser.add_argument(
        "--threads",
        type=int,
        default=TrainConfig.threads,
        help="torch threads; on a CPU busy with other work use 1 (oversubscribed threads stall each other)",
    )
    parser.add_argument(
        "--max-minutes", type=float, default=TrainConfig.max_minutes, help="hard stop for the training loop"
    )
    args = parser.parse_args(argv)
    return TrainConfig(
        out_dir=args.out_dir,
        steps=args.steps,
        seed=args.seed,
        threads=args.threads,
        max_minutes=args.max_minutes,
    )


def load_corpus(stdlib: Path, cfg: TrainConfig) -> Corpus:
    """Sorted stdlib ``.py`` files, minus excluded directories, split into train and held-out."""
    train: list[Path] = []
    held: list[Path] = []
    for path in sorted(stdlib.rglob("*.py")):
        rel = path.relative_to(stdlib)
        dirs = rel.parts[:-1]
        if any(d in cfg.excluded_dirs or d.startswith("config-") for d in dirs):
            continue
        if rel.name.startswith("_sysconfigdata"):
            continue
        (held if dirs and dirs[0] in cfg.held_out else train).append(path)

    def read(paths: list[Path]) -> tuple[str, ...]:
        return tuple(p.read_text(encoding="utf-8") for p in paths)

    def names(paths: list[Path]) -> tuple[str, ...]:
        return tuple(str(p.relative_to(stdlib)) for p in paths)

    return Corpus(
        train_paths=names(train),
        held_paths=names(held),
        train_texts=read(train),
        held_texts=read(held),
    )


def train_tokenizer(texts: tuple[str, ...], cfg: TrainConfig) -> Tokenizer:
    """Byte-level BPE: every byte is in the alphabet, so decode(encode(x)) == x; no post-processor."""
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=cfg.vocab_size,
        special_tokens=list(cfg.special_tokens),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(texts, trainer)
    if tokenizer.get_vocab_size() != cfg.vocab_size:
        raise ValueError(f"tokenizer has {tokenizer.get_vocab_size()} tokens, expected vocab_size ({cfg.vocab_size})")
    return tokenizer


def encode_documents(tokenizer: Tokenizer, texts: tuple[str, ...], bos: int, eos: int) -> torch.Tensor:
    """One stream of ``<s> doc </s>`` for every document, in order. Returns ids [L].

    A literal "<s>" inside a source file is encoded as plain bytes, so special ids occur only at
    document boundaries (``encode_special_tokens`` is not saved in tokenizer.json).
    """
    ids: list[int] = []
    tokenizer.encode_special_tokens = True
    try:
        encodings = tokenizer.encode_batch(list(texts))
    finally:
        tokenizer.encode_special_tokens = False
    for encoding in encodings:
        ids.extend([bos, *encoding.ids, eos])
    return torch.tensor(ids, dtype=torch.long)


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


def dir_size_bytes(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def count_params(model: MixtralForCausalLM, cfg: TrainConfig) -> dict[str, int]:
    """Total parameters and those active per token (top_k of num_experts experts)."""
    total = sum(p.numel() for p in model.parameters())
    experts = sum(p.numel() for n, p in model.named_parameters() if ".experts." in n)
    return {"total": total, "active_per_token": total - experts + experts * cfg.top_k // cfg.num_experts}


def card_architecture(cfg: TrainConfig, m: dict[str, Any]) -> str:
    """Model card: front matter, purpose, architecture table and tokenizer."""
    head_dim = cfg.hidden_size // cfg.num_heads
    return f"""---
license: apache-2.0
library_name: transformers
pipeline_tag: text-generation
---

# mixserve-tiny

The embedded default model of mixserve: a very small Mixtral-architecture sparse mixture-of-experts
language model trained from scratch on the Python {m["python_version"]} standard library's own source.
It exists to exercise the serving stack (expert parallelism, GQA, sliding-window attention, BOS
handling) with real, non-random weights. It is a test fixture, not a useful code model.

## Architecture

`MixtralForCausalLM`, loads unchanged with `transformers.MixtralForCausalLM.from_pretrained`.

| field | value |
|---|---|
| layers | {cfg.num_layers} |
| hidden size | {cfg.hidden_size} |
| attention | {cfg.num_heads} query heads, {cfg.num_kv_heads} KV heads (GQA), head_dim {head_dim} |
| positions | RoPE, theta {cfg.rope_theta:g} |
| sliding window | {cfg.sliding_window} tokens (max_position_embeddings {cfg.max_position_embeddings}) |
| experts | {cfg.num_experts} SwiGLU experts per layer, top-{cfg.top_k} routing |
| expert intermediate size | {cfg.intermediate_size} |
| vocabulary | {cfg.vocab_size} (byte-level BPE), untied input/output embeddings |
| parameters | {m["params_total"]:,} total, {m["params_active"]:,} active per token |
| dtype on disk | float32 (`model.safetensors`, original Mixtral key names `block_sparse_moe.experts.N.w1/w2/w3`) |
| size on disk | {m["size_bytes"]:,} bytes ({m["size_bytes"] / 2**20:.1f} MiB) for the whole directory |

Tokenizer: `tokenizer.json`, a byte-level BPE trained with `tokenizers` on the training split
(ByteLevel pre-tokenizer and decoder, so `decode(encode(x)) == x`). Special tokens `<unk>` = 0,
`<s>` = {m["bos_token_id"]} (bos), `</s>` = {m["eos_token_id"]} (eos). There is **no post-processor**: callers
must prepend `<s>` themselves. Every training document was `<s> file text </s>`; a literal `<s>` or
`</s>` inside a source file was encoded as plain bytes (`encode_special_tokens = True` while encoding;
that flag is not stored in `tokenizer.json`, so by default `Tokenizer.encode` maps the literal text
`<s>` to the special id).

`config.json` is written by `transformers` {m["transformers_version"]}: RoPE theta is under
`rope_parameters.rope_theta`, and `head_dim` is set explicitly.

"""


def card_data_training(cfg: TrainConfig, corpus: Corpus, m: dict[str, Any]) -> str:
    """Model card: corpus split and the training recipe, command and run time."""
    held = ", ".join(f"`{name}/`" for name in cfg.held_out)
    excluded = ", ".join(f"`{name}/`" for name in cfg.excluded_dirs)
    train_chars, held_chars = sum(map(len, corpus.train_texts)), sum(map(len, corpus.held_texts))
    return f"""## Data

The `.py` files under `sysconfig.get_paths()["stdlib"]` of CPython {m["python_version"]}, in sorted path
order, excluding the directories {excluded} (at any depth), `config-*/` and `_sysconfigdata*.py`.

- Training: {len(corpus.train_paths)} files, {train_chars:,} characters, {m["train_tokens"]:,} tokens.
- Held out (never seen by the tokenizer or the model): the packages {held}:
  {len(corpus.held_paths)} files, {held_chars:,} characters, {m["held_tokens"]:,} tokens.

## Training

Plain PyTorch AdamW loop (betas 0.9/0.95, weight decay {cfg.weight_decay} on matrices, grad clip
{cfg.grad_clip}), batch {cfg.batch_size} x {cfg.seq_len} tokens sampled at random offsets, peak lr {cfg.lr:g},
{cfg.warmup_steps} warmup steps then cosine decay to {cfg.min_lr_ratio:g} x peak, router load-balancing
loss coefficient {cfg.router_aux_loss_coef:g}. Seed {cfg.seed}, {cfg.threads} CPU threads.

```
{m["command"]}
```

Run: {m["steps_done"]} of {cfg.steps} steps ({m["train_tokens_seen"]:,} tokens, about {m["epochs"]:.1f} epochs) in
{m["train_seconds"] / 60:.1f} min of training, {m["total_seconds"] / 60:.1f} min wall for the whole script,
on {m["machine"]}. The schedule depends only on the step, so the run is seeded and
deterministic for a given torch build and thread count (`--max-minutes` is only a hard stop).

"""


def card_evaluation_license(cfg: TrainConfig, m: dict[str, Any]) -> str:
    """Model card: held-out loss against baselines, a greedy sample, and the license."""
    return f"""## Evaluation

Mean cross-entropy on the held-out packages (nats per token over {m["held_targets"]:,} target tokens:
non-overlapping {cfg.seq_len + 1}-token windows, the first token of each window is context only):

| model | held-out loss |
|---|---|
| mixserve-tiny | **{m["held_out_loss"]:.3f}** |
| unigram (training-token frequencies, add-one smoothing) | {m["unigram_loss"]:.3f} |
| uniform, ln({cfg.vocab_size}) | {math.log(cfg.vocab_size):.3f} |

Ratio model / unigram: {m["held_out_loss"] / m["unigram_loss"]:.3f} (acceptance: at most 0.5).

Greedy sample, {cfg.sample_tokens} tokens after `<s>{cfg.sample_prompt}`:

```python
{m["sample"]}
```

## License

The weights and tokenizer are released under the Apache License 2.0, the same as mixserve. They
were trained on the CPython standard library source, which is licensed under the Python Software
Foundation License (PSF-2.0); see `LICENSE.txt` in the CPython distribution.
"""


def model_card(cfg: TrainConfig, corpus: Corpus, metrics: dict[str, Any]) -> str:
    """README.md for the output directory, filled in from the run's measured metrics."""
    return (
        card_architecture(cfg, metrics)
        + card_data_training(cfg, corpus, metrics)
        + card_evaluation_license(cfg, metrics)
    )


def save(model: MixtralForCausalLM, tokenizer: Tokenizer, out_dir: Path) -> None:
    out_dir.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out_dir)
    tokenizer.save(str(out_dir / "tokenizer.json"))


@dataclass(frozen=True, kw_only=True)
class Data:
    """The corpus, its tokenizer, and both splits as token streams."""

    corpus: Corpus
    tokenizer: Tokenizer
    train_stream: torch.Tensor  # [L_train]
    held_stream: torch.Tensor  # [L_held]
    bos: int
    eos: int


def prepare_data(cfg: TrainConfig) -> Data:
    corpus = load_corpus(Path(sysconfig.get_paths()["stdlib"]), cfg)
    tokenizer = train_tokenizer(corpus.train_texts, cfg)
    bos, eos = tokenizer.token_to_id(cfg.bos_token), tokenizer.token_to_id(cfg.eos_token)
    data = Data(
        corpus=corpus,
        tokenizer=tokenizer,
        train_stream=encode_documents(tokenizer, corpus.train_texts, bos, eos),
        held_stream=encode_documents(tokenizer, corpus.held_texts, bos, eos),
        bos=bos,
        eos=eos,
    )
    print(
        f"corpus: {len(corpus.train_paths)} train files, {data.train_stream.numel():,} tokens; "
        f"{len(corpus.held_paths)} held-out files ({', '.join(cfg.held_out)}), {data.held_stream.numel():,} tokens",
        flush=True,
    )
    return data


def write_model_card(cfg: TrainConfig, data: Data, metrics: dict[str, Any]) -> dict[str, Any]:
    """Writes README.md (twice, so the size it states includes itself); returns metrics with size_bytes."""
    metrics = {**metrics, "size_bytes": dir_size_bytes(cfg.out_dir)}
    for _ in range(2):
        (cfg.out_dir / "README.md").write_text(model_card(cfg, data.corpus, metrics), encoding="utf-8")
        metrics["size_bytes"] = dir_size_bytes(cfg.out_dir)
    return metrics


def main(argv: list[str]) -> None:
    t_start = time.perf_counter()
    cfg = parse_args(argv)
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
        "command": shlex.join(["python", "scripts/train_tiny.py", *argv]),
        "total_seconds": time.perf_counter() - t_start,
    }
    metrics = write_model_card(cfg, data, metrics)
    print(json.dumps({k: v for k, v in metrics.items() if k != "sample"} | {"config": asdict(cfg)}, default=str))
    if loss > unigram / 2:
        raise SystemExit(f"acceptance failed: held-out loss {loss:.4f} > unigram loss / 2 ({unigram / 2:.4f})")


if __name__ == "__main__":
    main(sys.argv[1:])
