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

from ._validate import real_number, positive_int, real_tensor

__all__ = ["ReferenceModel", "Gaussian", "GaussianMixture", "Uniform", "Categorical", "zipf_logits", "top_k_logits"]


class ReferenceModel:
    """A distribution with an exact normalized ``log_prob`` and reproducible ``sample``.

    A subclass names in ``_anchor`` one of its parameter tensors: the model's ``dtype`` and ``device`` are that
    tensor's."""

    dist: torch.distributions.Distribution
    _anchor: str

    @property
    def event_shape(self) -> torch.Size:
        return self.dist.event_shape

    @property
    def dtype(self) -> torch.dtype:
        return getattr(self, self._anchor).dtype

    @property
    def device(self) -> torch.device:
        return getattr(self, self._anchor).device

    def sample(self, n: int, generator: torch.Generator | None = None) -> Tensor:
        """Draw ``n`` samples, shape ``[n, *event_shape]``."""
        return self._sample(positive_int("n", n), generator)

    def _sample(self, n: int, generator: torch.Generator | None) -> Tensor:
        raise NotImplementedError

    def log_prob(self, x: Tensor) -> Tensor:
        """Exact log-density (log-mass) of each sample: ``x[n, *event] -> Tensor[n]``.

        NaN in x is a ValueError; a sample with an infinite coordinate has density 0 (``-inf``); no samples
        (n = 0) give an empty result."""
        if not isinstance(x, Tensor):
            raise ValueError(f"x must be a torch.Tensor, got {type(x).__name__}")
        event = tuple(self.event_shape)
        if x.dim() != 1 + len(event) or tuple(x.shape[1:]) != event:
            raise ValueError(f"x must have shape [n, {', '.join(map(str, event)) or ''}] for event shape {event}, "
                             f"got {tuple(x.shape)}")
        if x.shape[0] == 0:
            return torch.zeros(0, dtype=self.dtype, device=self.device)
        if not x.is_floating_point():
            return self.dist.log_prob(x)
        if bool(torch.isnan(x).any()):
            raise ValueError(f"x contains {int(torch.isnan(x).sum())} NaN values")
        far = ~torch.isfinite(x).reshape(x.shape[0], -1).all(-1)  # a coordinate at ±inf: density 0
        near = x.masked_fill(far.reshape(-1, *[1] * len(event)), 0.0)
        return self._log_prob(near).masked_fill(far, -math.inf)

    def _log_prob(self, x: Tensor) -> Tensor:
        """The log-density of checked, finite samples."""
        return self.dist.log_prob(x)

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.describe()})"

    def describe(self) -> str:
        raise NotImplementedError




def _scales(name: str, value, dtype: torch.dtype, device) -> Tensor:
    """Standard deviations whose squares (the variances) are positive normal floats of ``dtype``."""
    t = real_tensor(name, value, dtype, device)
    info = torch.finfo(t.dtype)
    if not bool(((t > math.sqrt(info.tiny)) & (t < math.sqrt(info.max))).all()):
        raise ValueError(f"{name} must be positive, within ({math.sqrt(info.tiny):.3g}, {math.sqrt(info.max):.3g}) in "
                         f"{t.dtype} so that its square (the variance) is a positive normal float")
    return t


def _randn(shape, generator, like: Tensor) -> Tensor:
    return torch.randn(shape, generator=generator, dtype=like.dtype, device=like.device)


class Gaussian(ReferenceModel):
    """N(loc, Σ) in d dimensions (``loc`` a vector), or N(loc, scale²) in 1-D (``loc`` a scalar).

    Give exactly one of ``scale`` (1-D standard deviation, or a vector of them: diagonal covariance)
    or ``covariance`` (a full d×d matrix, positive definite). A scale whose square under- or overflows the
    dtype (below ~1.5e-154 or above ~1.3e154 in float64) is rejected: its variance would not be representable.
    """

    _anchor = "loc"

    def __init__(self, loc, scale=None, covariance=None, *, dtype=torch.float64, device=None):
        if (scale is None) == (covariance is None):
            raise ValueError("give exactly one of scale or covariance")
        self.loc = real_tensor("loc", loc, dtype, device)
        if covariance is not None:
            cov = real_tensor("covariance", covariance, dtype, device)
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
            scale = _scales("scale", scale, dtype, device)
            if scale.shape != self.loc.shape or self.loc.dim() > 1:
                raise ValueError("scale must have the shape of loc (a scalar or a vector)")
            base = Normal(self.loc, scale, validate_args=False)
            self.scale_tril = torch.diag(scale) if scale.dim() == 1 else scale
            self.dist = Independent(base, 1, validate_args=False) if scale.dim() == 1 else base

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
    (``locs`` [K, d], ``covariances`` [K, d, d]).

    ``weights`` are positive and need not sum to 1: they are divided by their sum (after dividing by the
    largest, so that no sum overflows); ``self.weights`` holds the normalized ones."""

    _anchor = "locs"

    def __init__(self, weights, locs, scales=None, covariances=None, *, dtype=torch.float64, device=None):
        if (scales is None) == (covariances is None):
            raise ValueError("give exactly one of scales (1-D) or covariances (d-D)")
        weights = real_tensor("weights", weights, dtype, device)
        if weights.dim() != 1 or weights.numel() == 0 or not bool((weights > 0).all()):
            raise ValueError(f"weights must be a positive vector with at least one entry, "
                             f"got shape {tuple(weights.shape)}")
        weights = weights / weights.max()
        self.weights = weights / weights.sum()
        self.locs = real_tensor("locs", locs, dtype, device)
        k = self.weights.shape[0]
        if self.locs.shape[0] != k:
            raise ValueError(f"locs must have {k} rows, one per weight, got {tuple(self.locs.shape)}")
        mix = _Categorical(logits=self.weights.log(), validate_args=False)  # probs= would clamp weights to >= eps
        if scales is not None:
            self.scales = _scales("scales", scales, dtype, device)
            if self.locs.dim() != 1 or self.scales.shape != (k,):
                raise ValueError("1-D mixtures need locs [K] and scales [K]")
            self.dist = MixtureSameFamily(mix, Normal(self.locs, self.scales, validate_args=False),
                                          validate_args=False)
        else:
            covs = real_tensor("covariances", covariances, dtype, device)
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
    """U(low, high) on the real line; ``log_prob`` is -inf outside the support [low, high]."""

    _anchor = "low"

    def __init__(self, low, high, *, dtype=torch.float64, device=None):
        self.low = real_tensor("low", low, dtype, device)
        self.high = real_tensor("high", high, dtype, device)
        if self.low.dim() != 0 or self.high.dim() != 0 or not bool(self.low < self.high):
            raise ValueError(f"need scalar low < high, got low={low!r}, high={high!r}")
        if not bool(torch.isfinite(self.high - self.low)):
            raise ValueError(f"high - low must be finite in {dtype} (its log is the density), got low={low!r}, "
                             f"high={high!r}")
        self.dist = _Uniform(self.low, self.high, validate_args=False)

    def _sample(self, n, generator):
        u = torch.rand(n, generator=generator, dtype=self.low.dtype, device=self.low.device)
        return self.low + (self.high - self.low) * u

    def _log_prob(self, x):
        """-log(high - low) on the closed [low, high] (a sample can round to ``high``), -inf outside."""
        inside = (x >= self.low) & (x <= self.high)
        log_density = torch.where(inside, -torch.log(self.high - self.low), -math.inf)
        return log_density.to(torch.promote_types(x.dtype, self.dtype))

    def describe(self):
        return f"U({self.low.item():g}, {self.high.item():g})"


class Categorical(ReferenceModel):
    """A categorical distribution over ``V`` tokens given by ``logits`` [V]; ``-inf`` marks excluded tokens
    (top-k or top-p truncation). Samples are integer token ids of shape [n]."""

    _anchor = "logits"

    def __init__(self, logits, *, dtype=torch.float64, device=None):
        logits = real_tensor("logits", logits, dtype, device, finite=False)
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
    vocab_size = positive_int("vocab_size", vocab_size)
    exponent, noise = real_number("exponent", exponent), real_number("noise", noise)
    if noise < 0:
        raise ValueError(f"noise must be >= 0, got {noise}")
    if generator is not None and not isinstance(generator, torch.Generator):
        raise ValueError(f"generator must be a torch.Generator or None, got {type(generator).__name__}")
    ranks = torch.randperm(vocab_size, generator=generator).double() + 1
    logits = -exponent * torch.log(ranks)
    if noise:
        logits = logits + noise * torch.randn(vocab_size, generator=generator, dtype=torch.float64)
    if not bool(torch.isfinite(logits).all()):
        raise ValueError(f"exponent {exponent:g} and noise {noise:g} give logits beyond float64's range")
    return logits


def top_k_logits(logits: Tensor, k: int) -> Tensor:
    """Keep the ``k`` largest logits and set the rest to -inf (top-k truncated sampling)."""
    if not isinstance(logits, Tensor) or not logits.is_floating_point() or logits.dim() == 0:
        raise ValueError(f"logits must be a floating-point tensor [..., V], got {logits!r:.80}")
    if bool(torch.isnan(logits).any()):
        raise ValueError("logits contain NaN")
    if positive_int("k", k) > logits.shape[-1]:
        raise ValueError(f"k must be in [1, {logits.shape[-1]}], got {k}")
    kth = torch.topk(logits, k).values[..., -1:]
    return logits.masked_fill(logits < kth, -math.inf)
