"""Byte-level BPE tokenizer training and encoding documents into one ``<s> doc </s>`` token stream."""

from __future__ import annotations

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

from .config import TrainConfig


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
