"""Corpus selection: the stdlib ``.py`` files to train on and the held-out packages."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from .config import TrainConfig


@dataclass(frozen=True, kw_only=True)
class Corpus:
    """Source texts, split by package, in sorted path order."""

    train_paths: tuple[str, ...]
    held_paths: tuple[str, ...]
    train_texts: tuple[str, ...]
    held_texts: tuple[str, ...]


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
