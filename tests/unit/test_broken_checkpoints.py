"""Broken checkpoints fail at load with an error naming the tensor, field or file."""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from workers.config import ConfigError
from workers.model.checkpoint import CheckpointError
from workers.runtime.local_build import build_attention_rank


def _load(model_dir: Path):
    return build_attention_rank(model_dir, dtype=torch.float32, device=torch.device("cpu"), num_blocks=8,
                                block_size=4)


@pytest.fixture
def single(tiny8, tmp_path) -> Path:
    out = tmp_path / "m"
    shutil.copytree(tiny8, out)
    return out


@pytest.fixture
def sharded(tiny_checkpoints, tmp_path) -> Path:
    out = tmp_path / "s"
    shutil.copytree(tiny_checkpoints["sharded_top2_gqa4"], out)
    return out


def _rewrite(path: Path, edit) -> None:
    tensors = load_file(path)
    edit(tensors)
    save_file(tensors, path, metadata={"format": "pt"})


def test_missing_tensor_is_named(single):
    name = "model.layers.1.block_sparse_moe.experts.3.w2.weight"
    _rewrite(single / "model.safetensors", lambda t: t.pop(name))
    with pytest.raises(CheckpointError, match=name.replace(".", r"\.")):
        _load(single)


def test_wrong_shape_is_named(single):
    name = "model.layers.0.self_attn.k_proj.weight"
    _rewrite(single / "model.safetensors", lambda t: t.__setitem__(name, torch.zeros(3, 64)))
    with pytest.raises(CheckpointError, match=rf"{name.replace('.', '[.]')} .*shape \(3, 64\), expected"):
        _load(single)


@pytest.mark.parametrize("field", ["hidden_size", "num_local_experts", "vocab_size"])
def test_missing_config_field_is_named(single, field):
    raw = json.loads((single / "config.json").read_text())
    del raw[field]
    (single / "config.json").write_text(json.dumps(raw))
    with pytest.raises(ConfigError, match=field):
        _load(single)


def test_inconsistent_config_names_both_fields(single):
    raw = json.loads((single / "config.json").read_text())
    raw["num_key_value_heads"] = 3
    (single / "config.json").write_text(json.dumps(raw))
    with pytest.raises(ConfigError, match=r"num_attention_heads \(4\).*num_key_value_heads \(3\)"):
        _load(single)


def test_unreadable_file_is_named(single):
    (single / "model.safetensors").write_bytes(b"\x00garbage, not safetensors" * 10)
    with pytest.raises(CheckpointError, match=r"model\.safetensors"):
        _load(single)


def test_missing_shard_file_is_named(sharded):
    shard = sorted(sharded.glob("model-*.safetensors"))[-1]
    shard.unlink()
    with pytest.raises(CheckpointError, match=re.escape(shard.name)):
        _load(sharded)


def test_truncated_shard_is_named(sharded):
    shard = sorted(sharded.glob("model-*.safetensors"))[0]
    shard.write_bytes(shard.read_bytes()[:200])
    with pytest.raises(CheckpointError, match=re.escape(shard.name)):
        _load(sharded)


def test_empty_directory(tmp_path):
    with pytest.raises(ConfigError, match=r"config\.json"):
        _load(tmp_path)
