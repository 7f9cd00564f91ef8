from __future__ import annotations

import pytest
import torch

from workers.model.sampler import SamplingParams, filter_logits, sample_next


def _logits(batch: int = 4, vocab: int = 50) -> torch.Tensor:
    return torch.randn(batch, vocab, generator=torch.Generator().manual_seed(0)) * 3


def _draw(logits: torch.Tensor, p: SamplingParams, seed: int | None, positions) -> list[int]:
    return [int(sample_next(logits, [p], [seed], [pos])[0][0]) for pos in positions]


def test_greedy_is_argmax():
    logits = _logits()
    params = [SamplingParams(temperature=0.0)] * 4
    ids, logprobs = sample_next(logits, params, [None] * 4, [0] * 4)
    assert ids.tolist() == logits.argmax(-1).tolist()
    torch.testing.assert_close(logprobs, torch.log_softmax(logits, -1).max(-1).values)


def test_same_seed_same_tokens_different_seed_differs():
    logits = _logits(1, 1000)
    p = SamplingParams(temperature=1.0)
    assert _draw(logits, p, 7, range(20)) == _draw(logits, p, 7, range(20))
    assert _draw(logits, p, 7, range(20)) != _draw(logits, p, 8, range(20))
    assert len(set(_draw(logits, p, 7, range(20)))) > 1, "every position drew the same token"


def test_a_draw_depends_only_on_seed_and_position_not_the_batch():
    logits = _logits(4, 1000)
    params = [SamplingParams(temperature=1.0, top_p=0.9)] * 4
    together, logprobs = sample_next(logits, params, [11, 12, 13, 14], [5, 6, 7, 8])
    for row in range(4):
        alone, alone_logprob = sample_next(logits[row : row + 1], params[:1], [11 + row], [5 + row])
        assert int(alone[0]) == int(together[row])
        torch.testing.assert_close(alone_logprob[0], logprobs[row])
    torch.testing.assert_close(logprobs, torch.log_softmax(logits, -1).gather(1, together[:, None])[:, 0])


def test_top_k_one_and_tiny_top_p_are_greedy():
    logits = _logits()
    for p in (SamplingParams(temperature=1.5, top_k=1), SamplingParams(temperature=1.5, top_p=1e-6)):
        ids, _ = sample_next(logits, [p] * 4, [1, 2, 3, 4], [0, 0, 0, 0])
        assert ids.tolist() == logits.argmax(-1).tolist()


def test_filter_keeps_exactly_the_nucleus_and_the_top_k_per_row():
    logits = torch.log(torch.tensor([[0.5, 0.3, 0.15, 0.05], [0.05, 0.15, 0.3, 0.5], [0.5, 0.3, 0.15, 0.05]]))
    kept = torch.isfinite(filter_logits(logits, torch.tensor([0, 3, 2]), torch.tensor([0.75, 1.0, 0.5])))
    assert kept.tolist() == [[True, True, False, False], [False, True, True, True], [True, False, False, False]]


def test_samples_stay_inside_top_k():
    logits = _logits(1, 100)
    allowed = set(torch.topk(logits[0], 5).indices.tolist())
    assert set(_draw(logits, SamplingParams(temperature=2.0, top_k=5), 3, range(200))) <= allowed


def test_draws_follow_the_tempered_distribution():
    """Over 4,000 positions each token is drawn about as often as softmax(logits / T) says."""
    logits = torch.tensor([[2.0, 1.0, 0.0, -1.0, 0.5]])
    p = SamplingParams(temperature=0.7)
    expected = torch.softmax(logits[0] / 0.7, -1)
    ids, _ = sample_next(logits.expand(4000, -1), [p] * 4000, [21] * 4000, list(range(4000)))
    observed = torch.bincount(ids, minlength=5).float() / 4000
    assert (observed - expected).abs().max() < 0.03, (observed, expected)


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
    ids, logprobs = sample_next(logits, [p], [1], [0])
    assert int(ids[0]) == 0 and torch.isfinite(logprobs).all()


@pytest.mark.parametrize("value", [float("nan"), float("inf")])
def test_non_finite_temperature_is_rejected(value):
    with pytest.raises(ValueError, match="temperature"):
        SamplingParams(temperature=value)
