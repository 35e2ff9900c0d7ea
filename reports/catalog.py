"""The built-in estimators, with what each one targets and its exact expectation on a case.

The expectation is written in terms of a case's exact ratio moments (see ``reference_models.truth``):
``None`` where it is not known exactly (the control variate and the reverse estimator where the case
breaks their support assumption). The clamped production variants are held to k3's expectation, so
that the bias their clamps add shows.

On a sequence case (``reference_models.sequence_cases``) an estimator has one of three forms:
``"token"``, a per-sample function ``fn(log_p, log_q)`` applied to every token and summed over the mask
(how RLHF code applies its KL penalty; the case's token-level moments make the expectations above
hold unchanged); ``"sequence"``, ``fn(log_p, log_q, mask) -> [B]`` on the per-token log-probs [B, T]; and
``"logits"``, ``fn(logits_p, logits_q, mask) -> [B]`` on both models' next-step logits (Rao-Blackwell).
The last two exist only for sequences.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

from torch import Tensor

import torch

from estimators import kl, sequence
from reference_models import KLCase
from reference_models.sequence_cases import SequenceKLCase, SequenceSample

__all__ = ["EstimatorSpec", "ESTIMATORS", "UNBIASED", "get_estimator", "FORMS", "per_sample_estimates",
           "EstimateShapeError"]

FORMS = ("token", "sequence", "logits")


@dataclass(frozen=True)
class EstimatorSpec:
    """A per-sample KL estimator ``fn(log_p, log_q)`` with its documented properties."""

    name: str
    fn: Callable[[Tensor, Tensor], Tensor]
    label: str
    target: str = "kl"  # "kl": KL(p‖q); "reverse_kl": KL(q‖p)
    uses_ratio: bool = False  # built on r = q/p: needs E_p[r] = 1 and has finite variance iff E_p[r²] < ∞
    expectation: Callable[[KLCase], float | None] = lambda case: case.moments.kl.value
    form: str = "token"  # see the module docstring
    couples_samples: bool = False  # mixes the samples of one estimate (leave-one-out λ): no per-token use
    clamps: str | None = None  # a production variant: the estimator whose estimates it clamps

    def applies(self, case: KLCase) -> bool:
        """Whether the estimator can run on ``case`` at all."""
        if isinstance(case, SequenceKLCase):
            return not self.couples_samples
        return self.form == "token"

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
                  expectation=_k3_family, couples_samples=True),
    EstimatorSpec("reverse_kl", kl.reverse_kl, "r log r − (r − 1) → KL(q‖p)", target="reverse_kl",
                  uses_ratio=True,
                  expectation=lambda c: c.moments.reverse_kl.value if c.support_ok else None),
    # The production variants are meant to be k3: their clamps' bias is measured against k3's expectation.
    # Their clamps bound the estimate, so their variance is finite even where E_p[r²] is not.
    EstimatorSpec("verl_low_var_kl", kl.verl_low_var_kl, "verl low_var_kl (clamped k3)",
                  expectation=_k3_expectation, clamps="k3"),
    EstimatorSpec("openrlhf_k3", kl.openrlhf_k3, "OpenRLHF k3 (clamped to ±10)", expectation=_k3_expectation,
                  clamps="k3"),
    # Sequence-only forms.
    EstimatorSpec("seq_k3", sequence.sequence_k3, "k3 of the whole-sequence ratio R = Π r_t", uses_ratio=True,
                  expectation=_k3_family, form="sequence"),
    EstimatorSpec("rao_blackwell", lambda logits_p, logits_q, mask: _rao_blackwell(logits_p, logits_q, mask),
                  "Σ_t KL(p(·|x_<t) ‖ q(·|x_<t)), Rao-Blackwellized", form="logits"),
]}

#: The estimators that are unbiased for their target wherever their assumptions hold.
UNBIASED = ("k1", "k3", "k1_cv", "reverse_kl", "seq_k3", "rao_blackwell")


def _rao_blackwell(logits_p, logits_q, mask):
    """Bernoulli logits [B, D] or categorical logits [B, T, V]."""
    if logits_p.dim() == 2:
        return sequence.bernoulli_rao_blackwell_kl(logits_p, logits_q, mask)
    return sequence.rao_blackwell_kl(logits_p, logits_q, mask)


class EstimateShapeError(ValueError):
    """An estimator returned something other than one estimate per sample."""


def per_sample_estimates(fn: Callable, form: str, draw) -> torch.Tensor:
    """The estimate of every sample of ``draw``: ``fn(log_p, log_q)`` on a pair of log-prob tensors, or, on a
    :class:`SequenceSample`, one estimate per sequence [B] in ``form``: a token-form estimate is summed where
    the mask is set (its outputs at padded positions are discarded). A ValueError says so when
    ``fn`` returns anything but a tensor of the expected shape."""
    if not isinstance(draw, SequenceSample):
        out, shape = fn(*draw), draw[0].shape
    elif form == "sequence":
        out, shape = fn(draw.log_p, draw.log_q, draw.mask), draw.mask.shape[:1]
    elif form == "logits":
        out, shape = fn(draw.logits_p, draw.logits_q, draw.mask), draw.mask.shape[:1]
    else:
        out, shape = fn(draw.log_p, draw.log_q), draw.log_p.shape
    if not isinstance(out, torch.Tensor) or out.shape != shape:
        got = tuple(out.shape) if isinstance(out, torch.Tensor) else type(out).__name__
        raise EstimateShapeError(f"returned {got}, expected per-sample estimates of shape {tuple(shape)}")
    if isinstance(draw, SequenceSample) and form == "token":
        return torch.where(draw.mask, out, torch.zeros((), dtype=out.dtype)).sum(-1)
    return out


def get_estimator(name: str) -> EstimatorSpec:
    if name not in ESTIMATORS:
        raise ValueError(f"unknown estimator {name!r}; known: {', '.join(ESTIMATORS)}")
    return ESTIMATORS[name]
