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
- ``"log_weights"``: ``fn(log_w[..., K]) -> log p̂[...]``, an estimator of a log marginal likelihood;
- ``"loss"``: ``fn(log_p, log_q, log_p_old, mask) -> loss[B]``, a KL loss whose expected gradient should be
  ∇θ KL(p_θ‖q) (``estimators.kl_losses``), run on the gradient cases by ``reports.grad_gate``.

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

from estimators import kl, kl_losses, marginal, sequence
from reference_models import SequenceSample, Truth
from reference_models.sequence_cases import enumerated_truth, expectation

from . import stats
from .usercode import UserCodeFailure, call_user

__all__ = ["FORMS", "KL_FORMS", "KL_KINDS", "TARGETS", "EstimatorSpec", "ESTIMATORS", "register_estimator", "get_estimator",
           "estimator_names", "per_sample_estimates", "per_sample_gradients", "exact_gradient_kurtosis", "exact_moments"]

FORMS = ("token", "sequence", "logits", "log_weights", "loss")
KL_FORMS = FORMS[:3]  # the forms of KL estimators
KL_KINDS = ("kl", "sequence")  # the kinds of case a KL estimator runs on
TARGETS = ("kl", "reverse_kl", "log_marginal", "grad_kl")

_ARGUMENTS = {"token": ("log_p", "log_q"), "sequence": ("log_p", "log_q", "mask"),
              "logits": ("logits_p", "logits_q", "mask"), "log_weights": ("log_w",),
              "loss": ("log_p", "log_q", "log_p_old", "mask")}


@dataclass(frozen=True)
class EstimatorSpec:
    """An estimator ``fn`` in one of :data:`FORMS`, with its target and documented properties.

    ``unbiased``: unbiased for ``target`` wherever its assumptions hold; ``uses_ratio``: built on
    r = q/p, so it needs E_p[r] = 1 and has finite variance iff E_p[r²] < ∞; ``couples_samples``: mixes the
    samples of one estimate (leave-one-out λ), so it has no per-token use; ``expectation(case)``: its exact
    E[estimate] (default: the target's value for a KL estimator, unknown for a log-marginal one);
    ``clamps``: the estimator a production variant clamps; ``enumerated``: the gates size its cells on a
    sequence or enumerable gradient case from its exact kurtosis (:func:`exact_moments`,
    :func:`exact_gradient_kurtosis`) instead of a pilot's tail estimate; ``min_k``: the fewest weights a log-marginal
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
            object.__setattr__(self, "target", {"log_weights": "log_marginal", "loss": "grad_kl"}.get(self.form, "kl"))
        if self.target not in TARGETS:
            raise ValueError(f"target must be one of {', '.join(TARGETS)}, got {self.target!r}")
        stats.positive_int("min_k", self.min_k)

    def applies(self, case) -> bool:
        """Whether the estimator can run on ``case`` at all."""
        if (case.kind == "marginal") != (self.form == "log_weights") or (case.kind == "gradient") != (self.form == "loss"):
            return False
        if case.kind == "sequence":
            return not self.couples_samples
        return case.kind in ("marginal", "gradient") or self.form == "token"

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


# KL losses: the expected gradient E_{x~p_old}[∇θ loss] against ∇θ KL(p_θ‖q). ``unbiased``: on- and off-policy.
for _name, _label in [
    ("k1_loss", "Σ k1_t as a loss"), ("k2_loss", "Σ k2_t as a loss"), ("k3_loss", "Σ k3_t as a loss (GRPO, TRL)"),
    ("low_var_kl_loss", "verl low_var_kl as a loss"), ("k3_k2_straight_through", "k3 value, k2 gradient (OpenRLHF #1101)"),
    ("k1_reward_per_token", "REINFORCE, per-token k1 reward"), ("k1_reward_to_go", "REINFORCE, k1 return to go"),
    ("k1_reward_sequence", "REINFORCE, whole-sequence k1"), ("k2_sequence_loss", "whole-sequence k2 as a loss"),
    ("is_k3_detached", "sg(p_t/p_old,t)·k3_t (OpenRLHF #1309)"), ("is_k3_token", "(p_t/p_old,t)·k3_t (DeepSeek-V3.2)"),
    ("is_reinforce", "w·sg(Σ k1_t), w = p/p_old"), ("is_k2_sequence", "sg(w)·(Σ k1_t)²/2"),
    ("is_k3_sequence", "w·Σ k3_t"),
]:
    register_estimator(EstimatorSpec(_name, getattr(kl_losses, _name), _label, form="loss", enumerated=True,
                                     unbiased=_name in ("is_reinforce", "is_k2_sequence", "is_k3_sequence")))


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


def _loss_gradient(outputs: tuple[Tensor, Tensor]) -> Tensor | None:
    loss, log_p = outputs
    return torch.autograd.grad(loss.sum(), log_p, allow_unused=True)[0] if loss.requires_grad else None


def per_sample_gradients(spec: EstimatorSpec, sample, timeout: float | None = None) -> tuple[Tensor, Tensor]:
    """A loss's gradient projected on the case's directions, per sample, float64 [B, K]:
    d_k = Σ_t ∂loss/∂log p_t · jvp_t,k (the gradient of Σ_b loss_b, so a loss that couples the batch's samples
    is measured as the batch-mean loss it is), and a = Σ_t |∂loss/∂log p_t| · max_k |jvp_t,k|, the scale of its
    rounding. The loss call and its backward pass are user code (``call_user``); a wrong shape, a non-finite loss
    or gradient is a ``stats.Finding``. A loss that does not depend on ``log_p`` has gradient 0."""
    log_p = sample.log_p.detach().clone().requires_grad_(True)
    args = (log_p, sample.log_q, sample.log_p_old, sample.mask)
    with torch.enable_grad():
        loss = stats.evaluate(spec.fn, args, _ARGUMENTS["loss"], tuple(sample.mask.shape[:1]), timeout,
                              keep_graph=True)
        try:
            grad = call_user(_loss_gradient, ((loss, log_p),), names=("backward",), timeout=timeout)
        except UserCodeFailure as err:
            raise stats.Finding(f"its backward pass {err}") from err
    s = torch.zeros_like(sample.log_p, dtype=torch.float64) if grad is None else grad.detach().double()
    stats.require_finite(s)
    return torch.einsum("bt,btk->bk", s, sample.jvp), (s.abs() * sample.jvp.abs().amax(-1)).sum(-1)


@lru_cache(maxsize=None)
def exact_gradient_kurtosis(spec: EstimatorSpec, case) -> float | None:
    """The exact kurtosis κ = μ₄/σ⁴ of a loss's projected gradients d_0 and d_1 (the larger) under p_old, over a
    gradient case's enumeration (its log-probs rounded to float32, as the gate hands them); None where the case
    has no enumeration or a variance is 0."""
    enumerated = case.enumeration()
    if enumerated is None:
        return None
    sample, w = enumerated
    d, _ = per_sample_gradients(spec, sample.to(torch.float32))
    kappas = []
    for k in (0, 1):
        c = d[:, k] - expectation(w, d[:, k])
        var = expectation(w, c * c)
        if var <= 0:
            return None
        kappas.append(expectation(w, c ** 4) / var ** 2)
    return max(kappas)


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
