from __future__ import annotations

import dataclasses

import pytest

from workers.config import ConfigError, ModelConfig

BASE = dict(
    model_type="mixtral", vocab_size=100, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
    num_attention_heads=4, num_key_value_heads=2, num_local_experts=8, num_experts_per_tok=2,
    rms_norm_eps=1e-5, rope_theta=1e6, sliding_window=None, max_position_embeddings=128,
    bos_token_id=1, eos_token_id=2,
)


def test_reads_transformers_4_and_5_layouts():
    v4 = ModelConfig.from_hf_dict(BASE | {"rope_theta": 5e5})
    v5 = ModelConfig.from_hf_dict(
        {k: v for k, v in BASE.items() if k != "rope_theta"}
        | {"rope_parameters": {"rope_type": "default", "rope_theta": 5e5}}
    )
    assert v4 == v5
    assert v4.head_dim == 16 and v4.num_key_value_heads == 2 and v4.eos_token_ids == (2,)


def test_explicit_head_dim_and_eos_list():
    cfg = ModelConfig.from_hf_dict(BASE | {"head_dim": 32, "eos_token_id": [2, 5]})
    assert cfg.head_dim == 32 and cfg.eos_token_ids == (2, 5)


def test_frozen():
    cfg = ModelConfig.from_hf_dict(BASE)
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.hidden_size = 1  # type: ignore[misc]


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"num_experts_per_tok": 9}, r"num_experts_per_tok \(9\) exceeds num_local_experts \(8\)"),
        ({"num_key_value_heads": 3}, r"num_attention_heads \(4\) is not divisible by num_key_value_heads \(3\)"),
        ({"hidden_size": -4}, "hidden_size must be a positive integer"),
        ({"sliding_window": 0}, "sliding_window must be a positive integer"),
        ({"eos_token_id": 100}, r"eos_token_id \(100\) is outside"),
        ({"model_type": "llama"}, "model_type must be 'mixtral'"),
        ({"vocab_size": None}, "missing the required field 'vocab_size'"),
        ({"rope_parameters": {"rope_type": "yarn", "factor": 4.0}}, "rope_type 'yarn' is not supported"),
    ],
)
def test_invalid_fields_are_named(change, message):
    with pytest.raises(ConfigError, match=message):
        ModelConfig.from_hf_dict(BASE | change)


def test_typed_errors_survive_pickling():
    import pickle

    from cluster.errors import InvalidRequest

    err = pickle.loads(pickle.dumps(InvalidRequest("top_p", "must be in (0, 1]")))
    assert isinstance(err, InvalidRequest) and err.field == "top_p" and str(err) == "top_p: must be in (0, 1]"


def test_active_params_per_token_count_one_tokens_weights():
    cfg = ModelConfig.from_hf_dict(dict(
        vocab_size=100, hidden_size=8, intermediate_size=12, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, num_local_experts=4, num_experts_per_tok=2, max_position_embeddings=64,
    ))
    # per layer: q 8x8 + k, v 2 x 8x4 + o 8x8 = 192, router 8x4 = 32, two experts of 3 x 8x12 = 576; lm_head 800
    assert cfg.active_params_per_token == 2 * (192 + 32 + 576) + 800
