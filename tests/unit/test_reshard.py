"""`reshard`: a balancer move builds a worker's new shard from the one it holds, reading only the experts
that move to it; the result equals a full load of the new experts, packed or stacked."""

from __future__ import annotations

import pytest
import torch

from workers.config import ModelConfig
from workers.model import linear as linear_module
from workers.model.checkpoint import CheckpointReader
from workers.model.weights import expert_tensor_shapes, load_expert_shard, reshard


class RecordingReader(CheckpointReader):
    """The real reader, remembering which tensors it was asked for."""

    def __init__(self, model_dir) -> None:
        super().__init__(model_dir)
        self.read: list[str] = []

    def load(self, shapes, **kwargs):
        self.read += list(shapes)
        return super().load(shapes, **kwargs)


@pytest.mark.parametrize("packed", [False, True], ids=["stacked", "packed"])
def test_reshard_reads_only_new_experts_and_equals_a_full_load(tiny8, monkeypatch, packed):
    if packed:
        monkeypatch.setattr(linear_module, "PACK_MIN_ELEMENTS", 0)
    cfg = ModelConfig.from_model_dir(tiny8)
    options = {"dtype": torch.float32, "device": "cpu"}
    old = load_expert_shard(CheckpointReader(tiny8), cfg, (0, 1, 2, 5), **options)
    reader = RecordingReader(tiny8)
    new = reshard(old, reader, cfg, (1, 3, 5, 6), **options)
    assert sorted(reader.read) == sorted(expert_tensor_shapes(cfg, (3, 6))), "only experts 3 and 6 are read"
    full = load_expert_shard(CheckpointReader(tiny8), cfg, (1, 3, 5, 6), **options)
    assert (new.expert_ids, new.tensor_names) == (full.expert_ids, full.tensor_names)
    for got, want in zip(new.layers, full.layers, strict=True):
        assert type(got) is type(want) and got.num_experts == want.num_experts == 4
        for local in range(4):
            for a, b in zip(got.linears(local), want.linears(local), strict=True):
                assert torch.equal(a.dense_weight(), b.dense_weight())
    if packed:  # a kept expert's prepared weights are shared, not copied
        assert new.layers[0].w13_e[0] is old.layers[0].w13_e[1]
        assert new.layers[1].w2_e[2] is old.layers[1].w2_e[3]


def test_reshard_to_the_same_experts_reads_nothing(tiny8):
    cfg = ModelConfig.from_model_dir(tiny8)
    old = load_expert_shard(CheckpointReader(tiny8), cfg, (2, 4), dtype=torch.float32, device="cpu")
    reader = RecordingReader(tiny8)
    new = reshard(old, reader, cfg, (2, 4), dtype=torch.float32, device="cpu")
    assert reader.read == [] and new.expert_ids == (2, 4)
    assert torch.equal(new.layers[0].w13_e2FD, old.layers[0].w13_e2FD)
