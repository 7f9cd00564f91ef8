"""`mixserve bench make-model --favour-experts`: a tiny random checkpoint whose routers favour experts 2 and 3 is
an ordinary Mixtral checkpoint (transformers loads it, config.json has no extra key), and on random prompts other
than those it was calibrated on, every layer sends the favoured experts more than twice their uniform share of
the top-2 rows, at any prompt length; a plain checkpoint does not. A directory written with other favoured experts
(or none) is replaced, never reused."""

from __future__ import annotations

import json

import pytest
import torch

from cluster.bench.cli import build_parser
from cluster.bench.router_skew import target_share
from cluster.bench.workload import (
    BENCH_RECORD,
    Workload,
    make_prompts,
    recorded_favour,
    write_preset,
    write_random_mixtral,
)

TINY = dict(vocab_size=512, hidden_size=64, intermediate_size=96, num_hidden_layers=3, num_attention_heads=4,
            num_key_value_heads=2, num_local_experts=8, num_experts_per_tok=2, sliding_window=None,
            max_position_embeddings=512)
FAVOURED = (2, 3)
UNIFORM = len(FAVOURED) / TINY["num_local_experts"]


def favoured_shares(model_dir, *, num_prompts: int, input_len: int, seed: int) -> list[float]:
    """Per layer, the share of the top-2 rows (token, pick) that transformers' routers send to FAVOURED."""
    from transformers import MixtralForCausalLM

    model = MixtralForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    ids = torch.tensor(make_prompts(Workload(num_prompts=num_prompts, input_len=input_len, output_len=1, seed=seed),
                                    TINY["vocab_size"]))
    with torch.no_grad():
        out = model(input_ids=ids, output_router_logits=True)
    assert len(out.router_logits) == TINY["num_hidden_layers"]
    shares = []
    for logits_TE in out.router_logits:
        topk_TK = logits_TE.topk(TINY["num_experts_per_tok"], dim=-1).indices
        shares.append(torch.isin(topk_TK, torch.tensor(FAVOURED)).float().mean().item())
    return shares


@pytest.fixture(scope="module")
def favoured_dir(tmp_path_factory):
    return write_random_mixtral(tmp_path_factory.mktemp("favoured") / "m", TINY, favour_experts=FAVOURED)


@pytest.fixture(scope="module")
def plain_dir(tmp_path_factory):
    return write_random_mixtral(tmp_path_factory.mktemp("plain") / "m", TINY)


def test_favoured_checkpoint_is_an_ordinary_mixtral(favoured_dir):
    from transformers import MixtralConfig

    raw = json.loads((favoured_dir / "config.json").read_text())
    assert set(raw) <= set(MixtralConfig().to_dict()) | {"architectures", "transformers_version", "dtype"}, (
        sorted(set(raw) - set(MixtralConfig().to_dict())))
    record = json.loads((favoured_dir / BENCH_RECORD).read_text())
    assert record["favour_experts"] == list(FAVOURED) and recorded_favour(favoured_dir) == FAVOURED
    # calibrated on its own prompts: each layer at the target share
    assert record["favoured_share_per_layer"] == pytest.approx([target_share(2, 8, 2)] * 3, abs=0.01)


@pytest.mark.parametrize(("num_prompts", "input_len"), [(16, 32), (2, 400)], ids=["short", "long"])
def test_favoured_experts_get_most_rows_on_other_prompts(favoured_dir, num_prompts, input_len):
    shares = favoured_shares(favoured_dir, num_prompts=num_prompts, input_len=input_len, seed=101)
    assert all(2 * UNIFORM < s < 0.8 for s in shares), f"favoured share per layer {shares}, uniform {UNIFORM}"


def test_plain_checkpoint_is_not_skewed_that_way(plain_dir):
    shares = favoured_shares(plain_dir, num_prompts=16, input_len=32, seed=101)
    assert all(s < 2 * UNIFORM for s in shares), f"plain router's share of {FAVOURED} per layer: {shares}"
    assert recorded_favour(plain_dir) == ()


def test_a_directory_is_reused_only_with_the_same_favoured_experts(tmp_path):
    out = tmp_path / "m"

    def weights_mtime() -> int:
        return (out / "model.safetensors").stat().st_mtime_ns

    write_random_mixtral(out, TINY)
    plain = weights_mtime()
    assert write_random_mixtral(out, TINY) == out and weights_mtime() == plain, "same settings: kept"
    write_random_mixtral(out, TINY, favour_experts=FAVOURED)
    assert recorded_favour(out) == FAVOURED and weights_mtime() != plain, "a plain checkpoint is not favoured"
    favoured = weights_mtime()
    write_random_mixtral(out, TINY, favour_experts=FAVOURED)
    assert weights_mtime() == favoured
    write_random_mixtral(out, TINY, favour_experts=(5,))
    assert recorded_favour(out) == (5,)
    (out / BENCH_RECORD).unlink()  # written before the record existed: a plain checkpoint
    assert recorded_favour(out) == ()
    before = weights_mtime()
    write_random_mixtral(out, TINY)
    assert weights_mtime() == before, "a checkpoint without a record counts as plain, as before"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m"], "no temporary directory left behind"


@pytest.mark.parametrize(("favour", "message"), [
    ((2, 2), "names an expert twice"),
    ((8,), "must be experts of 0..7"),
    (tuple(range(8)), "names every one of the 8 experts"),
])
def test_favoured_experts_are_checked(tmp_path, favour, message):
    with pytest.raises(ValueError, match=message):
        write_random_mixtral(tmp_path / "m", TINY, favour_experts=favour)
    assert not (tmp_path / "m").exists()


def test_make_model_takes_the_favoured_experts(tmp_path):
    args = build_parser().parse_args(["make-model", "--preset", "w1-random", "--out", str(tmp_path),
                                      "--favour-experts", "2,3"])
    assert args.favour_experts == (2, 3)
    assert build_parser().parse_args(["make-model", "--preset", "w1-random", "--out", "x"]).favour_experts == ()
    with pytest.raises(ValueError, match="preset must be one of"):
        write_preset("nope", tmp_path, favour_experts=(2, 3))
