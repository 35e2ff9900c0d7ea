r"""Marginal-likelihood cases built on the latent-variable references, with exact evidence and weight moments.

For an observation x and a proposal q(z|x), the log-weight is log w = log p(x, z) − log q(z|x), z ~ q, and
the normalized weight v = w/p(x) = p(z|x)/q(z|x). Its raw moments are Rényi integrals of the posterior
against the proposal, E_q[v^m] = ∫ p(z|x)^m q(z|x)^{1−m} dz, exact here:

- Gaussian posterior P = N(μ₁, Σ₁) and proposal Q = N(μ₂, Σ₂):
  log ∫ P^m Q^{1−m} = −½ m(1−m) Δᵀ Σ_m⁻¹ Δ − ½ log det Σ_m + ½(1−m) log det Σ₁ + ½ m log det Σ₂ with
  Σ_m = (1−m)Σ₁ + mΣ₂ and Δ = μ₁ − μ₂; infinite where Σ_m is not positive definite;
- a discrete latent: the finite sum Σ_z q(z) (p(z|x)/q(z))^m.

Then μ₂ = E[v²] − 1, μ₃ = E[v³] − 3E[v²] + 2, and the ELBO gap E_q[log w] − log p(x) = −KL(q ‖ p(z|x)).
"""
from __future__ import annotations

import math
from functools import partial

import torch
from torch.distributions import Categorical, MultivariateNormal, kl_divergence

from .bayesnet import DiscreteBayesNet
from .distributions import Categorical as CategoricalModel
from .latent import DiscreteLatent, LinearGaussian
from .marginal_cases import MarginalCase, WeightMoments, register_marginal_case
from .truth import Truth

__all__ = ["gaussian_power_integral", "pca_log_joint", "linear_gaussian_case", "discrete_case"]


def gaussian_power_integral(p: MultivariateNormal, q: MultivariateNormal, m: float) -> float:
    """log ∫ p^m q^{1−m} for two Gaussians (the module docstring); +inf where it diverges."""
    s1, s2 = p.covariance_matrix, q.covariance_matrix
    sm = (1 - m) * s1 + m * s2
    chol, info = torch.linalg.cholesky_ex(sm)
    if int(info) != 0:
        return math.inf
    delta = (p.mean - q.mean).unsqueeze(-1)
    quad = float((torch.cholesky_solve(delta, chol) * delta).sum())
    logdet = lambda s: float(torch.linalg.slogdet(s)[1])
    return -0.5 * m * (1 - m) * quad - 0.5 * logdet(sm) + 0.5 * (1 - m) * logdet(s1) + 0.5 * m * logdet(s2)


def _moments(log_raw2: float, log_raw3: float, how: str) -> WeightMoments:
    """Central moments of v from log E[v²] and log E[v³] (E[v] = 1)."""
    r2, r3 = (math.exp(v) if v < 709 else math.inf for v in (log_raw2, log_raw3))
    mu2, mu3 = r2 - 1.0, r3 - 3.0 * r2 + 2.0
    bound = lambda v: 1e-12 * max(1.0, abs(v)) if math.isfinite(v) else 0.0
    return WeightMoments(Truth(1.0, "closed form", 0.0, how), Truth(mu2, "closed form", bound(mu2), how),
                         Truth(mu3, "closed form", bound(mu3), how))


def _observation(model, seed: int) -> torch.Tensor:
    x, _ = model.sample(1, generator=torch.Generator().manual_seed(seed))
    return x[0]


def pca_log_joint(model: LinearGaussian, x: torch.Tensor):
    """log p(x, z) of pPCA at a fixed x as a function of z [..., k] in O(k²) per z instead of O(dk):
    ‖x − b − Wz‖² = ‖x − b‖² − 2 zᵀWᵀ(x − b) + zᵀWᵀWz."""
    d, k = model.W.shape
    var = float(model.sigma) ** 2
    r = x - model.b
    c0, u, gram = float(r @ r), model.W.T @ r, model.W.T @ model.W
    const = -0.5 * (d + k) * math.log(2 * math.pi) - 0.5 * d * math.log(var)

    def log_joint(z: torch.Tensor) -> torch.Tensor:
        quad = c0 - 2 * (z @ u) + ((z @ gram) * z).sum(-1)
        return const - 0.5 * quad / var - 0.5 * (z * z).sum(-1)
    return log_joint


def _gaussian_draw(q: MultivariateNormal, log_joint):
    """Sampler of log w = log p(x, z) − log q(z), z ~ q drawn as μ + Lε with a seeded ε."""
    def sampler(shape, K, generator):
        eps = torch.randn(*shape, K, q.mean.shape[-1], generator=generator, dtype=q.mean.dtype)
        z = q.mean + eps @ q.scale_tril.T
        return log_joint(z) - q.log_prob(z)
    return sampler


def linear_gaussian_case(name: str, description: str, tags: tuple[str, ...], proposal: str, scale: float = 1.0,
                         d: int = 50, k: int = 10, sigma: float = 0.5, seed: int = 0) -> MarginalCase:
    """pPCA (x ∈ R^d, z ∈ R^k) at a fixed x drawn from the model; proposal ``"prior"`` or ``"posterior"``
    (the exact posterior with its standard deviation times ``scale``)."""
    model = LinearGaussian.random(d, k, sigma, seed)
    x = _observation(model, seed + 1)
    post = model.posterior(x)
    if proposal == "prior":
        q = MultivariateNormal(torch.zeros(k, dtype=x.dtype), torch.eye(k, dtype=x.dtype))
    elif proposal == "posterior":
        q = model.posterior(x, scale=scale)
    else:
        raise ValueError(f"proposal must be 'prior' or 'posterior', got {proposal!r}")
    how = "Gaussian Rényi integrals ∫ p(z|x)^m q^{1−m}, m = 2, 3"
    log_p = float(model.log_marginal(x.unsqueeze(0))[0])
    return MarginalCase(
        name, description, _gaussian_draw(q, pca_log_joint(model, x)),
        Truth(log_p, "closed form", 0.0, "log N(x; b, WWᵀ + σ²I)"),
        _moments(gaussian_power_integral(post, q, 2.0), gaussian_power_integral(post, q, 3.0), how),
        Truth(-float(kl_divergence(q, post)), "closed form", 0.0, "−KL(q ‖ p(z|x)) between two Gaussians"), tags)


def discrete_case(name: str, description: str, tags: tuple[str, ...], log_p: float, posterior: Categorical,
                  prior: Categorical, log_joint) -> MarginalCase:
    """A discrete latent z ∈ {0..n−1} with the prior as proposal, at one x (``posterior`` = p(z|x),
    ``log_joint(z)`` = log p(x, z)); moments and the ELBO gap are finite sums."""
    posterior = Categorical(logits=posterior.logits.reshape(-1))
    log_v = posterior.logits - prior.logits  # log p(z|x)/q(z) per latent value (logits are normalized)
    raw = lambda m: float(torch.logsumexp(prior.logits + m * log_v, -1))

    proposal = CategoricalModel(prior.logits)

    def sampler(shape, K, generator):
        z = proposal.sample(math.prod(shape) * K, generator).reshape(*shape, K)
        return log_joint(z) - prior.logits[z]

    return MarginalCase(name, description, sampler, Truth(log_p, "enumeration", 0.0, "Σ_z p(x, z)"),
                        _moments(raw(2.0), raw(3.0), "finite sums over the latent values"),
                        Truth(-float(kl_divergence(prior, posterior)), "enumeration", 0.0, "−KL(prior ‖ p(z|x))"),
                        tags)


def _mixture_case(name: str, description: str, tags: tuple[str, ...]) -> MarginalCase:
    g = torch.Generator().manual_seed(7)
    model = DiscreteLatent(torch.full((8,), 1 / 8, dtype=torch.float64),
                           2.0 * torch.randn(8, 5, generator=g, dtype=torch.float64), 1.0)
    x = _observation(model, 8)
    return discrete_case(name, description, tags, float(model.log_marginal(x.unsqueeze(0))[0]),
                         model.posterior(x.unsqueeze(0)), model.prior, lambda z: model.log_joint(x, z))


def _bayesnet_case(name: str, description: str, tags: tuple[str, ...]) -> MarginalCase:
    cards = [2, 3, 2, 2, 3, 2, 2, 2]
    parents = [[], [0], [0], [1, 2], [1], [3], [3, 4], [4]]
    net = DiscreteBayesNet.random(cards, parents, seed=11, concentration=0.5, hidden=(0, 1, 3))
    x = net.sample(1, generator=torch.Generator().manual_seed(12))[0, list(net.observed)]
    hidden = net.hidden_states()
    return discrete_case(name, description, tags, float(net.log_marginal(x.unsqueeze(0))[0]),
                         net.posterior(x.unsqueeze(0)), net.prior_over_hidden(), lambda z: net.log_joint(x, hidden[z]))


_PCA = "pPCA x ∈ R^50, z ∈ R^10, σ = 0.5; proposal: "
register_marginal_case("lg-posterior-1.2", partial(linear_gaussian_case, proposal="posterior", scale=1.2),
                       description=_PCA + "the exact posterior with its standard deviation × 1.2", tags=("report",))
register_marginal_case("lg-prior", partial(linear_gaussian_case, proposal="prior"), description=_PCA + "the prior N(0, I)")
register_marginal_case("mixture-prior", _mixture_case, tags=("report",),
                       description="8 Gaussians in R^5 as a model with a categorical code; proposal: the prior")
register_marginal_case("bayesnet-prior", _bayesnet_case, tags=("report",),
                       description="a Bayesian network over 8 categorical nodes, 3 of them hidden (12 configurations); "
                                   "proposal: the prior over the hidden nodes")
