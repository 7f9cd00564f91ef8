"""The model card (README.md of the output directory), filled in from the run's config and metrics."""

from __future__ import annotations

import math
from typing import Any

from .config import TrainConfig
from .corpus import Corpus


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
