"""Tests of the latent-variable reference models: exact marginals, exact posteriors, sampling, bad input.

Deterministic: every random draw uses a fixed seed. Each Monte Carlo test states its false-alarm rate.
"""
from __future__ import annotations

import math

import pytest
import torch
from scipy import integrate
from torch.distributions import MultivariateNormal

from reference_models.latent import DiscreteLatent, GaussianClassConditional, LinearGaussian

Z = 5.0  # two-sided |z| > 5 under a normal law: probability 5.7e-7


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


MODELS = {
    "ppca-50x10": lambda: LinearGaussian.random(50, 10, 0.5, seed=0),
    "ppca-3x2": lambda: LinearGaussian.random(3, 2, 1.3, seed=1),
    "mixture-diag": lambda: DiscreteLatent([0.2, 0.5, 0.3], [[-2.0, 0.0], [0.5, 1.0], [3.0, -1.0]],
                                           [[0.5, 1.0], [1.0, 0.7], [0.3, 2.0]]),
    "mixture-iso": lambda: DiscreteLatent([0.6, 0.4], [[0.0, 0.0, 1.0], [1.0, -1.0, 0.0]], [0.8, 1.5]),
    "gda": lambda: GaussianClassConditional([[1.0, 0.0, 2.0, -1.0], [0.0, 1.0, -1.0, 0.5],
                                             [-1.0, -1.0, 0.0, 0.0], [2.0, 2.0, 1.0, 1.0]], 0.9,
                                            [0.1, 0.2, 0.3, 0.4]),
}


@pytest.fixture(params=list(MODELS), ids=list(MODELS))
def model(request):
    return MODELS[request.param]()


def _latents(model, batch: int, seed: int) -> torch.Tensor:
    """Several z per x, [S, batch, ...]: wide random draws for a continuous code, every class for a discrete one."""
    if isinstance(model, DiscreteLatent):
        return torch.arange(model.num_classes)[:, None].expand(model.num_classes, batch)
    return 2.0 * torch.randn(7, batch, model.latent_dim, generator=_gen(seed), dtype=torch.float64)


def test_posterior_identity(model):
    """log p(x, z) − log p(z | x) = log p(x) for every z."""
    x, _ = model.sample(16, _gen(1))
    z = _latents(model, 16, seed=2)
    joint = model.log_joint(x, z)
    lhs = joint - model.posterior(x).log_prob(z)
    rhs = model.log_marginal(x).expand_as(lhs)
    torch.testing.assert_close(lhs, rhs, rtol=0, atol=1e-9 * (1 + float(joint.abs().max())))


def test_broadcast_importance_weights(model):
    """x [B, 1, d] with z [B, K, ...] gives [B, K], equal to the flattened pairs."""
    B, K = 5, 4
    x, _ = model.sample(B, _gen(3))
    _, z = model.sample(B * K, _gen(4))
    z = z.reshape(B, K, *z.shape[1:])
    lw = model.log_joint(x[:, None, :], z)
    assert lw.shape == (B, K)
    flat = model.log_joint(x[:, None, :].expand(B, K, model.dim).reshape(B * K, model.dim),
                           z.reshape(B * K, *z.shape[2:]))
    torch.testing.assert_close(lw, flat.reshape(B, K), rtol=1e-13, atol=0)
    with pytest.raises(ValueError, match="do not broadcast"):
        model.log_joint(x[:3], z)


def test_sample_shapes(model):
    x, z = model.sample(11, _gen(5))
    assert x.shape == (11, model.dim) and x.dtype == torch.float64
    if isinstance(model, DiscreteLatent):
        assert z.shape == (11,) and z.dtype == torch.int64
        assert bool(((z >= 0) & (z < model.num_classes)).all())
    else:
        assert z.shape == (11, model.latent_dim) and z.dtype == torch.float64
    assert model.likelihood(z).batch_shape == (11,)
    assert model.posterior(x).batch_shape == (11,)
    x2, z2 = model.sample(11, _gen(5))
    assert torch.equal(x, x2) and torch.equal(z, z2)
    assert model.describe() in repr(model)


# --- LinearGaussian -------------------------------------------------------------------------------------

def test_linear_gaussian_marginal_matches_dense_mvn():
    m = LinearGaussian.random(50, 10, 0.5, seed=0)
    x, _ = m.sample(32, _gen(6))
    dense = MultivariateNormal(m.b, covariance_matrix=m.W @ m.W.T + 0.25 * torch.eye(50, dtype=torch.float64))
    torch.testing.assert_close(m.log_marginal(x), dense.log_prob(x), rtol=1e-12, atol=1e-10)


def test_linear_gaussian_posterior_matches_gaussian_conditioning():
    """Mean Wᵀ(WWᵀ+σ²I)⁻¹(x − b), covariance I − Wᵀ(WWᵀ+σ²I)⁻¹W: the d-dimensional form of the same posterior."""
    m = LinearGaussian.random(6, 3, 0.7, seed=2)
    x, _ = m.sample(4, _gen(7))
    C = m.W @ m.W.T + 0.49 * torch.eye(6, dtype=torch.float64)
    gain = torch.linalg.solve(C, m.W).T
    post = m.posterior(x)
    torch.testing.assert_close(post.mean, (x - m.b) @ gain.T, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(post.covariance_matrix[0], torch.eye(3, dtype=torch.float64) - gain @ m.W,
                               rtol=1e-12, atol=1e-12)


def test_linear_gaussian_scaled_posterior():
    m = LinearGaussian.random(6, 3, 0.7, seed=2)
    x, _ = m.sample(4, _gen(8))
    exact, wide = m.posterior(x), m.posterior(x, scale=1.2)
    torch.testing.assert_close(wide.mean, exact.mean, rtol=0, atol=0)
    torch.testing.assert_close(wide.covariance_matrix, 1.44 * exact.covariance_matrix, rtol=1e-13, atol=0)
    for bad in (0.0, -1.0, math.inf, math.nan, True, "1"):
        with pytest.raises(ValueError, match="scale"):
            m.posterior(x, scale=bad)


def test_linear_gaussian_sample_mean():
    """Each coordinate's sample mean within 5 standard errors of b. Per coordinate P(|z| > 5) = 5.7e-7, so by
    Bonferroni over d = 50 coordinates the false-alarm rate is at most 2.9e-5 (the seed is fixed anyway)."""
    m = LinearGaussian.random(50, 10, 0.5, seed=0)
    n = 200_000
    x, _ = m.sample(n, _gen(9))
    se = torch.sqrt(((m.W ** 2).sum(1) + 0.25) / n)
    assert bool(((x.mean(0) - m.b).abs() < Z * se).all())


def test_linear_gaussian_random_is_fixed_by_seed():
    a, b = LinearGaussian.random(5, 2, 0.3, seed=4), LinearGaussian.random(5, 2, 0.3, seed=4)
    assert torch.equal(a.W, b.W) and torch.equal(a.b, b.b)
    assert not torch.equal(a.W, LinearGaussian.random(5, 2, 0.3, seed=5).W)


# --- DiscreteLatent and GDA ------------------------------------------------------------------------------

@pytest.mark.parametrize("name", ["mixture-diag", "mixture-iso", "gda"])
def test_discrete_marginal_is_logsumexp_over_latents(name):
    m = MODELS[name]()
    x, _ = m.sample(20, _gen(10))
    z = torch.arange(m.num_classes)[:, None]
    torch.testing.assert_close(m.log_marginal(x), m.log_joint(x, z).logsumexp(0), rtol=1e-13, atol=1e-13)


def test_discrete_marginal_integrates_to_one():
    m = DiscreteLatent([0.2, 0.5, 0.3], [[-2.0], [0.5], [3.0]], [0.5, 1.0, 0.3])

    def density(t: float) -> float:
        return math.exp(float(m.log_marginal(torch.tensor([t], dtype=torch.float64))))

    cuts = [-math.inf, -2.0, 0.5, 3.0, math.inf]
    pieces = [integrate.quad(density, a, b, epsabs=1e-13, epsrel=1e-13) for a, b in zip(cuts, cuts[1:])]
    total, err = sum(p[0] for p in pieces), sum(p[1] for p in pieces)
    assert abs(total - 1) < 1e-10 + err


def test_discrete_class_frequencies():
    """Each class count within 5 binomial standard errors; Bonferroni over 3 classes: false alarms ≤ 1.7e-6."""
    m = MODELS["mixture-diag"]()
    n = 100_000
    _, z = m.sample(n, _gen(11))
    p = m.prior.probs
    counts = torch.bincount(z, minlength=3).double()
    assert bool(((counts - n * p).abs() < Z * torch.sqrt(n * p * (1 - p))).all())


def test_gda_softmax_matches_bayes_rule():
    m = MODELS["gda"]()
    x = 1.5 * torch.randn(64, 4, generator=_gen(12), dtype=torch.float64)
    w, b = m.softmax_weights()
    assert w.shape == (4, 4) and b.shape == (4,)
    softmax = torch.distributions.Categorical(logits=x @ w + b).probs
    bayes = torch.exp(m.log_joint(x, torch.arange(4)[:, None]) - m.log_marginal(x)).T
    torch.testing.assert_close(softmax, bayes, rtol=0, atol=1e-10)
    torch.testing.assert_close(m.posterior(x).probs, bayes, rtol=0, atol=1e-10)


def test_gda_uniform_default():
    m = GaussianClassConditional([[0.0, 1.0], [1.0, 0.0]], 1.0)
    torch.testing.assert_close(m.prior.probs, torch.full((2,), 0.5, dtype=torch.float64))


# --- bad input ---------------------------------------------------------------------------------------------

LG = dict(W=[[1.0, 0.0], [0.0, 1.0], [1.0, 1.0]], b=[0.0, 0.0, 0.0], sigma=0.5)
MIX = dict(weights=[0.5, 0.5], locs=[[0.0], [1.0]], scale=1.0)
GDA = dict(means=[[0.0, 1.0], [1.0, 0.0]], sigma=1.0, class_probs=[0.3, 0.7])


@pytest.mark.parametrize("cls, kwargs, arg", [
    (LinearGaussian, {**LG, "W": [1.0, 2.0, 3.0]}, "W"),
    (LinearGaussian, {**LG, "W": [[1.0, math.nan]] * 3}, "W"),
    (LinearGaussian, {**LG, "b": [0.0, 0.0]}, "b"),
    (LinearGaussian, {**LG, "sigma": -0.5}, "sigma"),
    (LinearGaussian, {**LG, "sigma": 0.0}, "sigma"),
    (LinearGaussian, {**LG, "sigma": [0.5, 0.5]}, "sigma"),
    (DiscreteLatent, {**MIX, "weights": [0.5, 0.6]}, "weights"),
    (DiscreteLatent, {**MIX, "weights": [1.5, -0.5]}, "weights"),
    (DiscreteLatent, {**MIX, "locs": [[0.0], [1.0], [2.0]]}, "locs"),
    (DiscreteLatent, {**MIX, "locs": [0.0, 1.0]}, "locs"),
    (DiscreteLatent, {**MIX, "scale": -1.0}, "scale"),
    (DiscreteLatent, {**MIX, "scale": [1.0, 1.0, 1.0]}, "scale"),
    (GaussianClassConditional, {**GDA, "sigma": [1.0, 1.0]}, "sigma"),
    (GaussianClassConditional, {**GDA, "class_probs": [0.3, 0.3]}, "class_probs"),
    (GaussianClassConditional, {**GDA, "class_probs": [0.2, 0.3, 0.5]}, "class_probs"),
    (GaussianClassConditional, {**GDA, "means": [0.0, 1.0]}, "means"),
])
def test_bad_parameters_raise(cls, kwargs, arg):
    with pytest.raises(ValueError, match=rf"\b{arg}\b"):
        cls(**kwargs)


def test_bad_arguments_raise():
    lg, mix = LinearGaussian(**LG), DiscreteLatent(**MIX)
    x3, x1 = torch.zeros(4, 3, dtype=torch.float64), torch.zeros(4, 1, dtype=torch.float64)
    for call, arg in [
        (lambda: lg.log_marginal(torch.zeros(4, 2, dtype=torch.float64)), "x"),
        (lambda: lg.log_marginal(torch.zeros(4, 3, dtype=torch.long)), "x"),
        (lambda: lg.posterior([0.0, 0.0, 0.0]), "x"),
        (lambda: lg.log_joint(x3, torch.zeros(4, 3, dtype=torch.float64)), "z"),
        (lambda: lg.likelihood(torch.zeros(4, 2, dtype=torch.long)), "z"),
        (lambda: mix.log_joint(x1, torch.zeros(4)), "z"),
        (lambda: mix.log_joint(x1, torch.tensor([0, 1, 2, 0])), "z"),
        (lambda: mix.log_joint(x1, torch.tensor([0, -1, 0, 0])), "z"),
        (lambda: mix.sample(0), "n"),
        (lambda: lg.sample(2.0), "n"),
        (lambda: LinearGaussian.random(0, 2, 0.5), "d"),
        (lambda: LinearGaussian.random(3, 1.5, 0.5), "k"),
    ]:
        with pytest.raises(ValueError, match=rf"\b{arg}\b"):
            call()
