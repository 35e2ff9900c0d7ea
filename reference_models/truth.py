r"""Exact ground truth for a pair (p, q): KL divergences and the moments of the ratio r = q/p under p.

Every number is a :class:`Truth` that records how it was obtained (closed form, adaptive quadrature
with its error bound, enumeration, or infinite because of a support mismatch or a divergent tail), in
the spirit of posteriordb: a reference value is worthless without its provenance.

With :math:`\log r = \log q(x) - \log p(x)` and :math:`x \sim p`, :func:`ratio_moments` returns

- ``kl``          :math:`KL(p\|q) = -E_p[\log r]`
- ``reverse_kl``  :math:`KL(q\|p)`
- ``mean_log_r2`` :math:`E_p[(\log r)^2]` (so :math:`E[k_2] = ` ``mean_log_r2 / 2``)
- ``mean_r``      :math:`E_p[r] = q(\mathrm{supp}\,p)`, which is 1 exactly when q's support lies inside p's
- ``mean_r2``     :math:`E_p[r^2] = \int q^2/p`; k3's variance is finite iff this is.

Methods, chosen by the pair's types through :func:`register_truth` (as ``torch.distributions.register_kl``):
Gaussian pairs in closed form (log r is a quadratic form of a Gaussian vector); categorical pairs by
enumeration in float64; uniform pairs in closed form; any other pair of 1-D densities by
``scipy.integrate.quad`` over intervals split at the components' means, with its absolute error bound.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, fields
from typing import Callable

import numpy as np
import torch
from scipy import integrate

from .distributions import Categorical, Gaussian, GaussianMixture, ReferenceModel, Uniform

__all__ = ["Truth", "RatioMoments", "exact_kl", "ratio_moments", "register_truth"]

_EPS = float(np.finfo(np.float64).eps)


@dataclass(frozen=True)
class Truth:
    """An exact value with how it was obtained and a bound on its numerical error."""

    value: float
    method: str  # "closed form" | "quadrature" | "enumeration" | "infinite"
    error_bound: float = 0.0
    note: str = ""

    def __float__(self) -> float:
        return self.value

    @property
    def finite(self) -> bool:
        return math.isfinite(self.value)

    def describe(self) -> str:
        text = self.method
        if self.method == "quadrature":
            text += f" (error ≤ {self.error_bound:.1e})"
        return f"{text}: {self.note}" if self.note else text


@dataclass(frozen=True)
class RatioMoments:
    """Exact moments of the log-ratio under p; see the module docstring."""

    kl: Truth
    reverse_kl: Truth
    mean_log_r2: Truth
    mean_r: Truth
    mean_r2: Truth

    def as_dict(self) -> dict[str, Truth]:
        return {f.name: getattr(self, f.name) for f in fields(self)}


def exact_kl(p: ReferenceModel, q: ReferenceModel) -> Truth:
    """The exact KL(p‖q) with its provenance; ``inf`` (method ``"infinite"``) on a support mismatch.

    >>> exact_kl(Uniform(0, 1), Uniform(0, 2)).value  # log 2
    0.6931471805599453
    """
    return _forward_moments(p, q)["kl"]


def ratio_moments(p: ReferenceModel, q: ReferenceModel) -> RatioMoments:
    """All exact moments of r = q/p under p (and the reverse KL) for the pair."""
    return RatioMoments(reverse_kl=exact_kl(q, p), **_forward_moments(p, q))


_Method = Callable[[ReferenceModel, ReferenceModel], dict[str, Truth]]
_METHODS: dict[tuple[type, type], _Method] = {}


def register_truth(type_p: type, type_q: type) -> Callable[[_Method], _Method]:
    """Decorate ``method(p, q) -> {kl, mean_log_r2, mean_r, mean_r2}`` (each a :class:`Truth`) as the exact
    method for pairs of these types. A pair uses the method registered for the most specific types along
    p's MRO, then q's; ``method`` raises a ValueError for a pair of those types it cannot handle."""
    def add(method: _Method) -> _Method:
        if (type_p, type_q) in _METHODS:
            raise ValueError(f"a method for {type_p.__name__} ‖ {type_q.__name__} is already registered")
        _METHODS[type_p, type_q] = method
        return method
    return add


def _forward_moments(p, q) -> dict[str, Truth]:
    for name, value in (("p", p), ("q", q)):
        if not isinstance(value, ReferenceModel):
            raise ValueError(f"{name} must be a ReferenceModel, got {type(value).__name__}")
    if tuple(p.event_shape) != tuple(q.event_shape):
        raise ValueError(f"p and q have different event shapes: {tuple(p.event_shape)} and {tuple(q.event_shape)}")
    method = next(_METHODS[tp, tq] for tp in type(p).__mro__ for tq in type(q).__mro__ if (tp, tq) in _METHODS)
    return method(p, q)


def _infinite(note: str) -> Truth:
    return Truth(math.inf, "infinite", 0.0, note)


# --- Gaussian pairs: log r is a quadratic form of x ~ p --------------------------------------------

@register_truth(Gaussian, Gaussian)
def _gaussian(p: Gaussian, q: Gaussian) -> dict[str, Truth]:
    r"""Write x = μ_p + u, u ~ N(0, S). Then log r = ½uᵀAu + bᵀu + c with A = S⁻¹ - Σ_q⁻¹, b = -Σ_q⁻¹δ,
    δ = μ_p - μ_q, c = ½log(|S|/|Σ_q|) - ½δᵀΣ_q⁻¹δ, and E[Q] = ½tr(AS) + c, Var[Q] = ½tr(ASAS) + bᵀSb.
    E_p[r²] = ∫q²/p is a Gaussian integral with precision Λ = 2Σ_q⁻¹ - S⁻¹, finite iff Λ ≻ 0."""
    mp, S = p.mean_and_covariance()
    mq, Sq = q.mean_and_covariance()
    d = mp.shape[0]
    Lp, Lq = torch.linalg.cholesky(S), torch.linalg.cholesky(Sq)
    Pp, Pq = torch.cholesky_inverse(Lp), torch.cholesky_inverse(Lq)
    logdet_p = 2 * torch.log(torch.diagonal(Lp)).sum()
    logdet_q = 2 * torch.log(torch.diagonal(Lq)).sum()
    delta = mp - mq
    A = Pp - Pq
    b = -Pq @ delta
    c = 0.5 * (logdet_p - logdet_q) - 0.5 * delta @ Pq @ delta
    AS = A @ S
    mean_q = 0.5 * torch.trace(AS) + c
    var_q = 0.5 * torch.trace(AS @ AS) + b @ S @ b
    scale = float(abs(mean_q) + var_q + torch.trace(Pq @ S) + d)
    err = 64 * d * _EPS * scale  # float64 linear algebra, a generous bound
    closed = dict(method="closed form", error_bound=err, note="Gaussian pair")
    kl = Truth(float(-mean_q), **closed)
    mean_log_r2 = Truth(float(var_q + mean_q ** 2), **closed)

    Lam = 2 * Pq - Pp
    L_lam, info = torch.linalg.cholesky_ex(Lam)
    if int(info) != 0:
        mean_r2 = _infinite("E_p[(q/p)²] diverges: 2Σ_q⁻¹ − Σ_p⁻¹ is not positive definite")
    else:
        eta = 2 * Pq @ mq - Pp @ mp
        c0 = 2 * mq @ Pq @ mq - mp @ Pp @ mp
        sol = torch.cholesky_solve(eta[:, None], L_lam)[:, 0]
        log_m2 = -0.5 * c0 + 0.5 * eta @ sol - torch.log(torch.diagonal(L_lam)).sum() - logdet_q + 0.5 * logdet_p
        mean_r2 = Truth(float(torch.exp(log_m2)), **closed)
    return dict(kl=kl, mean_log_r2=mean_log_r2, mean_r=Truth(1.0, "closed form", 0.0, "q has full support"),
                mean_r2=mean_r2)


# --- categorical pairs: enumeration over the vocabulary ---------------------------------------------

@register_truth(Categorical, Categorical)
def _enumeration(p: Categorical, q: Categorical) -> dict[str, Truth]:
    if p.vocab_size != q.vocab_size:
        raise ValueError(f"p and q have different vocabulary sizes: {p.vocab_size} and {q.vocab_size}")
    lp, lq = p.logits.double().cpu(), q.logits.double().cpu()
    on = torch.isfinite(lp)
    pp = torch.exp(lp[on])
    lr = lq[on] - lp[on]
    v = p.vocab_size
    enum = dict(method="enumeration", note=f"sum over {v:,} tokens in float64")

    def total(terms: torch.Tensor) -> Truth:
        return Truth(float(terms.sum()), error_bound=v * _EPS * float(terms.abs().sum()), **enum)

    if bool(torch.isinf(lr).any()):
        kl = _infinite(f"q gives zero mass to {int(torch.isinf(lr).sum())} tokens that p can emit")
        mean_log_r2 = kl
    else:
        kl, mean_log_r2 = total(-pp * lr), total(pp * lr ** 2)
    return dict(kl=kl, mean_log_r2=mean_log_r2, mean_r=total(torch.exp(lq[on])),
                mean_r2=total(torch.exp(2 * lq[on] - lp[on])))


# --- uniform pairs ------------------------------------------------------------------------------------

@register_truth(Uniform, Uniform)
def _uniform(p: Uniform, q: Uniform) -> dict[str, Truth]:
    """On p's support r = |p|/|q| inside q's support and 0 outside it."""
    wp, wq = float(p.high - p.low), float(q.high - q.low)
    overlap = max(0.0, min(float(p.high), float(q.high)) - max(float(p.low), float(q.low)))
    closed = dict(method="closed form", error_bound=0.0, note="uniform pair")
    mean_r = Truth(overlap / wq, **closed)
    mean_r2 = Truth(overlap * wp / wq ** 2, **closed)
    if overlap < wp:
        why = f"q = {q.describe()} gives zero density on part of p = {p.describe()}'s support"
        return dict(kl=_infinite(why), mean_log_r2=_infinite(why), mean_r=mean_r, mean_r2=mean_r2)
    log_r = math.log(wp / wq)
    return dict(kl=Truth(-log_r, **closed), mean_log_r2=Truth(log_r ** 2, **closed), mean_r=mean_r, mean_r2=mean_r2)


# --- any pair of 1-D densities: adaptive quadrature ---------------------------------------------------

def _is_1d_continuous(m) -> bool:
    return (isinstance(m, Uniform) or (isinstance(m, Gaussian) and m.loc.dim() == 0)
            or (isinstance(m, GaussianMixture) and m.scales is not None))


def _support(m) -> tuple[float, float]:
    return (float(m.low), float(m.high)) if isinstance(m, Uniform) else (-math.inf, math.inf)


def _tail_scale(m) -> float:
    """The standard deviation that governs a Gaussian-tailed density's tails (0 for bounded support)."""
    if isinstance(m, Uniform):
        return 0.0
    return float(m.scale_tril) if isinstance(m, Gaussian) else float(m.scales.max())


def _breakpoints(*models) -> list[float]:
    pts = []
    for m in models:
        if isinstance(m, Uniform):
            pts += [float(m.low), float(m.high)]
        elif isinstance(m, Gaussian):
            pts += [float(m.loc) + k * float(m.scale_tril) for k in (-3, 0, 3)]
        else:
            for loc, s in zip(m.locs.tolist(), m.scales.tolist()):
                pts += [loc - 3 * s, loc, loc + 3 * s]
    return sorted(set(pts))


@register_truth(ReferenceModel, ReferenceModel)
def _quadrature(p, q) -> dict[str, Truth]:
    """The fallback: adaptive quadrature for any pair of 1-D densities; a ValueError for any other pair."""
    if not (_is_1d_continuous(p) and _is_1d_continuous(q)):
        raise ValueError(f"no exact method for the pair {type(p).__name__} ‖ {type(q).__name__} "
                         f"with event shape {tuple(p.event_shape)}")
    lo, hi = _support(p)
    qlo, qhi = _support(q)
    edges = [lo] + [x for x in _breakpoints(p, q) if lo < x < hi] + [hi]

    def log_densities(x: float) -> tuple[float, float]:
        t = torch.tensor([x], dtype=torch.float64)
        return float(p.log_prob(t)), float(q.log_prob(t))

    def integrate_all(f) -> tuple[float, float]:
        value = err = 0.0
        for a, b in zip(edges[:-1], edges[1:]):
            v, e = integrate.quad(f, a, b, limit=200, epsabs=1e-13, epsrel=1e-11)
            value, err = value + v, err + e
        return value, err

    def expect(integrand):
        """∫ integrand(log p(x), log q(x)) dx over p's support (integrands are written in log space)."""
        def f(x):
            lp, lq = log_densities(x)
            return 0.0 if lp == -math.inf else integrand(lp, lq)
        v, e = integrate_all(f)
        return Truth(v, "quadrature", e, "scipy.integrate.quad over the real line")

    mean_r = expect(lambda lp, lq: math.exp(lq))
    if qlo > lo or qhi < hi:
        why = f"q = {q.describe()} has zero density on part of p = {p.describe()}'s support"
        kl = mean_log_r2 = _infinite(why)
    else:
        kl = expect(lambda lp, lq: math.exp(lp) * (lp - lq))
        mean_log_r2 = expect(lambda lp, lq: math.exp(lp) * (lq - lp) ** 2)
    sp, sq = _tail_scale(p), _tail_scale(q)
    if sp > 0 and sq > 0 and sq ** 2 >= 2 * sp ** 2:
        mean_r2 = _infinite(f"E_p[(q/p)²] diverges: q's tail scale {sq:g} ≥ √2 × p's tail scale {sp:g}")
    else:
        mean_r2 = expect(lambda lp, lq: math.exp(2 * lq - lp))
    return dict(kl=kl, mean_log_r2=mean_log_r2, mean_r=mean_r, mean_r2=mean_r2)
