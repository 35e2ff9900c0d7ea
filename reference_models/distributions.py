"""Reference models with exact, normalized log-densities and seedable sampling.

Each model wraps the torch.distributions family that has it (``self.dist``) for ``log_prob`` and adds
``sample(n, generator=None)``, which draws through an explicit ``torch.Generator`` so that a study is
reproducible from its seed on any executor. Parameters are kept in float64 by default: these models
are the ground truth.
"""
from __future__ import annotations

import math

import torch
from torch import Tensor
from torch.distributions import Categorical as _Categorical
from torch.distributions import Independent, MixtureSameFamily, MultivariateNormal, Normal
from torch.distributions import Uniform as _Uniform

__all__ = ["ReferenceModel", "Gaussian", "GaussianMixture", "Uniform", "Categorical", "zipf_logits", "top_k_logits"]


class ReferenceModel:
    """A distribution with an exact normalized ``log_prob`` and reproducible ``sample``."""

    dist: torch.distributions.Distribution

    @property
    def event_shape(self) -> torch.Size:
        return self.dist.event_shape

    @property
    def dtype(self) -> torch.dtype:
        raise NotImplementedError

    @property
    def device(self) -> torch.device:
        raise NotImplementedError

    def sample(self, n: int, generator: torch.Generator | None = None) -> Tensor:
        """Draw ``n`` samples, shape ``[n, *event_shape]``."""
        if isinstance(n, bool) or not isinstance(n, int) or n < 1:
            raise ValueError(f"n must be a positive int, got {n!r}")
        return self._sample(n, generator)

    def _sample(self, n: int, generator: torch.Generator | None) -> Tensor:
        raise NotImplementedError

    def log_prob(self, x: Tensor) -> Tensor:
        """Exact log-density (log-mass) of each sample: ``x[n, *event] -> Tensor[n]``."""
        if not isinstance(x, Tensor):
            raise ValueError(f"x must be a torch.Tensor, got {type(x).__name__}")
        event = tuple(self.event_shape)
        if x.dim() != 1 + len(event) or tuple(x.shape[1:]) != event:
            raise ValueError(f"x must have shape [n, {', '.join(map(str, event)) or ''}] for event shape {event}, "
                             f"got {tuple(x.shape)}")
        return self.dist.log_prob(x)

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.describe()})"

    def describe(self) -> str:
        raise NotImplementedError


def _as_tensor(value, name: str, dtype: torch.dtype, device) -> Tensor:
    t = torch.as_tensor(value, dtype=dtype, device=device)
    if not bool(torch.isfinite(t).all()):
        raise ValueError(f"{name} must be finite")
    return t


def _randn(shape, generator, like: Tensor) -> Tensor:
    return torch.randn(shape, generator=generator, dtype=like.dtype, device=like.device)


class Gaussian(ReferenceModel):
    """N(loc, Σ) in d dimensions (``loc`` a vector), or N(loc, scale²) in 1-D (``loc`` a scalar).

    Give exactly one of ``scale`` (1-D standard deviation, or a vector of them: diagonal covariance)
    or ``covariance`` (a full d×d matrix, positive definite).
    """

    def __init__(self, loc, scale=None, covariance=None, *, dtype=torch.float64, device=None):
        if (scale is None) == (covariance is None):
            raise ValueError("give exactly one of scale or covariance")
        self.loc = _as_tensor(loc, "loc", dtype, device)
        if covariance is not None:
            cov = _as_tensor(covariance, "covariance", dtype, device)
            d = self.loc.shape[-1] if self.loc.dim() == 1 else -1
            if self.loc.dim() != 1 or cov.shape != (d, d):
                raise ValueError(f"covariance must be [d, d] for a loc of shape [d], got {tuple(cov.shape)} and "
                                 f"{tuple(self.loc.shape)}")
            if not torch.allclose(cov, cov.T):
                raise ValueError("covariance must be symmetric")
            try:
                self.scale_tril = torch.linalg.cholesky(cov)
            except RuntimeError as err:
                raise ValueError("covariance must be symmetric positive definite") from err
            self.dist = MultivariateNormal(self.loc, scale_tril=self.scale_tril, validate_args=False)
        else:
            scale = _as_tensor(scale, "scale", dtype, device)
            if scale.shape != self.loc.shape or self.loc.dim() > 1 or not bool((scale > 0).all()):
                raise ValueError("scale must be positive and have the shape of loc (a scalar or a vector)")
            base = Normal(self.loc, scale, validate_args=False)
            self.scale_tril = torch.diag(scale) if scale.dim() == 1 else scale
            self.dist = Independent(base, 1, validate_args=False) if scale.dim() == 1 else base

    @property
    def dtype(self):
        return self.loc.dtype

    @property
    def device(self):
        return self.loc.device

    @property
    def dim(self) -> int:
        """Number of dimensions d (1 for a scalar Gaussian)."""
        return 1 if self.loc.dim() == 0 else self.loc.shape[0]

    def mean_and_covariance(self) -> tuple[Tensor, Tensor]:
        """(μ[d], Σ[d, d]) in float64, scalar Gaussians as d = 1."""
        L = self.scale_tril.double().reshape(self.dim, self.dim)
        return self.loc.double().reshape(self.dim), L @ L.T

    def _sample(self, n, generator):
        eps = _randn((n, *self.loc.shape), generator, self.loc)
        if self.loc.dim() == 0:
            return eps.mul_(self.scale_tril).add_(self.loc)  # in place: no second n-sized buffer
        return (eps @ self.scale_tril.T).add_(self.loc)

    def describe(self):
        if self.dim == 1:
            return f"N({self.loc.item():g}, {self.scale_tril.item():g}²)"
        return f"N(μ ∈ R^{self.dim}, Σ {self.dim}×{self.dim})"


class GaussianMixture(ReferenceModel):
    """Σ_k w_k N(μ_k, σ_k²) in 1-D (``locs`` [K], ``scales`` [K]) or Σ_k w_k N(μ_k, Σ_k) in d dimensions
    (``locs`` [K, d], ``covariances`` [K, d, d])."""

    def __init__(self, weights, locs, scales=None, covariances=None, *, dtype=torch.float64, device=None):
        if (scales is None) == (covariances is None):
            raise ValueError("give exactly one of scales (1-D) or covariances (d-D)")
        self.weights = _as_tensor(weights, "weights", dtype, device)
        if self.weights.dim() != 1 or not bool((self.weights > 0).all()):
            raise ValueError("weights must be a positive vector")
        self.weights = self.weights / self.weights.sum()
        self.locs = _as_tensor(locs, "locs", dtype, device)
        k = self.weights.shape[0]
        if self.locs.shape[0] != k:
            raise ValueError(f"locs must have {k} rows, one per weight, got {tuple(self.locs.shape)}")
        mix = _Categorical(probs=self.weights, validate_args=False)
        if scales is not None:
            self.scales = _as_tensor(scales, "scales", dtype, device)
            if self.locs.dim() != 1 or self.scales.shape != (k,) or not bool((self.scales > 0).all()):
                raise ValueError("1-D mixtures need locs [K] and positive scales [K]")
            self.dist = MixtureSameFamily(mix, Normal(self.locs, self.scales, validate_args=False),
                                          validate_args=False)
        else:
            covs = _as_tensor(covariances, "covariances", dtype, device)
            if self.locs.dim() != 2 or covs.shape != (k, self.locs.shape[1], self.locs.shape[1]):
                raise ValueError("d-D mixtures need locs [K, d] and covariances [K, d, d]")
            if not torch.allclose(covs, covs.transpose(-1, -2)):
                raise ValueError("covariances must be symmetric")
            try:
                self.scale_trils = torch.linalg.cholesky(covs)
            except RuntimeError as err:
                raise ValueError("each covariance must be symmetric positive definite") from err
            self.scales = None
            comp = MultivariateNormal(self.locs, scale_tril=self.scale_trils, validate_args=False)
            self.dist = MixtureSameFamily(mix, comp, validate_args=False)

    @property
    def dtype(self):
        return self.locs.dtype

    @property
    def device(self):
        return self.locs.device

    def _sample(self, n, generator):
        idx = torch.multinomial(self.weights, n, replacement=True, generator=generator)
        eps = _randn((n, *self.locs.shape[1:]), generator, self.locs)
        if self.scales is not None:
            return self.locs[idx] + self.scales[idx] * eps
        return self.locs[idx] + torch.einsum("nij,nj->ni", self.scale_trils[idx], eps)

    def describe(self):
        if self.scales is not None:
            parts = [f"{w:.2g}·N({m:g}, {s:g}²)" for w, m, s in
                     zip(self.weights.tolist(), self.locs.tolist(), self.scales.tolist())]
            return " + ".join(parts)
        return f"{self.weights.shape[0]} Gaussians in R^{self.locs.shape[1]}"


class Uniform(ReferenceModel):
    """U(low, high) on the real line; ``log_prob`` is -inf outside the support."""

    def __init__(self, low, high, *, dtype=torch.float64, device=None):
        self.low = _as_tensor(low, "low", dtype, device)
        self.high = _as_tensor(high, "high", dtype, device)
        if self.low.dim() != 0 or self.high.dim() != 0 or not bool(self.low < self.high):
            raise ValueError(f"need scalar low < high, got low={low!r}, high={high!r}")
        self.dist = _Uniform(self.low, self.high, validate_args=False)

    @property
    def dtype(self):
        return self.low.dtype

    @property
    def device(self):
        return self.low.device

    def _sample(self, n, generator):
        u = torch.rand(n, generator=generator, dtype=self.low.dtype, device=self.low.device)
        return self.low + (self.high - self.low) * u

    def describe(self):
        return f"U({self.low.item():g}, {self.high.item():g})"


class Categorical(ReferenceModel):
    """A categorical distribution over ``V`` tokens given by ``logits`` [V]; ``-inf`` marks excluded tokens
    (top-k or top-p truncation). Samples are integer token ids of shape [n]."""

    def __init__(self, logits, *, dtype=torch.float64, device=None):
        logits = torch.as_tensor(logits, dtype=dtype, device=device)
        if logits.dim() != 1 or logits.numel() == 0:
            raise ValueError(f"logits must be a non-empty vector [V], got shape {tuple(logits.shape)}")
        if bool(torch.isnan(logits).any()) or bool((logits == math.inf).any()):
            raise ValueError("logits must not contain NaN or +inf")
        if not bool(torch.isfinite(logits).any()):
            raise ValueError("logits must give at least one token positive probability")
        self.dist = _Categorical(logits=logits, validate_args=False)
        self._cdf = torch.cumsum(self.dist.probs, 0)

    @property
    def logits(self) -> Tensor:
        """Normalized log-probabilities [V]."""
        return self.dist.logits

    @property
    def vocab_size(self) -> int:
        return self.dist.logits.shape[0]

    @property
    def dtype(self):
        return self.dist.logits.dtype

    @property
    def device(self):
        return self.dist.logits.device

    def _sample(self, n, generator):
        u = torch.rand(n, generator=generator, dtype=self._cdf.dtype, device=self._cdf.device) * self._cdf[-1]
        return torch.searchsorted(self._cdf, u, right=True).clamp_max(self.vocab_size - 1)

    def log_prob(self, x):
        if isinstance(x, Tensor) and x.is_floating_point():
            raise ValueError(f"x must hold integer token ids, got dtype {x.dtype}")
        if isinstance(x, Tensor) and x.numel() and (int(x.min()) < 0 or int(x.max()) >= self.vocab_size):
            raise ValueError(f"x holds token ids outside [0, {self.vocab_size})")
        return super().log_prob(x)

    def describe(self):
        support = int(torch.isfinite(self.logits).sum())
        extra = f", {support} in support" if support < self.vocab_size else ""
        return f"V={self.vocab_size}{extra}"


def zipf_logits(vocab_size: int, exponent: float = 1.1, noise: float = 0.0,
                generator: torch.Generator | None = None) -> Tensor:
    """Zipf-like next-token logits: ``-exponent·log(rank)`` over a random ranking of the vocabulary,
    plus Gaussian noise of std ``noise`` (float64)."""
    ranks = torch.randperm(vocab_size, generator=generator).double() + 1
    logits = -exponent * torch.log(ranks)
    if noise:
        logits = logits + noise * torch.randn(vocab_size, generator=generator, dtype=torch.float64)
    return logits


def top_k_logits(logits: Tensor, k: int) -> Tensor:
    """Keep the ``k`` largest logits and set the rest to -inf (top-k truncated sampling)."""
    if not 1 <= k <= logits.shape[-1]:
        raise ValueError(f"k must be in [1, {logits.shape[-1]}], got {k}")
    kth = torch.topk(logits, k).values[..., -1:]
    return logits.masked_fill(logits < kth, -math.inf)
