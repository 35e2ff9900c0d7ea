"""The estimator catalog: one :class:`EstimatorSpec` per estimator, built-in or a user's, and its registry.

A spec says what an estimator is: its function, its form (what it is handed), its target, whether it is
unbiased for that target wherever its assumptions hold, and its exact expectation on a case. Studies,
gates and the report read everything about an estimator from here; no other module lists estimator
names. Forms:

- ``"token"``: ``fn(log_p, log_q) -> [same shape]``, a per-sample KL estimator; on a sequence case it is
  applied to every token and summed over the mask, as RLHF code applies its KL penalty (the case's
  token-level moments make the expectations below hold unchanged);
- ``"sequence"``: ``fn(log_p, log_q, mask) -> [B]`` on the per-token log-probs [B, T];
- ``"logits"``: ``fn(logits_p, logits_q, mask) -> [B]`` on both models' next-step logits (Rao-Blackwell);
- ``"log_weights"``: ``fn(log_w[..., K]) -> log p̂[...]``, an estimator of a log marginal likelihood.

The expectation of a KL estimator is written in terms of a case's exact ratio moments (see
``reference_models.truth``): ``None`` where it is not known exactly (the control variate and the reverse
estimator where the case breaks their support assumption). The clamped production variants are held to
k3's expectation, so that the bias their clamps add shows. A log-marginal estimator is biased: its
``theory`` gives its predicted bias to first and second order in 1/K where the case's moments allow.
"""
from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache
from typing import Callable

import torch
from torch import Tensor

from estimators import kl, marginal, sequence
from reference_models import SequenceSample, Truth
from reference_models.sequence_cases import enumerated_truth, expectation

from . import stats

__all__ = ["FORMS", "KL_FORMS", "KL_KINDS", "TARGETS", "EstimatorSpec", "ESTIMATORS", "register_estimator", "get_estimator",
           "estimator_names", "per_sample_estimates", "exact_moments"]

FORMS = ("token", "sequence", "logits", "log_weights")
KL_FORMS = FORMS[:3]  # the forms of KL estimators
KL_KINDS = ("kl", "sequence")  # the kinds of case a KL estimator runs on
TARGETS = ("kl", "reverse_kl", "log_marginal")

_ARGUMENTS = {"token": ("log_p", "log_q"), "sequence": ("log_p", "log_q", "mask"),
              "logits": ("logits_p", "logits_q", "mask"), "log_weights": ("log_w",)}


@dataclass(frozen=True)
class EstimatorSpec:
    """An estimator ``fn`` in one of :data:`FORMS`, with its target and documented properties.

    ``unbiased``: unbiased for ``target`` wherever its assumptions hold; ``uses_ratio``: built on
    r = q/p, so it needs E_p[r] = 1 and has finite variance iff E_p[r²] < ∞; ``couples_samples``: mixes the
    samples of one estimate (leave-one-out λ), so it has no per-token use; ``expectation(case)``: its exact
    E[estimate] (default: the target's value for a KL estimator, unknown for a log-marginal one);
    ``clamps``: the estimator a production variant clamps; ``enumerated``: the gate sizes its cells on a
    sequence case from its exact per-sequence kurtosis (:func:`exact_moments`); ``min_k``: the fewest weights a log-marginal
    estimator takes; ``theory(case, K)``: its predicted bias to (first, second) order, None where the case
    lacks the moments."""

    name: str
    fn: Callable[..., Tensor]
    label: str = ""
    form: str = "token"
    target: str | None = None  # default: "log_marginal" for the form "log_weights", else "kl"
    unbiased: bool = False
    uses_ratio: bool = False
    couples_samples: bool = False
    expectation: Callable[[object], float | None] | None = None
    clamps: str | None = None
    enumerated: bool = False
    min_k: int = 1
    theory: Callable[[object, int], tuple[float, float] | None] | None = None

    def __post_init__(self):
        if not isinstance(self.name, str) or not self.name:
            raise ValueError(f"name must be a non-empty string, got {self.name!r}")
        if not callable(self.fn):
            raise ValueError(f"fn of {self.name!r} must be callable, got {type(self.fn).__name__}")
        if self.form not in FORMS:
            raise ValueError(f"form must be one of {', '.join(FORMS)}, got {self.form!r}")
        if self.target is None:
            object.__setattr__(self, "target", "log_marginal" if self.form == "log_weights" else "kl")
        if self.target not in TARGETS:
            raise ValueError(f"target must be one of {', '.join(TARGETS)}, got {self.target!r}")
        stats.positive_int("min_k", self.min_k)

    def applies(self, case) -> bool:
        """Whether the estimator can run on ``case`` at all."""
        if (case.kind == "marginal") != (self.form == "log_weights"):
            return False
        if case.kind == "sequence":
            return not self.couples_samples
        return case.kind == "marginal" or self.form == "token"

    def target_truth(self, case):
        """The exact value this estimator targets on ``case`` (a Truth)."""
        return case.log_marginal if self.target == "log_marginal" else getattr(case.moments, self.target)

    def target_value(self, case) -> float:
        return self.target_truth(case).value

    def assumptions_broken(self, case) -> tuple[str, ...]:
        """The keys of ``case.breaks`` that concern this estimator: all of them for one built on r = q/p; only
        the support for a production variant that clamps one (its clamp keeps its variance finite)."""
        if self.uses_ratio:
            return tuple(case.breaks)
        clamped_ratio = self.clamps is not None and get_estimator(self.clamps).uses_ratio
        return tuple(k for k in case.breaks if k == "support") if clamped_ratio else ()

    def expected(self, case) -> float | None:
        """The exact E[estimate] on ``case``, or None where it is not known exactly."""
        if self.expectation is not None:
            return self.expectation(case)
        return None if self.target == "log_marginal" else self.target_value(case)


def _k3_expectation(case) -> float:
    """E_p[(r − 1) − log r] = KL + E_p[r] − 1: exactly KL where q's support lies inside p's."""
    return case.moments.kl.value + case.moments.mean_r.value - 1


def _k3_family(case) -> float | None:
    return case.moments.kl.value if case.support_ok else None


def _rao_blackwell(logits_p, logits_q, mask):
    """Bernoulli logits [B, D] or categorical logits [B, T, V]."""
    if logits_p.dim() == 2:
        return sequence.bernoulli_rao_blackwell_kl(logits_p, logits_q, mask)
    return sequence.rao_blackwell_kl(logits_p, logits_q, mask)


def _log_mean_exp_theory(case, K: int) -> tuple[float, float] | None:
    """The delta method: −μ₂/(2K), and the second-order term with μ₃ (Nowozin 2018)."""
    m = case.weight_moments
    if m is None:
        return None
    return (marginal.delta_method_bias(m.mu.value, m.mu2.value, K),
            marginal.delta_method_bias(m.mu.value, m.mu2.value, K, m.mu3.value))


def _jackknife1_theory(case, K: int) -> tuple[float, float] | None:
    """With E[L_m] − log p = b₁/m + b₂/m², K·b(K) − (K−1)·b(K−1) = −b₂/(K(K−1))."""
    at_one = _log_mean_exp_theory(case, 1)  # at K = 1 the second-order term is b₂ itself
    return None if at_one is None else (0.0, -(at_one[1] - at_one[0]) / (K * (K - 1)))


ESTIMATORS: dict[str, EstimatorSpec] = {}


def register_estimator(spec: EstimatorSpec) -> EstimatorSpec:
    """Add ``spec`` to the catalog, where every study, gate and report finds it (a name is never reused)."""
    if not isinstance(spec, EstimatorSpec):
        raise ValueError(f"spec must be an EstimatorSpec, got {type(spec).__name__}")
    if spec.name in ESTIMATORS:
        raise ValueError(f"estimator {spec.name!r} is already registered")
    ESTIMATORS[spec.name] = spec
    return spec


for _spec in [
    EstimatorSpec("k1", kl.k1, "k1 = −log r", unbiased=True, enumerated=True),
    EstimatorSpec("k2", kl.k2, "k2 = (log r)²/2", expectation=lambda c: c.moments.mean_log_r2.value / 2),
    EstimatorSpec("k3", kl.k3, "k3 = (r − 1) − log r", unbiased=True, uses_ratio=True, expectation=_k3_expectation,
                  enumerated=True),
    EstimatorSpec("k1_cv", kl.k1_control_variate, "k1 + λ̂₋ᵢ(r − 1), leave-one-out λ", unbiased=True,
                  uses_ratio=True, expectation=_k3_family, couples_samples=True),
    EstimatorSpec("reverse_kl", kl.reverse_kl, "r log r − (r − 1) → KL(q‖p)", target="reverse_kl", unbiased=True,
                  uses_ratio=True, expectation=lambda c: c.moments.reverse_kl.value if c.support_ok else None),
    # The production variants are meant to be k3: their clamps' bias is measured against k3's expectation.
    # Their clamps bound the estimate, so their variance is finite even where E_p[r²] is not.
    EstimatorSpec("verl_low_var_kl", kl.verl_low_var_kl, "verl low_var_kl (clamped k3)",
                  expectation=_k3_expectation, clamps="k3"),
    EstimatorSpec("openrlhf_k3", kl.openrlhf_k3, "OpenRLHF k3 (clamped to ±10)", expectation=_k3_expectation,
                  clamps="k3"),
    # Sequence-only forms.
    EstimatorSpec("seq_k3", sequence.sequence_k3, "k3 of the whole-sequence ratio R = Π r_t", form="sequence",
                  unbiased=True, uses_ratio=True, expectation=_k3_family, enumerated=True),
    EstimatorSpec("rao_blackwell", _rao_blackwell, "Σ_t KL(p(·|x_<t) ‖ q(·|x_<t)), Rao-Blackwellized",
                  form="logits", unbiased=True, enumerated=True),
    # Log-marginal estimators from K importance weights.
    EstimatorSpec("log_mean_exp", marginal.log_mean_exp, "log (1/K) Σ w_k (IWAE)", form="log_weights",
                  theory=_log_mean_exp_theory),
    EstimatorSpec("elbo", marginal.elbo, "(1/K) Σ log w_k (ELBO)", form="log_weights",
                  theory=lambda case, K: None if case.elbo_gap is None else (case.elbo_gap.value,) * 2),
    EstimatorSpec("jackknife1", lambda log_w: marginal.jackknife_log_mean_exp(log_w, 1),
                  "first-order jackknife of log-mean-exp", form="log_weights", min_k=2, theory=_jackknife1_theory),
    EstimatorSpec("jackknife2", lambda log_w: marginal.jackknife_log_mean_exp(log_w, 2),
                  "second-order jackknife of log-mean-exp", form="log_weights", min_k=3,
                  theory=lambda case, K: (0.0, 0.0)),  # bias O(K^-3): below both orders
]:
    register_estimator(_spec)


def get_estimator(name: str) -> EstimatorSpec:
    if name not in ESTIMATORS:
        raise ValueError(f"unknown estimator {name!r}; known: {', '.join(ESTIMATORS)}")
    return ESTIMATORS[name]


def estimator_names(*forms: str, unbiased: bool | None = None) -> list[str]:
    """Registered names in order, of the given forms (default: all), optionally only the (un)biased ones."""
    return [n for n, s in ESTIMATORS.items()
            if (not forms or s.form in forms) and (unbiased is None or s.unbiased == unbiased)]


def per_sample_estimates(spec: EstimatorSpec, sample, timeout: float | None = None, finite: bool = True) -> Tensor:
    """The estimate of every sample, float64 on the CPU: ``spec.fn`` on a ``PairSample``, on a
    ``SequenceSample`` (one estimate per sequence [B]; a token-form estimate is summed where the mask is
    set, its outputs at padded positions discarded) or on log-weights ``[..., K]`` (one per row). Any
    failure of the call, a wrong shape or (with ``finite``) a non-finite value is a ``stats.Finding``."""
    names = _ARGUMENTS[spec.form]
    if spec.form == "log_weights":
        args, shape = (sample,), sample.shape[:-1]
    elif not isinstance(sample, SequenceSample):
        args, shape = tuple(sample), sample[0].shape
    else:
        args = tuple(getattr(sample, n) for n in names)
        shape = sample.log_p.shape if spec.form == "token" else sample.mask.shape[:1]
    out = stats.evaluate(spec.fn, args, names, tuple(shape), timeout, finite=False)
    if isinstance(sample, SequenceSample) and spec.form == "token":
        out = torch.where(sample.mask, out, 0.0).sum(-1)
    return stats.require_finite(out) if finite else out


@lru_cache(maxsize=None)
def exact_moments(spec: EstimatorSpec, case) -> dict[str, Truth]:
    """The exact mean, variance and 4th central moment (``"mean"``, ``"var"``, ``"m4"``) of the estimator's
    per-sequence estimate on a sequence case: the estimator applied to every enumerated sequence in float64,
    weighted by p(x) (states p cannot produce never contribute). Computed once per spec and case."""
    sample, w = case.enumeration()
    v = per_sample_estimates(spec, sample, finite=False)
    truth = lambda value, what: enumerated_truth(w, value, f"{w.numel()} sequences in float64: {what} of {spec.name}")
    mean = expectation(w, v)
    c = v - mean
    return dict(mean=truth(mean, "E_p of the per-sequence estimate"), var=truth(expectation(w, c * c), "Var_p"),
                m4=truth(expectation(w, c ** 4), "4th central moment"))
