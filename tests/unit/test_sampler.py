from __future__ import annotations

import pytest
import torch

from workers.model.sampler import SamplingParams, filter_logits, sample_next


def _logits(batch: int = 4, vocab: int = 50) -> torch.Tensor:
    return torch.randn(batch, vocab, generator=torch.Generator().manual_seed(0)) * 3


def test_greedy_is_argmax():
    logits = _logits()
    params = [SamplingParams(temperature=0.0)] * 4
    ids, logprobs = sample_next(logits, params, [p.make_generator() for p in params])
    assert ids.tolist() == logits.argmax(-1).tolist()
    torch.testing.assert_close(logprobs, torch.log_softmax(logits, -1).max(-1).values)


def test_same_seed_same_tokens_different_seed_differs():
    logits = _logits(1, 1000)

    def draw(seed: int) -> list[int]:
        p = SamplingParams(temperature=1.0, seed=seed)
        gen = p.make_generator()
        return [int(sample_next(logits, [p], [gen])[0]) for _ in range(20)]

    assert draw(7) == draw(7)
    assert draw(7) != draw(8)


def test_top_k_one_and_tiny_top_p_are_greedy():
    logits = _logits()
    for p in (SamplingParams(temperature=1.5, top_k=1, seed=1), SamplingParams(temperature=1.5, top_p=1e-6, seed=1)):
        ids, _ = sample_next(logits, [p] * 4, [p.make_generator() for _ in range(4)])
        assert ids.tolist() == logits.argmax(-1).tolist()


def test_filter_keeps_exactly_the_nucleus():
    logits = torch.log(torch.tensor([0.5, 0.3, 0.15, 0.05]))
    kept = torch.isfinite(filter_logits(logits, top_k=0, top_p=0.75))
    assert kept.tolist() == [True, True, False, False]
    kept = torch.isfinite(filter_logits(logits, top_k=3, top_p=1.0))
    assert kept.tolist() == [True, True, True, False]


def test_samples_stay_inside_top_k():
    logits = _logits(1, 100)
    p = SamplingParams(temperature=2.0, top_k=5, seed=3)
    gen = p.make_generator()
    allowed = set(torch.topk(logits[0], 5).indices.tolist())
    assert {int(sample_next(logits, [p], [gen])[0]) for _ in range(200)} <= allowed


@pytest.mark.parametrize(
    ("kwargs", "field"), [({"temperature": -1}, "temperature"), ({"top_p": 0}, "top_p"), ({"top_k": -1}, "top_k")]
)
def test_invalid_params_name_the_field(kwargs, field):
    with pytest.raises(ValueError, match=field):
        SamplingParams(**kwargs)


@pytest.mark.parametrize("temperature", [1e-45, 1e-30, 1e-6, 1e-5, 1e-3])
def test_tiny_temperatures_never_produce_nan(temperature):
    logits = torch.tensor([[50.0, 49.0, -30.0, 10.0]])
    p = SamplingParams(temperature=temperature, seed=1)
    ids, logprobs = sample_next(logits, [p], [p.make_generator()])
    assert int(ids[0]) == 0 and torch.isfinite(logprobs).all()


@pytest.mark.parametrize("value", [float("nan"), float("inf")])
def test_non_finite_temperature_is_rejected(value):
    with pytest.raises(ValueError, match="temperature"):
        SamplingParams(temperature=value)
