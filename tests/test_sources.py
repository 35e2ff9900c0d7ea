"""Tests of the synthetic sources: the HMM's forward algorithm, forward filtering and sampler are exact."""
from __future__ import annotations

import pytest
import torch
from scipy import stats

from reference_models.sources import HiddenMarkovModel

ALPHA = 1e-3  # false-alarm probability of each chi-square test


def _all_sequences(vocab_size: int, length: int) -> torch.Tensor:
    """Every sequence in [0, V)^T, in lexicographic order: [V^T, T]."""
    index = torch.arange(vocab_size ** length)[:, None]
    powers = vocab_size ** torch.arange(length - 1, -1, -1)
    return index // powers % vocab_size


@pytest.fixture(scope="module")
def hmm():
    return HiddenMarkovModel.random(3, 4, 6, seed=7)


def test_log_prob_normalizes_over_all_sequences(hmm):
    total = hmm.log_prob(_all_sequences(4, 6)).logsumexp(0).exp()
    assert float(total) == pytest.approx(1.0, abs=1e-12)


def test_log_prob_matches_brute_force_sum_over_hidden_paths():
    hmm = HiddenMarkovModel.random(2, 3, 3, seed=1)
    x = _all_sequences(3, 3)
    paths = _all_sequences(2, 3)
    lp = (hmm.initial.log()[paths[:, 0]]
          + hmm.transition.log()[paths[:, :-1], paths[:, 1:]].sum(1))  # [P]
    emit = hmm.emission.log()[paths[None, :, :], x[:, None, :]].sum(2)  # [n, P]
    torch.testing.assert_close(hmm.log_prob(x), (lp + emit).logsumexp(1), rtol=0, atol=1e-12)


def test_conditionals_are_normalized_and_chain_to_log_prob(hmm):
    x = hmm.sample(500, torch.Generator().manual_seed(0))
    logits = hmm.conditionals(x)
    assert logits.shape == (500, 6, 4)
    torch.testing.assert_close(logits.logsumexp(-1), torch.zeros(500, 6, dtype=torch.float64), rtol=0, atol=1e-12)
    chained = logits.gather(2, x[:, :, None]).squeeze(2).sum(1)
    torch.testing.assert_close(chained, hmm.log_prob(x), rtol=0, atol=1e-10)


def test_first_conditional_is_the_marginal_of_the_first_token(hmm):
    x = torch.zeros(1, 6, dtype=torch.long)
    torch.testing.assert_close(hmm.conditionals(x)[0, 0].exp(), hmm.initial @ hmm.emission)


def test_empirical_sequence_frequencies_match_exact_probabilities():
    hmm = HiddenMarkovModel.random(2, 3, 4, seed=3)
    n = 40_000
    x = hmm.sample(n, torch.Generator().manual_seed(11))
    assert x.dtype == torch.long and x.shape == (n, 4)
    code = (x * 3 ** torch.arange(3, -1, -1)).sum(1)
    observed = torch.bincount(code, minlength=81).double()
    expected = n * hmm.log_prob(_all_sequences(3, 4)).exp()
    assert float(expected.sum()) == pytest.approx(n)
    keep = expected >= 5  # pool the rare sequences so every cell has expected count ≥ 5
    obs = torch.cat([observed[keep], observed[~keep].sum()[None]])
    exp = torch.cat([expected[keep], expected[~keep].sum()[None]])
    assert stats.chisquare(obs.numpy(), exp.numpy()).pvalue > ALPHA


def test_sampling_is_reproducible_from_the_generator(hmm):
    a = hmm.sample(50, torch.Generator().manual_seed(5))
    b = hmm.sample(50, torch.Generator().manual_seed(5))
    assert torch.equal(a, b)


@pytest.mark.parametrize("kwargs, argument", [
    (dict(initial=[0.5, 0.6], transition=[[1, 0], [0, 1]], emission=[[1.0], [1.0]], length=3), "initial"),
    (dict(initial=[0.5, 0.5], transition=[[1, 0]], emission=[[1.0], [1.0]], length=3), "transition"),
    (dict(initial=[0.5, 0.5], transition=[[1, 0], [0, 1]], emission=[[-1.0, 2.0], [1.0, 0.0]], length=3),
     "emission"),
    (dict(initial=[0.5, 0.5], transition=[[1, 0], [0, 1]], emission=[[1.0], [1.0]], length=0), "length"),
])
def test_bad_parameters_raise_value_error_naming_the_argument(kwargs, argument):
    with pytest.raises(ValueError, match=argument):
        HiddenMarkovModel(**kwargs)


def test_bad_inputs_raise_value_error(hmm):
    with pytest.raises(ValueError, match="x"):
        hmm.log_prob(torch.zeros(2, 6))  # float, not token ids
    with pytest.raises(ValueError, match="shape"):
        hmm.log_prob(torch.zeros(2, 5, dtype=torch.long))
    with pytest.raises(ValueError, match="outside"):
        hmm.conditionals(torch.full((2, 6), 4))
    with pytest.raises(ValueError, match="n"):
        hmm.sample(0)
