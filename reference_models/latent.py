r"""Latent-variable reference models whose marginal p(x) and posterior p(z | x) are exact.

They are the ground truth for marginal-likelihood estimators (importance sampling, ELBO, IWAE): for every z,
:math:`\log p(x, z) - \log p(z \mid x) = \log p(x)`. Each model exposes

- ``prior``             p(z): event [k] for a continuous code, a class index for a discrete one
- ``likelihood(z)``     p(x | z), batched over z
- ``log_joint(x, z)``   log p(x, z) for x [..., d] and z [..., k] (or [...] class indices), batch shapes
                        broadcast: x [B, 1, d] with z [B, K, k] gives the [B, K] log-weights' numerators
- ``marginal``          p(x) as a torch Distribution; ``log_marginal(x)``: [..., d] -> [...]
- ``posterior(x)``      p(z | x) with batch shape ``x.shape[:-1]``
- ``sample(n, generator=None)`` -> (x [n, d], z), drawn through an explicit ``torch.Generator``

Parameters are float64 by default.
"""
from __future__ import annotations

import math

import torch
from torch import Tensor
from torch.distributions import (Categorical, Distribution, Independent, LowRankMultivariateNormal,
                                 MixtureSameFamily, MultivariateNormal, Normal)

from ._validate import positive_int, real_number, real_tensor
from .distributions import _randn

__all__ = ["LatentModel", "LinearGaussian", "DiscreteLatent", "GaussianClassConditional"]


def _shape(value) -> str:
    return str(tuple(value.shape)) if isinstance(value, Tensor) else type(value).__name__


def _positive_scalar(value, name: str, dtype, device) -> Tensor:
    t = real_tensor(name, value, dtype, device)
    if t.dim() != 0 or not bool(t > 0):
        raise ValueError(f"{name} must be a positive scalar, got {value!r}")
    return t


def _probabilities(value, name: str, dtype, device) -> Tensor:
    t = real_tensor(name, value, dtype, device)
    if t.dim() != 1 or not bool((t > 0).all()):
        raise ValueError(f"{name} must be a vector of positive probabilities, got {value!r}")
    if abs(float(t.sum()) - 1) > math.sqrt(torch.finfo(dtype).eps):
        raise ValueError(f"{name} must sum to 1, got a sum of {float(t.sum())!r}")
    return t


def _matrix(value, name: str, dtype, device) -> Tensor:
    t = real_tensor(name, value, dtype, device)
    if t.dim() != 2 or 0 in t.shape:
        raise ValueError(f"{name} must be a non-empty matrix, got shape {tuple(t.shape)}")
    return t


class LatentModel:
    """A joint p(x, z) = p(z) p(x | z) with an exact marginal and posterior; see the module docstring."""

    prior: Distribution
    marginal: Distribution
    dim: int  # d, the dimension of x

    def _check_x(self, x) -> None:
        if not isinstance(x, Tensor) or not x.is_floating_point() or x.dim() < 1 or x.shape[-1] != self.dim:
            raise ValueError(f"x must be a floating tensor of shape [..., {self.dim}], got {_shape(x)}")

    def _check_z(self, z) -> torch.Size:
        """Validate z and return its batch shape."""
        raise NotImplementedError

    def _likelihood(self, z: Tensor) -> Distribution:
        raise NotImplementedError

    def likelihood(self, z: Tensor) -> Distribution:
        """p(x | z), batch shape that of z."""
        self._check_z(z)
        return self._likelihood(z)

    def log_joint(self, x: Tensor, z: Tensor) -> Tensor:
        """log p(z) + log p(x | z), over the broadcast of the batch shapes of x and z."""
        self._check_x(x)
        z_batch = self._check_z(z)
        try:
            torch.broadcast_shapes(x.shape[:-1], z_batch)
        except RuntimeError as err:
            raise ValueError(f"the batch shapes of x {tuple(x.shape[:-1])} and z {tuple(z_batch)} "
                             "do not broadcast") from err
        return self.prior.log_prob(z) + self._likelihood(z).log_prob(x)

    def log_marginal(self, x: Tensor) -> Tensor:
        """Exact log p(x): x [..., d] -> [...]."""
        self._check_x(x)
        return self.marginal.log_prob(x)

    def sample(self, n: int, generator: torch.Generator | None = None) -> tuple[Tensor, Tensor]:
        """Draw z ~ p(z), then x ~ p(x | z): returns (x [n, d], z)."""
        return self._sample(positive_int("n", n), generator)

    def _sample(self, n: int, generator: torch.Generator | None) -> tuple[Tensor, Tensor]:
        raise NotImplementedError

    def describe(self) -> str:
        raise NotImplementedError

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.describe()})"


class LinearGaussian(LatentModel):
    r"""Probabilistic PCA: z ~ N(0, I_k), x | z ~ N(Wz + b, σ²I_d), with ``W`` [d, k], ``b`` [d], σ > 0.

    Marginal x ~ N(b, WWᵀ + σ²I) (kept in low-rank form); posterior z | x ~ N(M⁻¹Wᵀ(x − b), σ²M⁻¹) with
    M = WᵀW + σ²I.
    """

    def __init__(self, W, b, sigma, *, dtype=torch.float64, device=None):
        self.W = _matrix(W, "W", dtype, device)
        self.dim, self.latent_dim = self.W.shape
        self.b = real_tensor("b", b, dtype, device)
        if self.b.shape != (self.dim,):
            raise ValueError(f"b must have shape [{self.dim}] to match W, got {tuple(self.b.shape)}")
        self.sigma = _positive_scalar(sigma, "sigma", dtype, device)
        k, var = self.latent_dim, self.sigma ** 2
        self.prior = Independent(Normal(torch.zeros(k, dtype=dtype, device=device),
                                        torch.ones(k, dtype=dtype, device=device), validate_args=False),
                                 1, validate_args=False)
        self.marginal = LowRankMultivariateNormal(self.b, self.W, var.expand(self.dim).clone(), validate_args=False)
        m_tril = torch.linalg.cholesky(self.W.T @ self.W + var * torch.eye(k, dtype=dtype, device=device))
        self._gain = torch.cholesky_solve(self.W.T, m_tril).T  # W M⁻¹, so the posterior mean is (x − b) W M⁻¹
        self._posterior_tril = torch.linalg.cholesky(var * torch.cholesky_inverse(m_tril))

    @classmethod
    def random(cls, d: int, k: int, sigma: float, seed: int = 0, *, dtype=torch.float64,
               device=None) -> LinearGaussian:
        """A fixed model from ``seed``: W_ij ~ N(0, 1/k) (so Var[(Wz)_i] ≈ 1) and b_i ~ N(0, 1), drawn in
        float64 on the CPU so that the same seed gives the same model on any dtype or device."""
        d, k = positive_int("d", d), positive_int("k", k)
        g = torch.Generator().manual_seed(seed)
        W = torch.randn(d, k, generator=g, dtype=torch.float64) / math.sqrt(k)
        b = torch.randn(d, generator=g, dtype=torch.float64)
        return cls(W, b, sigma, dtype=dtype, device=device)

    def _check_z(self, z) -> torch.Size:
        k = self.latent_dim
        if not isinstance(z, Tensor) or not z.is_floating_point() or z.dim() < 1 or z.shape[-1] != k:
            raise ValueError(f"z must be a floating tensor of shape [..., {k}], got {_shape(z)}")
        return z.shape[:-1]

    def _likelihood(self, z):
        return Independent(Normal(z @ self.W.T + self.b, self.sigma, validate_args=False), 1, validate_args=False)

    def posterior(self, x: Tensor, scale: float = 1.0) -> MultivariateNormal:
        """Exact p(z | x), batched over x. Only this model takes ``scale``: it multiplies the posterior's
        standard deviation (its covariance by scale²), e.g. 1.2 for an importance proposal widened by 20%."""
        self._check_x(x)
        if not real_number("scale", scale) > 0:
            raise ValueError(f"scale must be a positive finite number, got {scale!r}")
        return MultivariateNormal((x - self.b) @ self._gain, scale_tril=scale * self._posterior_tril,
                                  validate_args=False)

    def _sample(self, n, generator):
        z = _randn((n, self.latent_dim), generator, self.W)
        x = self.b + z @ self.W.T + self.sigma * _randn((n, self.dim), generator, self.W)
        return x, z

    def describe(self):
        return f"pPCA, x ∈ R^{self.dim}, z ∈ R^{self.latent_dim}, σ={self.sigma.item():g}"


class DiscreteLatent(LatentModel):
    r"""A Gaussian mixture read as a model with a categorical code: z ~ Cat(π), x | z ~ N(μ_z, diag s_z²).

    ``weights`` π [K] (positive, summing to 1), ``locs`` μ [K, d], and ``scale`` s: a scalar (shared by all),
    [K] (one isotropic scale per component) or [K, d] (a diagonal per component); stored as [K, d].
    Marginal p(x) = Σ_z π_z N(x; μ_z, diag s_z²); posterior Cat(logits = log π_z + log N(x; μ_z, diag s_z²) − log p(x)).
    """

    def __init__(self, weights, locs, scale, *, dtype=torch.float64, device=None):
        weights = _probabilities(weights, "weights", dtype, device)
        self.locs = _matrix(locs, "locs", dtype, device)
        K, self.dim = self.locs.shape
        if weights.shape[0] != K:
            raise ValueError(f"locs must have one row per weight ({weights.shape[0]}), got {tuple(self.locs.shape)}")
        s = real_tensor("scale", scale, dtype, device)
        if s.shape not in ((), (K,), (K, self.dim)) or not bool((s > 0).all()):
            raise ValueError(f"scale must be positive with shape (), ({K},) or ({K}, {self.dim}), got {_shape(s)}")
        self.scale = (s[:, None] if s.dim() == 1 else s).expand(K, self.dim).clone()
        self.prior = Categorical(probs=weights, validate_args=False)
        self._components = Independent(Normal(self.locs, self.scale, validate_args=False), 1, validate_args=False)
        self.marginal = MixtureSameFamily(self.prior, self._components, validate_args=False)

    @property
    def num_classes(self) -> int:
        return self.locs.shape[0]

    def _check_z(self, z) -> torch.Size:
        if (not isinstance(z, Tensor) or z.is_floating_point() or z.is_complex() or z.dtype == torch.bool
                or (z.numel() and not bool(((z >= 0) & (z < self.num_classes)).all()))):
            raise ValueError(f"z must be an integer tensor of class indices in [0, {self.num_classes}), "
                             f"got {_shape(z)} {getattr(z, 'dtype', '')}".rstrip())
        return z.shape

    def _likelihood(self, z):
        return Independent(Normal(self.locs[z], self.scale[z], validate_args=False), 1, validate_args=False)

    def posterior(self, x: Tensor) -> Categorical:
        """Exact p(z | x) by Bayes' rule over the K classes, batched over x."""
        self._check_x(x)
        return Categorical(logits=self.prior.logits + self._components.log_prob(x.unsqueeze(-2)),
                           validate_args=False)

    def _sample(self, n, generator):
        z = torch.multinomial(self.prior.probs, n, replacement=True, generator=generator)
        return self.locs[z] + self.scale[z] * _randn((n, self.dim), generator, self.locs), z

    def describe(self):
        return f"{self.num_classes} Gaussians in R^{self.dim} with a categorical code"


class GaussianClassConditional(DiscreteLatent):
    r"""Gaussian discriminant analysis with a shared isotropic covariance: y ~ Cat(π), x | y ~ N(μ_y, σ²I).

    The class y is the latent. Its posterior is a linear softmax, p(y | x) = softmax_y(xᵀw_y + b_y) with
    w_y = μ_y/σ² and b_y = −μ_yᵀμ_y/(2σ²) + log π_y (−‖x‖²/(2σ²) is common to all classes and cancels).
    ``means`` [C, d], σ > 0 a scalar, ``class_probs`` [C] (uniform when omitted).
    """

    def __init__(self, means, sigma, class_probs=None, *, dtype=torch.float64, device=None):
        means = _matrix(means, "means", dtype, device)
        self.sigma = _positive_scalar(sigma, "sigma", dtype, device)
        C = means.shape[0]
        if class_probs is None:
            probs = torch.full((C,), 1 / C, dtype=dtype, device=device)
        else:
            probs = _probabilities(class_probs, "class_probs", dtype, device)
            if probs.shape[0] != C:
                raise ValueError(f"class_probs must have one entry per row of means ({C}), got {probs.shape[0]}")
        super().__init__(probs, means, self.sigma, dtype=dtype, device=device)

    def softmax_weights(self) -> tuple[Tensor, Tensor]:
        """(w [d, C], b [C]) such that p(y | x) = softmax(x @ w + b)."""
        var = self.sigma ** 2
        return self.locs.T / var, -(self.locs ** 2).sum(-1) / (2 * var) + self.prior.logits

    def posterior(self, x: Tensor) -> Categorical:
        """Exact p(y | x) = Cat(logits = x @ w + b) from :meth:`softmax_weights`, batched over x."""
        self._check_x(x)
        w, b = self.softmax_weights()
        return Categorical(logits=x @ w + b, validate_args=False)

    def describe(self):
        return f"GDA, {self.num_classes} classes in R^{self.dim}, σ={self.sigma.item():g}"
