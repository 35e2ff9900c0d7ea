"""The built-in estimators, with what each one targets and its exact expectation on a case.

The expectation is written in terms of a case's exact ratio moments (see ``reference_models.truth``):
``None`` where it is not known exactly (the control variate and the reverse estimator where the case
breaks their support assumption). The clamped production variants are held to k3's expectation, so
that the bias their clamps add shows.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

from torch import Tensor

from estimators import kl
from reference_models import KLCase

__all__ = ["EstimatorSpec", "ESTIMATORS", "UNBIASED", "get_estimator"]


@dataclass(frozen=True)
class EstimatorSpec:
    """A per-sample KL estimator ``fn(log_p, log_q)`` with its documented properties."""

    name: str
    fn: Callable[[Tensor, Tensor], Tensor]
    label: str
    target: str = "kl"  # "kl": KL(p‖q); "reverse_kl": KL(q‖p)
    uses_ratio: bool = False  # built on r = q/p: needs E_p[r] = 1 and has finite variance iff E_p[r²] < ∞
    expectation: Callable[[KLCase], float | None] = lambda case: case.moments.kl.value

    def target_value(self, case: KLCase) -> float:
        return getattr(case.moments, self.target).value

    def expected(self, case: KLCase) -> float | None:
        """The exact E[estimate] on ``case``, or None where it is not known exactly."""
        return self.expectation(case)


def _k3_expectation(case: KLCase) -> float:
    """E_p[(r − 1) − log r] = KL + E_p[r] − 1: exactly KL where q's support lies inside p's."""
    return case.moments.kl.value + case.moments.mean_r.value - 1


def _k3_family(case: KLCase) -> float | None:
    return case.moments.kl.value if case.support_ok else None


ESTIMATORS: dict[str, EstimatorSpec] = {s.name: s for s in [
    EstimatorSpec("k1", kl.k1, "k1 = −log r"),
    EstimatorSpec("k2", kl.k2, "k2 = (log r)²/2",
                  expectation=lambda c: c.moments.mean_log_r2.value / 2),
    EstimatorSpec("k3", kl.k3, "k3 = (r − 1) − log r", uses_ratio=True, expectation=_k3_expectation),
    EstimatorSpec("k1_cv", kl.k1_control_variate, "k1 + λ̂₋ᵢ(r − 1), leave-one-out λ", uses_ratio=True,
                  expectation=_k3_family),
    EstimatorSpec("reverse_kl", kl.reverse_kl, "r log r − (r − 1) → KL(q‖p)", target="reverse_kl",
                  uses_ratio=True,
                  expectation=lambda c: c.moments.reverse_kl.value if c.support_ok else None),
    # The production variants are meant to be k3: their clamps' bias is measured against k3's expectation.
    # Their clamps bound the estimate, so their variance is finite even where E_p[r²] is not.
    EstimatorSpec("verl_low_var_kl", kl.verl_low_var_kl, "verl low_var_kl (clamped k3)",
                  expectation=_k3_expectation),
    EstimatorSpec("openrlhf_k3", kl.openrlhf_k3, "OpenRLHF k3 (clamped to ±10)", expectation=_k3_expectation),
]}

#: The estimators that are unbiased for their target wherever their assumptions hold.
UNBIASED = ("k1", "k3", "k1_cv", "reverse_kl")


def get_estimator(name: str) -> EstimatorSpec:
    if name not in ESTIMATORS:
        raise ValueError(f"unknown estimator {name!r}; known: {', '.join(ESTIMATORS)}")
    return ESTIMATORS[name]
