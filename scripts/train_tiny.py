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

Implementation: the ``tiny_training`` package next to this script (importable because running
``python scripts/train_tiny.py`` puts ``scripts/`` first on ``sys.path``).
"""

from __future__ import annotations

import argparse
import shlex
import sys
import time
from pathlib import Path

from tiny_training.config import TrainConfig
from tiny_training.pipeline import run


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


def main(argv: list[str]) -> None:
    t_start = time.perf_counter()
    cfg = parse_args(argv)
    run(cfg, command=shlex.join(["python", "scripts/train_tiny.py", *argv]), started=t_start)


if __name__ == "__main__":
    main(sys.argv[1:])
