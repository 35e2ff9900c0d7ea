"""Tests of reference_models.bayesnet: exact joint, marginals and posteriors of a discrete Bayesian network,
cross-checked against pgmpy and brute enumeration; ancestral sampling; free-parameter counts.

The one statistical test (sampling frequencies) uses a fixed seed and a chi-square test at α = 1e-3: a
correct sampler fails it with probability 1e-3 under a fresh seed.
"""
from __future__ import annotations

import math
import warnings

import pytest
import torch
from scipy import stats

from reference_models.bayesnet import (DiscreteBayesNet, full_joint_parameters, independent_parameters,
                                       markov_chain_parameters, parameter_table)

ALPHA = 1e-3  # false-alarm rate of the chi-square test

# Nodes deliberately not in topological order: 1 → 0 → 2 → 3 → 4, plus 1 → 2 and 0 → 3.
CARDS = [2, 3, 2, 4, 3]
PARENTS = [[1], [], [0, 1], [2, 0], [3]]


@pytest.fixture(scope="module")
def net():
    return DiscreteBayesNet.random(CARDS, PARENTS, seed=7, hidden=(1, 3))


@pytest.fixture(scope="module")
def pgmpy_inference():
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # pgmpy 1.1 warns about its own modules on import
        pytest.importorskip("pgmpy.models")
        return pytest.importorskip("pgmpy.inference")


def _brute_count(model: DiscreteBayesNet) -> int:
    """Free CPT entries: numel minus one normalization constraint per row."""
    return sum(t.numel() - t.numel() // t.shape[-1] for t in model.cpts)


def _query(pgmpy_inference, model, nodes):
    """pgmpy's VariableElimination marginal over nodes, axes permuted into the given order."""
    factor = pgmpy_inference.VariableElimination(model.to_pgmpy()).query(
        [model.names[i] for i in nodes], joint=True, show_progress=False)
    axes = [factor.variables.index(model.names[i]) for i in nodes]
    return torch.from_numpy(factor.values).permute(axes)


# --- exact joint ----------------------------------------------------------------------------------

def test_hand_built_joint():
    # p(a) = [.3, .7], p(b | a) rows [.9, .1] and [.2, .8]; node order b, a (b is a's child)
    model = DiscreteBayesNet([2, 2], [[1], []], [[[.9, .1], [.2, .8]], [.3, .7]])
    expected = torch.tensor([[.3 * .9, .7 * .2], [.3 * .1, .7 * .8]], dtype=torch.float64)  # [b, a]
    torch.testing.assert_close(model.joint_table(), expected, rtol=0, atol=1e-15)
    assert model.order == (1, 0)


def test_enumeration_sums_to_one(net):
    states = net.enumerate_states()
    assert states.shape == (math.prod(CARDS), len(CARDS)) and states.dtype == torch.long
    assert torch.unique(states, dim=0).shape[0] == states.shape[0]
    assert abs(float(net.log_prob(states).exp().sum()) - 1) < 1e-12
    torch.testing.assert_close(net.joint_table().reshape(-1), net.log_prob(states).exp())


def test_joint_matches_pgmpy(net, pgmpy_inference):
    truth = _query(pgmpy_inference, net, range(len(CARDS)))
    assert float((net.joint_table() - truth).abs().max()) < 1e-10


def test_marginal_matches_pgmpy_and_enumeration(net, pgmpy_inference):
    observed = [3, 0, 4]
    got = net.marginal(observed)
    assert got.shape == (4, 2, 3)
    assert float((got - _query(pgmpy_inference, net, observed)).abs().max()) < 1e-10
    brute = net.joint_table().sum(dim=(1, 2)).permute(1, 0, 2)  # axes (0, 3, 4) -> (3, 0, 4)
    assert float((got - brute).abs().max()) < 1e-14


def test_log_marginal_is_marginal_lookup(net):
    observed = [4, 2]
    x = net.enumerate_states()[:, observed]
    table = net.marginal(observed)
    torch.testing.assert_close(net.log_marginal(x, observed=observed), table[x[:, 0], x[:, 1]].log())
    full = net.enumerate_states()
    torch.testing.assert_close(net.log_marginal(full, observed=range(5)), net.log_prob(full))


def test_long_chain_marginal_matches_forward_recursion():
    model = DiscreteBayesNet.markov_chain(40, 3, 1, seed=3)
    p = model.cpts[0]
    for t in model.cpts[1:]:
        p = p @ t  # p(x_{i+1}) = Σ_{x_i} p(x_i) p(x_{i+1} | x_i)
    torch.testing.assert_close(model.marginal([39]), p, rtol=0, atol=1e-14)
    x = model.sample(64, torch.Generator().manual_seed(0))
    torch.testing.assert_close(model.log_marginal(x), model.log_prob(x))


# --- sampling -------------------------------------------------------------------------------------

def test_sampling_frequencies_chi_square(net):
    n = 200_000
    x = net.sample(n, torch.Generator().manual_seed(2024))
    assert x.shape == (n, len(CARDS)) and x.dtype == torch.long
    index = (x * torch.tensor([math.prod(CARDS[j + 1:]) for j in range(len(CARDS))])).sum(-1)
    observed = torch.bincount(index, minlength=math.prod(CARDS)).double()
    expected = n * net.joint_table().reshape(-1)
    small = expected < 5  # pool sparse cells so the chi-square approximation holds
    obs = torch.cat([observed[~small], observed[small].sum(0, keepdim=True)])
    exp = torch.cat([expected[~small], expected[small].sum(0, keepdim=True)])
    assert stats.chisquare(obs.numpy(), exp.numpy() * obs.sum().item() / exp.sum().item()).pvalue > ALPHA
    torch.testing.assert_close(net.sample(50, torch.Generator().manual_seed(5)),
                               net.sample(50, torch.Generator().manual_seed(5)))


def test_sampling_never_draws_zero_probability_entries():
    cpts = [[0.0, 0.5, 0.5], [[1.0, 0.0], [0.0, 1.0], [0.5, 0.5]]]
    model = DiscreteBayesNet([3, 2], [[], [0]], cpts)
    x = model.sample(20_000, torch.Generator().manual_seed(1))
    assert bool(torch.isfinite(model.log_prob(x)).all())


# --- latent-variable view -------------------------------------------------------------------------

def test_latent_identity(net):
    assert net.observed == (0, 2, 4) and net.hidden == (1, 3)
    x = net.sample(100, torch.Generator().manual_seed(3))[:, list(net.observed)]
    z = net.hidden_states()
    assert z.shape == (12, 2)
    log_joint = net.log_joint(x[:, None, :], z.expand(100, -1, -1))  # [B, 1, |obs|] x [B, K, |hid|]
    assert log_joint.shape == (100, 12)
    post = net.posterior(x)
    assert post.batch_shape == (100,)
    gap = log_joint - post.logits - net.log_marginal(x)[:, None]
    assert float(gap.abs().max()) < 1e-12


def test_prior_over_hidden_is_hidden_marginal(net):
    z = net.hidden_states()
    prior = net.prior_over_hidden().probs
    torch.testing.assert_close(prior, net.joint_table().sum(dim=(0, 2, 4))[z[:, 0], z[:, 1]])
    # Σ_x p(x) p(z | x) = p(z), over all observed states
    xs = net.enumerate_states()[:, list(net.observed)].unique(dim=0)
    mix = (net.log_marginal(xs).exp()[:, None] * net.posterior(xs).probs).sum(0)
    torch.testing.assert_close(mix, prior, rtol=0, atol=1e-14)


def test_posterior_of_impossible_observation_raises():
    model = DiscreteBayesNet([2, 2], [[], [0]], [[.5, .5], [[1., 0.], [1., 0.]]], hidden=(0,))
    with pytest.raises(ValueError, match="x_obs"):
        model.posterior(torch.tensor([[1]]))


# --- parameter counts -----------------------------------------------------------------------------

@pytest.mark.parametrize("cards", [[2] * 6, [2, 3, 4], [5, 2, 3, 2]])
def test_full_and_independent_counts_match_cpts(cards):
    full = DiscreteBayesNet.random(cards, [list(range(i)) for i in range(len(cards))], seed=0)
    empty = DiscreteBayesNet.random(cards, [[] for _ in cards], seed=0)
    assert _brute_count(full) == full.num_parameters() == full_joint_parameters(cards)
    assert _brute_count(empty) == empty.num_parameters() == independent_parameters(cards)


@pytest.mark.parametrize("length, card, order", [(6, 2, 0), (6, 2, 1), (7, 3, 2), (5, 2, 4), (8, 4, 3)])
def test_markov_chain_count_matches_cpts(length, card, order):
    chain = DiscreteBayesNet.markov_chain(length, card, order, seed=1)
    assert _brute_count(chain) == chain.num_parameters() == markov_chain_parameters(length, card, order)
    assert chain.parents[-1] == tuple(range(length - 1 - order, length - 1))


def test_network_count_and_parameter_table(net):
    assert _brute_count(net) == net.num_parameters() == 1 * 3 + 2 + 1 * 2 * 3 + 3 * 2 * 2 + 2 * 4
    assert markov_chain_parameters(5, 2, 0) == independent_parameters([2] * 5)
    assert markov_chain_parameters(5, 3, 4) == full_joint_parameters([3] * 5)
    table = parameter_table()
    assert list(table.columns) == ["example", "formula", "count"]
    assert table["count"].tolist() == [2 ** 10 - 1, 10, 2 ** 2 - 1 + 8 * 1 * 2 ** 2]


# --- errors ---------------------------------------------------------------------------------------

def _two_nodes(**overrides):
    args = dict(cards=[2, 3], parents=[[], [0]], cpts=[[.4, .6], torch.full((2, 3), 1 / 3, dtype=torch.float64)])
    args.update(overrides)
    return DiscreteBayesNet(**args)


@pytest.mark.parametrize("overrides, name", [
    (dict(parents=[[1], [0]]), "acyclic"),
    (dict(parents=[[], [1]]), "parents"),
    (dict(parents=[[], [2]]), "parents"),
    (dict(parents=[[]]), "parents"),
    (dict(cards=[1, 3]), "cards"),
    (dict(cpts=[[.4, .6], torch.full((3, 2), .5)]), "cpts\\[1\\]"),
    (dict(cpts=[[.4, .7], torch.full((2, 3), 1 / 3, dtype=torch.float64)]), "cpts\\[0\\]"),
    (dict(cpts=[[1.2, -.2], torch.full((2, 3), 1 / 3, dtype=torch.float64)]), "cpts\\[0\\]"),
    (dict(cpts=[[.4, .6], torch.full((2, 3), 1 / 3)]), "float64"),  # float32 rounding exceeds 1e-9
    (dict(names=["a", "a"]), "names"),
    (dict(hidden=[0, 1]), "hidden"),
    (dict(hidden=[5]), "hidden"),
])
def test_bad_construction_raises(overrides, name):
    with pytest.raises(ValueError, match=name):
        _two_nodes(**overrides)


def test_bad_use_raises():
    model = _two_nodes()
    for bad in (torch.tensor([[0.0, 1.0]]), torch.tensor([[0, 3]]), torch.tensor([0, 1])):
        with pytest.raises(ValueError, match="x"):
            model.log_prob(bad)
    with pytest.raises(ValueError, match="observed"):
        model.marginal([0, 0])
    with pytest.raises(ValueError, match="n must"):
        model.sample(0)
    with pytest.raises(ValueError, match="enumeration limit"):
        DiscreteBayesNet.random([2] * 23, [[]] * 23, seed=0).enumerate_states()
    with pytest.raises(ValueError, match="order"):
        DiscreteBayesNet.markov_chain(3, 2, 3, seed=0)
    with pytest.raises(ValueError, match="concentration"):
        DiscreteBayesNet.random([2], [[]], seed=0, concentration=0.0)
