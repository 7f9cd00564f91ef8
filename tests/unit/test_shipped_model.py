"""Checks on the shipped embedded default model, models/mixserve-tiny (built by scripts/train_tiny.py).

Loads the directory exactly as a user would (``MixtralForCausalLM.from_pretrained``,
``tokenizers.Tokenizer.from_file``) and checks the architecture contract the server relies on
(8 experts, top-2, GQA, sliding window, ids of <s> and </s>), the size budget, exact tokenizer
round trips, and that the weights are trained: the loss on source from a held-out stdlib package
(``json/``, never seen in training) must be far below that of a uniform guess.
"""

from __future__ import annotations

import math
import sysconfig
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from tokenizers import Tokenizer
from transformers import MixtralForCausalLM

MAX_DIR_BYTES = 25 * 1000 * 1000


@pytest.fixture(scope="module")
def model_dir() -> Path:
    path = Path(__file__).resolve().parents[2] / "models" / "mixserve-tiny"
    assert (path / "config.json").is_file(), f"{path} has no config.json; run scripts/train_tiny.py"
    return path


@pytest.fixture(scope="module")
def model(model_dir: Path) -> MixtralForCausalLM:
    return MixtralForCausalLM.from_pretrained(model_dir).eval()


@pytest.fixture(scope="module")
def tokenizer(model_dir: Path) -> Tokenizer:
    return Tokenizer.from_file(str(model_dir / "tokenizer.json"))


def test_config_is_mixtral_8_experts_top2_gqa_sliding_window(model: MixtralForCausalLM) -> None:
    config = model.config
    assert config.model_type == "mixtral"
    assert config.num_local_experts == 8, f"num_local_experts is {config.num_local_experts}, expected 8"
    assert config.num_experts_per_tok == 2, f"num_experts_per_tok is {config.num_experts_per_tok}, expected 2"
    assert config.num_key_value_heads < config.num_attention_heads, "expected grouped-query attention"
    assert config.num_attention_heads % config.num_key_value_heads == 0
    assert config.sliding_window is not None, "expected a sliding window"
    assert 0 < config.sliding_window < config.max_position_embeddings
    assert config.tie_word_embeddings is False


def test_special_token_ids_match_config(model: MixtralForCausalLM, tokenizer: Tokenizer) -> None:
    assert tokenizer.get_vocab_size() == model.config.vocab_size
    assert tokenizer.token_to_id("<s>") == model.config.bos_token_id
    assert tokenizer.token_to_id("</s>") == model.config.eos_token_id
    ids = tokenizer.encode("x = 1").ids
    assert model.config.bos_token_id not in ids, "tokenizer must not insert <s>; the server adds it"


def test_directory_fits_size_budget(model_dir: Path) -> None:
    size = sum(p.stat().st_size for p in model_dir.rglob("*") if p.is_file())
    assert size <= MAX_DIR_BYTES, f"{model_dir} is {size:,} bytes, budget is {MAX_DIR_BYTES:,}"


@pytest.mark.parametrize(
    "text",
    [
        "def f(x):\n\treturn x ** 2  # tab-indented\n",
        'class A:\n    """Docstring with unicode: é, ß, 中文, 🐍."""\n\n    x: int = 0\r\n',
        "  leading spaces,   runs of spaces and trailing ones   \n\n\n",
        "<s>not a special token in source</s>",
        "",
    ],
)
def test_tokenizer_round_trips_exactly(tokenizer: Tokenizer, text: str) -> None:
    assert tokenizer.decode(tokenizer.encode(text).ids, skip_special_tokens=False) == text


def test_tokenizer_round_trips_this_file(tokenizer: Tokenizer) -> None:
    source = Path(__file__).read_text(encoding="utf-8")
    assert tokenizer.decode(tokenizer.encode(source).ids, skip_special_tokens=False) == source


def test_loss_on_held_out_stdlib_source_is_well_below_uniform(model: MixtralForCausalLM, tokenizer: Tokenizer) -> None:
    source = (Path(sysconfig.get_paths()["stdlib"]) / "json" / "encoder.py").read_text(encoding="utf-8")
    ids = [model.config.bos_token_id, *tokenizer.encode(source).ids][:257]
    input_ids = torch.tensor([ids])  # [1, T]
    with torch.inference_mode():
        logits = model(input_ids=input_ids[:, :-1], use_cache=False).logits  # [1, T-1, V]
    loss = F.cross_entropy(logits[0].float(), input_ids[0, 1:]).item()
    uniform = math.log(model.config.vocab_size)
    assert loss < uniform / 2, f"held-out loss {loss:.3f} is not below half of ln(vocab) ({uniform / 2:.3f})"
