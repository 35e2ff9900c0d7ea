r"""Named marginal-likelihood cases: log importance weights with an exact log p(x).

A case draws ``log_w[*shape, K]`` (float64), :math:`\log w = \log p(x, z) - \log q(z|x)` for
:math:`z \sim q`, so that :math:`E_q[w] = p(x)` exactly. Where known, it records the exact moments of the
normalized weight :math:`v = w / p(x)` (mean 1, central moments :math:`\mu_2, \mu_3`), which fix the
delta-method bias of :math:`\log \frac1K\sum w`, and the exact ELBO gap :math:`E_q[\log w] - \log p(x)`.

Built in: log-normal weights, :math:`\log w \sim N(\log p - s^2/2, s^2)` with :math:`t = e^{s^2}`:
:math:`E[v^n] = t^{n(n-1)/2}`, so :math:`\mu_2 = t - 1`, :math:`\mu_3 = (t-1)^2(t+2)` and the ELBO gap is
:math:`-s^2/2`. All moments are finite, yet for s ≥ 2 the tail looks heavy at practical K (Pareto k̂
above 0.5; above 0.7 for s = 3 at K = 1e4). Model-based cases (a linear-Gaussian model with its
exact evidence, Bayes nets by enumeration) are in ``reference_models.latent_cases``. Every case is registered
in ``reference_models.registry`` (:func:`register_marginal_case`); a name never changes meaning once released.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, fields
from functools import partial
from typing import Callable, ClassVar, Iterable

import torch
from torch import Tensor

from ._validate import positive_int
from .registry import register_case
from .truth import Truth

__all__ = ["MarginalCase", "WeightMoments", "register_marginal_case"]

#: log p(x) of the log-normal cases: p(x) ≈ 7e-17, so an estimator that leaves log space shows it.
LOGNORMAL_LOG_P = -37.2


@dataclass(frozen=True)
class WeightMoments:
    """Exact mean and central moments of the normalized weight v = w / p(x) under q."""

    mu: Truth
    mu2: Truth
    mu3: Truth

    def as_dict(self) -> dict[str, Truth]:
        return {f.name: getattr(self, f.name) for f in fields(self)}


@dataclass(frozen=True)
class MarginalCase:
    """A named weight distribution with its exact log p(x); estimators see only ``log_w``."""

    kind: ClassVar[str] = "marginal"
    #: One log-weight per sample.
    event_numel: ClassVar[int] = 1

    name: str
    description: str
    sampler: Callable[[tuple[int, ...], int, torch.Generator | None], Tensor]
    log_marginal: Truth
    weight_moments: WeightMoments | None = None
    elbo_gap: Truth | None = None  # E_q[log w] − log p(x) = −KL(q(z|x) ‖ p(z|x))
    tags: tuple[str, ...] = ()

    @property
    def truth(self) -> Truth:
        """The exact log p(x)."""
        return self.log_marginal

    def draw_log_w(self, shape: tuple[int, ...], K: int, generator: torch.Generator | None = None) -> Tensor:
        """``log_w[*shape, K]`` in float64: i.i.d. log-weights, K per estimate."""
        if not isinstance(shape, tuple):
            raise ValueError(f"shape must be a tuple of non-negative ints, got {shape!r}")
        shape = tuple(positive_int(f"shape[{i}]", n, minimum=0) for i, n in enumerate(shape))
        K = positive_int("K", K)
        if generator is not None and not isinstance(generator, torch.Generator):
            raise ValueError(f"generator must be a torch.Generator or None, got {type(generator).__name__}")
        return self.sampler(shape, K, generator)

    def draw(self, size: int, generator: torch.Generator | None = None, dtype: torch.dtype | None = None) -> Tensor:
        """``log_w[size]``: ``size`` i.i.d. log-weights (:meth:`draw_log_w` with no batch shape), in ``dtype``
        (float64 by default)."""
        return self.draw_log_w((), size, generator).to(dtype or torch.float64)

    @property
    def variance_finite(self) -> bool:
        """Var(w) < ∞ is known exactly (so a z-test of E[Â/p(x)] = 1 is meaningful)."""
        return self.weight_moments is not None and self.weight_moments.mu2.finite


def register_marginal_case(name: str, builder: Callable[..., MarginalCase], *, description: str,
                           tags: Iterable[str] = ()) -> None:
    """Register ``builder(name, description, tags)``, which returns the :class:`MarginalCase` called ``name``
    (built lazily, once, by ``registry.get_case``)."""
    tags = tuple(tags)
    register_case(name, lambda: builder(name, description, tags), kind="marginal", tags=tags,
                  description=description)


def _lognormal(name: str, description: str, tags: tuple[str, ...], s: float) -> MarginalCase:
    loc = LOGNORMAL_LOG_P - s * s / 2

    def sampler(shape, K, generator):
        return loc + s * torch.randn(*shape, K, generator=generator, dtype=torch.float64)

    e = math.expm1(s * s)  # t − 1
    closed = dict(method="closed form", note=f"log-normal weights, s = {s:g}: E[v^n] = exp(n(n−1)s²/2)")
    return MarginalCase(
        name, description, sampler,
        Truth(LOGNORMAL_LOG_P, "closed form", 0.0, "E_q[w] = exp(m + s²/2) for log w ~ N(m, s²)"),
        WeightMoments(Truth(1.0, **closed), Truth(e, **closed), Truth(e * e * (e + 3), **closed)),
        Truth(-s * s / 2, "closed form", 0.0, "E[log w] − log p = −s²/2"), tags)


def _register_lognormal(s: float, note: str, tags: tuple[str, ...] = ()) -> None:
    register_marginal_case(f"lognormal-{s:g}", partial(_lognormal, s=s), tags=tags,
                           description=f"log w ~ N(log p − s²/2, s²), s = {s:g}, log p(x) = {LOGNORMAL_LOG_P}: {note}")


_register_lognormal(0.5, "a good proposal (Var(v) = 0.28)", ("gate", "report"))
_register_lognormal(1.0, "a fair proposal (Var(v) = 1.7)", ("gate", "report"))
_register_lognormal(2.0, "a poor proposal (Var(v) = 54; Pareto k̂ ≈ 0.5–0.7 at K = 1e4)")
_register_lognormal(3.0, "a bad proposal (Var(v) = 8.1e3; Pareto k̂ > 0.7 at K = 1e4)")
