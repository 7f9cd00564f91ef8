"""The run's data: the stdlib corpus, its trained tokenizer and both splits as token streams."""

from __future__ import annotations

import sysconfig
from dataclasses import dataclass
from pathlib import Path

import torch
from tokenizers import Tokenizer

from .config import TrainConfig
from .corpus import Corpus, load_corpus
from .tokenization import encode_documents, train_tokenizer


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
