"""Named KL cases: a pair (p, q) with x ~ p, the exact KL(p‖q) and the exact ratio moments.

A case's name never changes meaning once released: every model below is built from fixed constants
and fixed seeds. Cases are registered in ``reference_models.registry`` and built lazily (the
vocabulary-sized ones take a moment). Each case records which estimator assumptions it breaks, derived
from its exact moments (:class:`RatioCase`, shared with the sequence cases):

- ``support``: q's support is not inside p's, so E_p[q/p] < 1 and k3-type estimators (k3, the
  control variates, the reverse-KL estimator) are biased by exactly E_p[q/p] − 1;
- ``ratio_variance``: E_p[(q/p)²] = ∞, so any estimator built on r = q/p has infinite variance and a
  z-test of it means nothing.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, ClassVar, NamedTuple

import torch
from torch import Tensor

from .distributions import Categorical, Gaussian, GaussianMixture, ReferenceModel, Uniform, top_k_logits, zipf_logits
from .registry import register_case
from .truth import RatioMoments, Truth, ratio_moments

__all__ = ["RatioCase", "KLCase", "PairSample", "register_kl_case", "bimodal"]

#: The tags of the cases that today's defaults run on: every gate and every report.
DEFAULT_TAGS = ("gate", "report")


class PairSample(NamedTuple):
    """What a KL estimator sees of x ~ p: log p(x) and log q(x) (``fn(*sample)`` calls it)."""

    log_p: Tensor
    log_q: Tensor


class RatioCase:
    """What a pair (p, q) with exact ratio moments ``moments`` says about the estimators built on r = q/p;
    shared by the KL and the sequence cases (their ``finite_support`` and ``event_numel`` differ)."""

    moments: RatioMoments

    @property
    def truth(self) -> Truth:
        """The exact KL(p‖q)."""
        return self.moments.kl

    @property
    def support_ok(self) -> bool:
        """E_p[q/p] = 1: q puts no mass outside p's support."""
        m = self.moments.mean_r
        return abs(m.value - 1.0) <= max(1e-9, 10 * m.error_bound)

    @property
    def ratio_variance_finite(self) -> bool:
        return self.moments.mean_r2.finite

    @property
    def breaks(self) -> dict[str, str]:
        """Broken estimator assumptions, each with the reason."""
        out = {}
        if not self.support_ok:
            out["support"] = (f"E_p[q/p] = {self.moments.mean_r.value:.4g} < 1: q has mass outside p's support, "
                              f"so k3-type estimators are biased by {self.moments.mean_r.value - 1:+.4g}")
        if not self.ratio_variance_finite:
            out["ratio_variance"] = f"{self.moments.mean_r2.note}: estimators using r = q/p have infinite variance"
        return out


@dataclass(frozen=True)
class KLCase(RatioCase):
    """A named pair with its exact truth; estimators see only log p(x), log q(x) for x ~ p."""

    kind: ClassVar[str] = "kl"

    name: str
    p: ReferenceModel
    q: ReferenceModel
    moments: RatioMoments
    description: str
    tags: tuple[str, ...] = ()

    @property
    def finite_support(self) -> bool:
        """p has finitely many outcomes, so every finite-valued estimator has finite variance."""
        return isinstance(self.p, Categorical)

    @property
    def diagnose_tails(self) -> bool:
        """Whether a z-test of an estimator's mean must first check its tail (Pareto k̂)."""
        return not self.finite_support

    @property
    def event_numel(self) -> int:
        """Elements per sample (what a study's or the gate's chunk budget counts)."""
        return max(1, math.prod(self.p.event_shape))

    @property
    def device(self) -> torch.device:
        """Where p samples (and so where a generator for :meth:`draw` lives)."""
        return self.p.device

    def draw(self, size: int, generator: torch.Generator | None = None, dtype: torch.dtype | None = None) -> PairSample:
        """``size`` samples x ~ p: (log p(x), log q(x)), computed in the models' dtype, then cast to ``dtype``."""
        x = self.p.sample(size, generator=generator)
        lp, lq = self.p.log_prob(x), self.q.log_prob(x)
        return PairSample(lp, lq) if dtype is None else PairSample(lp.to(dtype), lq.to(dtype))


def register_kl_case(name: str, pair: Callable[[], tuple[ReferenceModel, ReferenceModel]], description: str,
                     tags: tuple[str, ...] = DEFAULT_TAGS) -> None:
    """Register the KL case ``name``: ``pair()`` builds (p, q) on first use, and the exact KL and ratio
    moments come from :func:`reference_models.truth.ratio_moments` (a ValueError there says when no exact
    method covers the pair)."""
    def build() -> KLCase:
        p, q = pair()
        return KLCase(name, p, q, ratio_moments(p, q), description, tuple(tags))

    register_case(name, build, kind="kl", tags=tags, description=description)


def _gauss_pair_100d() -> tuple[Gaussian, Gaussian]:
    g = torch.Generator().manual_seed(100)
    d = 100

    def cov() -> torch.Tensor:
        a = torch.randn(d, d, generator=g, dtype=torch.float64) / math.sqrt(d)
        return a @ a.T + 0.5 * torch.eye(d, dtype=torch.float64)

    mp = torch.randn(d, generator=g, dtype=torch.float64) * 0.1
    mq = mp + torch.randn(d, generator=g, dtype=torch.float64) * 0.1
    return Gaussian(mp, covariance=cov()), Gaussian(mq, covariance=cov())


def _vocab_pair(vocab: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(policy, reference) next-token logits: Zipf(1.1) reference, policy = reference + N(0, 0.5²) noise."""
    g = torch.Generator().manual_seed(seed)
    ref = zipf_logits(vocab, 1.1, noise=0.1, generator=g)
    policy = ref + 0.5 * torch.randn(vocab, generator=g, dtype=torch.float64)
    return policy, ref


def _categorical_pair(vocab: int, top_k: int | None = None) -> tuple[Categorical, Categorical]:
    """The (policy, reference) pair of :func:`_vocab_pair` seeded by ``vocab``; the policy optionally
    truncated to its top-k tokens (sampling with top-k against an untruncated reference)."""
    policy, ref = _vocab_pair(vocab, vocab)
    return Categorical(policy if top_k is None else top_k_logits(policy, top_k)), Categorical(ref)


def bimodal() -> GaussianMixture:
    """The course notes' bimodal mixture p = ½·N(−2, 0.5²) + ½·N(2, 0.5²)."""
    return GaussianMixture(weights=[0.5, 0.5], locs=[-2.0, 2.0], scales=[0.5, 0.5])


_BIMODAL_FIT_SCALE = math.sqrt(4.25)  # moment-matched Gaussian: variance 2² + 0.5²

register_kl_case("gauss-shift-0.1", lambda: (Gaussian(0.0, 1.0), Gaussian(0.1, 1.0)),
                 "Schulman's first case: N(0,1) ‖ N(0.1,1), KL = 0.005")
register_kl_case("gauss-shift-1", lambda: (Gaussian(0.0, 1.0), Gaussian(1.0, 1.0)),
                 "Schulman's second case: N(0,1) ‖ N(1,1), KL = 0.5")
register_kl_case("near-identical", lambda: (Gaussian(0.0, 1.0), Gaussian(math.sqrt(2e-4), 1.0)),
                 "N(0,1) ‖ N(0.01414,1), KL = 1e-4: k1 is almost all noise")
register_kl_case("gauss-var-wide-q", lambda: (Gaussian(0.0, 1.0), Gaussian(0.0, 2.0)),
                 "variance mismatch, q wider: N(0,1) ‖ N(0,2²); E_p[r²] = ∞")
register_kl_case("gauss-var-narrow-q", lambda: (Gaussian(0.0, 2.0), Gaussian(0.0, 1.0)),
                 "variance mismatch, q narrower: N(0,2²) ‖ N(0,1)")
register_kl_case("gauss-100d-fullcov", _gauss_pair_100d,
                 "100-dimensional full-covariance pair; log-densities near −150, like sequence log-probs")
register_kl_case("bimodal-vs-gauss", lambda: (bimodal(), Gaussian(0.0, _BIMODAL_FIT_SCALE)),
                 "bimodal mixture ‖ its moment-matched Gaussian (the mode-covering, forward-KL fit)")
register_kl_case("gauss-vs-bimodal", lambda: (Gaussian(0.0, _BIMODAL_FIT_SCALE), bimodal()),
                 "the moment-matched Gaussian ‖ the bimodal mixture (the other direction)")
register_kl_case("uniform-support", lambda: (Uniform(0.0, 1.0), Uniform(0.0, 2.0)),
                 "U(0,1) ‖ U(0,2), KL = log 2; q has mass outside p's support (the reverse direction is ∞)")
register_kl_case("vocab-50k", lambda: _categorical_pair(50257),
                 "next-token policy ‖ reference over a GPT-2-sized vocabulary (50,257), Zipf-like logits")
register_kl_case("vocab-200k", lambda: _categorical_pair(200_000),
                 "next-token policy ‖ reference over a 200,000-token vocabulary, Zipf-like logits")
register_kl_case("vocab-50k-top-k", lambda: _categorical_pair(50257, top_k=50),
                 "top-k (k = 50) truncated policy ‖ untruncated reference: q has mass outside p's support")
register_kl_case("heavy-ratio", lambda: (Gaussian(0.0, 1.0), Gaussian(0.0, 0.3)),
                 "N(0,1) ‖ N(0,0.3²): |log q/p| > 20 with probability ≈ 4%, where production clamps bite")
