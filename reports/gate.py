"""The gate: is an estimator unbiased on every KL case, within a stated false-alarm rate?

For each (estimator, case) cell the gate draws N samples x ~ p (seeded from (seed, case), shared by all
estimators of one run), applies the estimator and z-tests its mean against the exact expectation:

    z = (mean − expected) / (sd / √N),   caught when |z| > z_crit = Φ⁻¹(1 − α / 2m)

with α the false-alarm rate of the whole run and m the number of cells tested (Bonferroni). The
``detectable`` column is the relative bias the cell detects with probability ``power``:
(z_crit + z_power)·SE / |expected|. A z-test means something only where the estimator's variance is
finite, so a cell is *unverifiable* (not failed, not passed) where the case proves E_p[(q/p)²] = ∞ for a
ratio-based built-in estimator, or where the Pareto k̂ of the estimates' tail is ≥ ``khat_max`` (not
diagnosed on a finite support, where every finite estimate has finite variance).
Where a case breaks the support assumption (E_p[q/p] < 1) and the estimate is k1 + c·(r − 1) plus an
unbiased rest (k3: c = 1; the control variates: c = λ), its bias c·(E_p[q/p] − 1) is reported as the
case's *assumption* rather than as the estimator's failure. Where E_p[(q/p)²] = ∞, an estimate that
adds a heavy-tailed term to k1 (Pareto k̂ of v − k1 ≥ ``khat_max``, as r − 1 has) is *unverifiable*: its sample mean cannot be
trusted, whether or not it is right. Any non-finite output, an exception
or a wrong output shape is caught outright.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable

import numpy as np
import pandas as pd
import torch
from scipy import stats

from estimators.diagnostics import pareto_khat
from reference_models import KLCase, case_names, get_case

from .catalog import ESTIMATORS, EstimatorSpec
from .study import chunk_seed, draw_log_probs

__all__ = ["GateConfig", "GateEntry", "GateResult", "run_gate", "entry_from_spec", "builtin_entries", "HOLDS", "CAUGHT",
           "UNVERIFIABLE", "ASSUMPTION", "SKIPPED"]

HOLDS, CAUGHT, UNVERIFIABLE, ASSUMPTION, SKIPPED = "holds", "caught", "unverifiable", "assumption", "skipped"


@dataclass(frozen=True)
class GateConfig:
    """``alpha``: false-alarm rate of one gate run (all cells together); ``budget``: samples × event
    elements drawn per case; ``rel_bias`` and ``power``: the detection target the run is sized against."""

    seed: int = 0
    alpha: float = 1e-4
    budget: int = 2 ** 22
    rel_bias: float = 0.02
    power: float = 0.9
    khat_max: float = 0.5
    dtype: torch.dtype = torch.float32  # the log-probs an estimator is given, as RLHF code has them

    def __post_init__(self):
        if not 0 < self.alpha < 1:
            raise ValueError(f"alpha must be in (0, 1), got {self.alpha}")
        if self.budget < 2 ** 10:
            raise ValueError(f"budget must be at least 1024 samples, got {self.budget}")
        if not 0 < self.power < 1:
            raise ValueError(f"power must be in (0, 1), got {self.power}")


@dataclass(frozen=True)
class GateEntry:
    """An estimator to gate: ``fn(log_p, log_q)`` and its exact expectation on a case (None: not known)."""

    name: str
    fn: Callable
    expected: Callable[[KLCase], float | None] = lambda case: case.moments.kl.value
    uses_ratio: bool = False  # known to be built on r = q/p (built-ins only; user estimators get k̂)


def entry_from_spec(spec: EstimatorSpec) -> GateEntry:
    """Gate a built-in estimator against its own exact expectation."""
    return GateEntry(spec.name, spec.fn, spec.expected, spec.uses_ratio)


@dataclass
class GateResult:
    frame: pd.DataFrame
    config: GateConfig

    def caught(self, name: str | None = None) -> pd.DataFrame:
        rows = self.frame[self.frame.verdict == CAUGHT]
        return rows if name is None else rows[rows.estimator == name]

    def holds(self, name: str | None = None) -> bool:
        """No cell caught (for one estimator, or for all)."""
        return self.caught(name).empty

    def table(self) -> str:
        cols = ["estimator", "case", "verdict", "expected", "mean", "rel_bias", "z", "detectable", "khat", "reason"]
        with pd.option_context("display.max_colwidth", 90, "display.width", 250):
            return self.frame[cols].to_string(index=False, float_format=lambda v: f"{v:.4g}")


def run_gate(entries: list[GateEntry], cases: list[str] | None = None,
             config: GateConfig = GateConfig()) -> GateResult:
    """Gate every entry on every case (default: all registered KL cases)."""
    if not entries:
        raise ValueError("entries must hold at least one estimator")
    built = [get_case(c) for c in (cases or case_names())]
    plan = [(e, c, e.expected(c)) for e in entries for c in built]
    m = sum(1 for _, _, exp in plan if exp is not None and math.isfinite(exp))
    z_crit = float(stats.norm.isf(config.alpha / (2 * max(m, 1))))
    z_power = float(stats.norm.isf(1 - config.power))
    samples = {}
    rows = []
    for entry, case, expected in plan:
        if case.name not in samples:
            size = max(2 ** 10, config.budget // max(1, math.prod(case.p.event_shape)))
            lp, lq = draw_log_probs(case, size, chunk_seed(config.seed, "gate", case.name))
            samples[case.name] = lp.to(config.dtype), lq.to(config.dtype)
        rows.append(_cell(entry, case, expected, *samples[case.name], z_crit, z_power, config))
    return GateResult(pd.DataFrame(rows), config)


def _cell(entry, case, expected, log_p, log_q, z_crit, z_power, config) -> dict:
    row = dict(estimator=entry.name, case=case.name, n=log_p.shape[0], expected=expected, mean=np.nan,
               rel_bias=np.nan, z=np.nan, z_crit=z_crit, detectable=np.nan, khat=np.nan)

    def verdict(v, reason):
        return {**row, "verdict": v, "reason": reason}

    if expected is None or not math.isfinite(expected):
        return verdict(SKIPPED, "no exact finite expectation on this case")
    try:
        out = entry.fn(log_p, log_q)
    except Exception as err:  # a user's estimator may raise anything: that is a finding, not a crash
        return verdict(CAUGHT, f"raised {type(err).__name__}: {err}")
    log_p, log_q = log_p.double(), log_q.double()
    if not isinstance(out, torch.Tensor) or out.shape != log_p.shape:
        shape = tuple(out.shape) if isinstance(out, torch.Tensor) else type(out).__name__
        return verdict(CAUGHT, f"returned {shape}, expected per-sample estimates of shape {tuple(log_p.shape)}")
    v = out.detach().double()
    bad = int((~torch.isfinite(v)).sum())
    if bad:
        return verdict(CAUGHT, f"{bad} non-finite estimates out of {v.numel()}")
    n = v.numel()
    mean, sd = float(v.mean()), float(v.std())
    se = sd / math.sqrt(n)
    bias = mean - expected
    scale = max(abs(expected), 1e-12)
    # A bias below the rounding error of the log-probs in the gate's dtype is no evidence of anything.
    tol = 2 * torch.finfo(config.dtype).eps * float((log_p.abs() + log_q.abs()).mean())
    z = 0.0 if abs(bias) <= tol else (bias / se if se > 0 else math.copysign(math.inf, bias))
    # On a finite support every finite-valued estimator has finite variance: no tail to diagnose.
    khat = math.nan if case.finite_support else pareto_khat(v, tail="both")
    row.update(mean=mean, rel_bias=bias / scale, z=z, detectable=(z_crit + z_power) * se / scale, khat=khat)
    if entry.uses_ratio and not case.ratio_variance_finite:
        return verdict(UNVERIFIABLE, case.breaks["ratio_variance"])
    if not case.finite_support and khat >= config.khat_max:
        return verdict(UNVERIFIABLE, f"tail too heavy: Pareto k̂ = {khat:.2f} ≥ {config.khat_max}, the variance is "
                                     "likely infinite and a z-test meaningless")
    if abs(z) <= z_crit:
        return verdict(HOLDS, f"|z| = {abs(z):.2f} ≤ {z_crit:.2f}")
    if not case.support_ok:
        c = _ratio_cv_coefficient(v, log_p, log_q, expected, case.truth.value, z_crit)
        if c is not None:
            return verdict(ASSUMPTION, f"the estimate is k1 + c·(r − 1) with c = {c:.3g}, biased by "
                                       f"c·(E_p[q/p] − 1) = {c * (case.moments.mean_r.value - 1):+.4g} because q has "
                                       "mass outside p's support (E_p[q/p] < 1)")
    if not case.ratio_variance_finite:
        extra = v + (log_q - log_p)  # v − k1: what the estimate adds to k1
        k_extra = pareto_khat(extra, tail="both") if float(extra.abs().max()) > tol else -math.inf
        if k_extra >= config.khat_max:
            return verdict(UNVERIFIABLE, f"what the estimate adds to k1 is heavy-tailed (Pareto k̂ = {k_extra:.2f}), as "
                                         f"any function of r = q/p is here: {case.moments.mean_r2.note}")
    return verdict(CAUGHT, f"bias {bias:+.4g} ({bias / scale:+.2%} of {expected:.4g}), |z| = {abs(z):.1f} > "
                           f"{z_crit:.2f}")


def _ratio_cv_coefficient(v, log_p, log_q, expected: float, kl: float, z_crit: float) -> float | None:
    """c if ``v − k1 − c·(r − 1)`` (c fitted by least squares) is unbiased for ``expected − KL``, else None.

    Then ``v`` is the control-variate estimator k1 + c(r − 1), unbiased only where E_p[r − 1] = 0: on a
    case that breaks that, its bias c·(E_p[r] − 1) is the case's doing, not a bug."""
    log_r = (log_q - log_p).double()
    cv = torch.expm1(log_r)
    d = v + log_r  # v − k1
    c = float((d * cv).sum() / (cv * cv).sum())
    rest = d - c * cv
    se = float(rest.std()) / math.sqrt(rest.numel())
    # 1e-4·KL absorbs the O(1/N) coupling of a leave-one-out λ with its own sample.
    return c if abs(float(rest.mean()) - (expected - kl)) <= z_crit * se + 1e-4 * abs(kl) else None


def builtin_entries(names=None) -> list[GateEntry]:
    return [entry_from_spec(ESTIMATORS[n]) for n in (names or ESTIMATORS)]
