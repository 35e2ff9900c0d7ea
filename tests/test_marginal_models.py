"""Marginal likelihoods on the model-based cases (pPCA, a mixture with a categorical code, a Bayesian network
with hidden nodes): the exact evidence, weight moments and ELBO gap, the jackknife, and the diagnostics.

False alarms: every z-test below uses |z| ≤ Z = 4.0 (two-sided 6.3e-5 each); the file runs 11 of them, so
a correct implementation fails it with probability ≤ 7e-4. All seeds are fixed, so outcomes reproduce.
"""
import math

import pytest
import torch

from estimators.marginal import (effective_sample_size, jackknife_log_mean_exp, log_mean_exp, marginal_ratio,
                                 weight_khat)
from reference_models.latent_cases import gaussian_power_integral
from reference_models import get_case
from torch.distributions import MultivariateNormal

Z = 4.0
FINITE = ["lg-posterior-1.2", "mixture-prior", "bayesnet-prior"]


def _draw(name, shape, K, seed):
    case = get_case(name)
    return case, case.draw_log_w(shape, K, torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("name", FINITE)
def test_importance_estimate_is_unbiased_for_the_evidence(name):
    """E[Â / p(x)] = 1 with Â = mean of K weights; SE from the exact Var(v)/K."""
    case, log_w = _draw(name, (2 ** 16,), 4, 0)
    ratio = marginal_ratio(log_w, case.log_marginal.value)
    se = math.sqrt(case.weight_moments.mu2.value / 4 / ratio.numel())
    assert abs(float(ratio.mean()) - 1) <= Z * se


@pytest.mark.parametrize("name", FINITE)
def test_elbo_gap_is_the_kl_from_proposal_to_posterior(name):
    """E_q[log w] − log p(x) = −KL(q ‖ p(z|x)), exact on every model case (z-test of the sample mean)."""
    case, log_w = _draw(name, (2 ** 17,), 1, 1)
    gap = log_w - case.log_marginal.value
    se = float(gap.std()) / math.sqrt(gap.numel())
    assert abs(float(gap.mean()) - case.elbo_gap.value) <= Z * se + 1e-9


def test_fast_pca_log_joint_is_the_model_log_joint():
    from reference_models.latent import LinearGaussian
    from reference_models.latent_cases import pca_log_joint

    model = LinearGaussian.random(50, 10, 0.5, 0)
    x = model.sample(1, torch.Generator().manual_seed(1))[0][0]
    z = 2 * torch.randn(100, 10, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    assert torch.allclose(pca_log_joint(model, x)(z), model.log_joint(x, z), rtol=1e-12, atol=1e-10)


def test_weight_moments_match_a_direct_gaussian_integral():
    """The closed-form Rényi integral: m = 1 gives log 1 = 0 exactly, and m = 2, ∫ p²/q = E_p[p/q], agrees
    with a Monte Carlo average of p/q under p (z-test)."""
    p = MultivariateNormal(torch.tensor([0.3, -0.2], dtype=torch.float64),
                           torch.tensor([[1.0, 0.3], [0.3, 0.8]], dtype=torch.float64))
    q = MultivariateNormal(torch.zeros(2, dtype=torch.float64), 1.5 * torch.eye(2, dtype=torch.float64))
    assert abs(gaussian_power_integral(p, q, 1.0)) < 1e-12
    g = torch.Generator().manual_seed(3)
    zs = torch.randn(2 ** 20, 2, generator=g, dtype=torch.float64) @ p.scale_tril.T + p.mean
    ratio = torch.exp(p.log_prob(zs) - q.log_prob(zs))  # E_p[p/q] = ∫ p²/q
    se = float(ratio.std()) / math.sqrt(ratio.numel())
    assert abs(float(ratio.mean()) - math.exp(gaussian_power_integral(p, q, 2.0))) <= Z * se


def test_jackknife_cuts_the_bias_five_fold_at_K_64():
    """pPCA with the posterior widened by 20% (k̂ < 0.5). The bias of log Â and of the jackknife are measured
    with the control variate v̄ − 1 (exact mean 0), which removes the first-order noise; the jackknife's
    |bias| + Z·SE must be below (|bias of log Â| − Z·SE) / 5."""
    K = 64
    case, log_w = _draw("lg-posterior-1.2", (2 ** 14,), K, 2)
    log_p = case.log_marginal.value
    cv = marginal_ratio(log_w, log_p) - 1
    biases = {}
    for name, est in (("plain", log_mean_exp(log_w)), ("jackknife", jackknife_log_mean_exp(log_w, order=1))):
        resid = est - log_p - cv
        biases[name] = (float(resid.mean()), float(resid.std()) / math.sqrt(resid.numel()))
    (plain, plain_se), (jack, jack_se) = biases["plain"], biases["jackknife"]
    mu2 = case.weight_moments.mu2.value
    assert abs(plain - (-mu2 / (2 * K))) <= 0.1 * mu2 / (2 * K)  # the delta method, within 10%
    assert abs(jack) + Z * jack_se <= (abs(plain) - Z * plain_se) / 5, biases
    assert weight_khat(log_w.reshape(-1)[: 10 ** 5]) < 0.5


def test_prior_proposal_in_50_dimensions_is_flagged():
    """With the prior as proposal in 50 dimensions the weights are degenerate: exact Var(v) ≈ 1.3e6, the
    Pareto k̂ of 10⁴ weights is above 0.7 and the effective sample size a handful; the widened posterior's
    weights are fine (k̂ < 0.5, ESS > half of K)."""
    bad, log_w = _draw("lg-prior", (4,), 10 ** 4, 3)
    assert bad.weight_moments.mu2.value > 1e5
    assert all(weight_khat(row) > 0.7 for row in log_w)
    assert float(effective_sample_size(log_w).max()) < 50
    good, log_w = _draw("lg-posterior-1.2", (4,), 10 ** 4, 4)
    assert all(weight_khat(row) < 0.5 for row in log_w)
    assert float(effective_sample_size(log_w).min()) > 0.5 * 10 ** 4
