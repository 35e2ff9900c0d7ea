"""The gate: is an estimator unbiased on every KL case, within a stated false-alarm rate?

For each (estimator, case) cell the gate streams samples x ~ p in chunks (chunk i seeded from
(seed, case, i), shared by all estimators of one run), applies the estimator to each chunk and z-tests
the mean of all its estimates against the exact expectation:

    z = (mean − expected) / (sd / √N),   caught when |z| > z_crit = Φ⁻¹(1 − α / 2m)

with α the false-alarm rate of the whole run and m the number of cells tested (Bonferroni).

**Sized for power.** The first chunk is a pilot: from its standard deviation σ̂ the cell takes
N = ((z_crit + z_power)·σ̂ / (rel_bias·|expected|))² samples, so that a relative bias of ``rel_bias``
(2%) is caught with probability ``power`` (0.9), up to ``max_budget`` samples × event elements. The
``detectable`` column is the relative bias the cell detects with that probability,
(z_crit + z_power)·SE / |expected|: above 2% only where the cap binds, and the table shows it.

**Validity conditions.** A z-test means something only where the estimator's variance is finite, so a
cell is *unverifiable* (not failed, not passed) where the case proves E_p[(q/p)²] = ∞ for a ratio-based
built-in estimator, or where the Pareto k̂ of the pilot's estimates is ≥ ``khat_max`` (not diagnosed on a
single categorical draw, where every finite estimate is bounded; diagnosed on sequences, whose support is
finite too but whose ratios span orders of magnitude, so that the CLT needs far more samples than the test). Where a case breaks the support
assumption (E_p[q/p] < 1) and the estimate is k1 + c·(r − 1) plus an unbiased rest (k3: c = 1; the
control variates: c = λ), its bias c·(E_p[q/p] − 1) is reported as the case's *assumption* rather than
as the estimator's failure. Where E_p[(q/p)²] = ∞, an estimate that adds a heavy-tailed term to k1
(Pareto k̂ of the pilot's v − k1 ≥ ``khat_max``, as r − 1 has) is *unverifiable*: its sample mean cannot
be trusted, whether or not it is right, even where its own k̂ looks harmless (the 100-dimensional pair). Any non-finite output, an exception or a wrong output shape is caught.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Callable

import numpy as np
import pandas as pd
import torch
from scipy import stats
from tqdm.auto import tqdm

from estimators.diagnostics import pareto_khat
from reference_models import KLCase, SequenceSample, case_names, get_case

from .catalog import ESTIMATORS, KL_KINDS, EstimateShapeError, EstimatorSpec, exact_moments, per_sample_estimates
from .study import chunk_seed, draw

__all__ = ["GateConfig", "GateEntry", "GateResult", "run_gate", "entry_from_spec", "builtin_entries", "HOLDS",
           "CAUGHT", "UNVERIFIABLE", "ASSUMPTION", "SKIPPED"]

HOLDS, CAUGHT, UNVERIFIABLE, ASSUMPTION, SKIPPED = "holds", "caught", "unverifiable", "assumption", "skipped"
#: A built-in's estimates on a sequence case, whose kurtosis κ is exact, are tested with N ≥ CLT_FACTOR·κ,
#: so that the excess kurtosis of their mean, (κ − 3)/N, is below 1/CLT_FACTOR.
CLT_FACTOR = 100


@dataclass(frozen=True)
class GateConfig:
    """``alpha``: false-alarm rate of one gate run (all cells together); ``rel_bias`` and ``power``: the
    bias each cell is sized to detect and the probability of detecting it; ``chunk``: samples × event
    elements per chunk (the first is the pilot); ``max_budget``: the cap per cell, in the same units."""

    seed: int = 0
    alpha: float = 1e-4
    rel_bias: float = 0.02
    power: float = 0.9
    khat_max: float = 0.5
    chunk: int = 2 ** 21
    max_budget: int = 2 ** 26
    dtype: torch.dtype = torch.float32  # the log-probs an estimator is given, as RLHF code has them

    def __post_init__(self):
        if not 0 < self.alpha < 1:
            raise ValueError(f"alpha must be in (0, 1), got {self.alpha}")
        if not 0 < self.power < 1:
            raise ValueError(f"power must be in (0, 1), got {self.power}")
        if not self.rel_bias > 0:
            raise ValueError(f"rel_bias must be positive, got {self.rel_bias}")
        if self.chunk < 2 ** 10:
            raise ValueError(f"chunk must be at least 1024 elements, got {self.chunk}")
        if self.max_budget < self.chunk:
            raise ValueError(f"max_budget ({self.max_budget}) must be at least chunk ({self.chunk})")


@dataclass(frozen=True)
class GateEntry:
    """An estimator to gate: ``fn(log_p, log_q)`` and its exact expectation on a case (None: not known).

    On a sequence case a per-sample ``fn`` is applied to every token and summed over the mask, as RLHF code
    applies a KL penalty, and held to the sequence KL; see ``reports.catalog`` for the other forms."""

    name: str
    fn: Callable
    expected: Callable[[KLCase], float | None] = lambda case: case.moments.kl.value
    uses_ratio: bool = False  # known to be built on r = q/p (built-ins only; user estimators get k̂)
    form: str = "token"
    couples_samples: bool = False

    def applies(self, case: KLCase) -> bool:
        if case.kind == "sequence":
            return not self.couples_samples
        return self.form == "token"


def entry_from_spec(spec: EstimatorSpec) -> GateEntry:
    """Gate a built-in estimator against its own exact expectation."""
    return GateEntry(spec.name, spec.fn, spec.expected, spec.uses_ratio, spec.form, spec.couples_samples)


def builtin_entries(names=None) -> list[GateEntry]:
    return [entry_from_spec(ESTIMATORS[n]) for n in (names or ESTIMATORS)]


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
        cols = ["estimator", "case", "verdict", "n", "expected", "mean", "rel_bias", "z", "detectable", "khat",
                "reason"]
        with pd.option_context("display.max_colwidth", 90, "display.width", 250):
            return self.frame[cols].to_string(index=False, float_format=lambda v: f"{v:.4g}")


def run_gate(entries: list[GateEntry], cases: list[str] | None = None, config: GateConfig = GateConfig(),
             progress: bool = False) -> GateResult:
    """Gate every entry on every case (default: the KL and sequence cases tagged ``"gate"``)."""
    if not entries:
        raise ValueError("entries must hold at least one estimator")
    built = [get_case(c, kind=KL_KINDS) for c in (cases or case_names(kind=KL_KINDS, tag="gate"))]
    cells = {c.name: [_Cell(e, c, e.expected(c) if e.applies(c) else None) for e in entries] for c in built}
    m = sum(cell.testable for row in cells.values() for cell in row)
    z_crit = float(stats.norm.isf(config.alpha / (2 * max(m, 1))))
    z_power = float(stats.norm.isf(1 - config.power))
    rows = []
    for case in tqdm(built, desc="gate", unit="case", disable=not progress):
        size = max(2 ** 10, config.chunk // case.event_numel)
        max_chunks = max(1, config.max_budget // config.chunk)
        live = [cell for cell in cells[case.name] if cell.testable]
        i = 0
        while live:
            sample = draw(case, size, chunk_seed(config.seed, "gate", case.name, i), dtype=config.dtype)
            shared = _ChunkTerms.of(sample)  # the same for every estimator: computed once per chunk
            for cell in live:
                cell.add(sample, shared, pilot=(i == 0))
                if i == 0 and cell.open:
                    cell.plan(z_crit, z_power, config, size, max_chunks)
            i += 1
            live = [cell for cell in live if cell.open and cell.chunks > i]
        rows += [cell.row(z_crit, z_power, config) for cell in cells[case.name]]
    return GateResult(pd.DataFrame(rows), config)


@dataclass(frozen=True)
class _ChunkTerms:
    """What every estimator's statistics need from one chunk of log-probs, in float64, per sample: on a
    sequence, log r = Σ_t log r_t and the control variate Σ_t (r_t − 1) over the mask."""

    log_r: torch.Tensor
    cv: torch.Tensor  # r − 1
    cv_sum: float
    cv_sq_sum: float
    abs_logp_sum: float  # Σ |log p| + |log q| per sample, for the rounding tolerance

    @classmethod
    def of(cls, sample) -> "_ChunkTerms":
        if isinstance(sample, SequenceSample):
            lp, lq, keep = sample.log_p.double(), sample.log_q.double(), sample.mask
            log_r_t = torch.where(keep, lq - lp, 0.0)
            log_r, cv = log_r_t.sum(-1), torch.expm1(log_r_t).sum(-1)
        else:
            lp, lq = (t.double() for t in sample)
            log_r = lq - lp
            cv = torch.expm1(log_r)
        return cls(log_r, cv, float(cv.sum()), float((cv * cv).sum()), float((lp.abs() + lq.abs()).sum()))


@dataclass
class _Cell:
    """Streaming statistics of one (estimator, case): float64 sums of v, v − k1 and r − 1."""

    entry: GateEntry
    case: KLCase
    expected: float | None
    verdict: str | None = None  # set early for outright failures and for cells that cannot be tested
    reason: str = ""
    chunks: int = 1
    khat: float = math.nan
    khat_extra: float = math.nan
    sums: dict = field(default_factory=dict)

    @property
    def testable(self) -> bool:
        return self.expected is not None and math.isfinite(self.expected)

    @property
    def open(self) -> bool:
        return self.verdict is None

    def add(self, sample, shared: "_ChunkTerms", pilot: bool) -> None:
        try:
            out = per_sample_estimates(self.entry.fn, self.entry.form, sample)
        except EstimateShapeError as err:
            self.verdict, self.reason = CAUGHT, str(err)
            return
        except Exception as err:  # a user's estimator may raise anything: that is a finding, not a crash
            self.verdict, self.reason = CAUGHT, f"raised {type(err).__name__}: {err}"
            return
        v = out.detach().double()
        bad = int((~torch.isfinite(v)).sum())
        if bad:
            self.verdict, self.reason = CAUGHT, f"{bad} non-finite estimates out of {v.numel()}"
            return
        d, cv = v + shared.log_r, shared.cv  # what the estimate adds to k1; the control variate r − 1
        for key, value in (("n", float(v.numel())), ("v", v.sum()), ("vv", (v * v).sum()), ("d", d.sum()),
                           ("dd", (d * d).sum()), ("c", shared.cv_sum), ("cc", shared.cv_sq_sum),
                           ("dc", (d * cv).sum()), ("abs_logp", shared.abs_logp_sum)):
            self.sums[key] = self.sums.get(key, 0.0) + float(value)
        if pilot and self.case.diagnose_tails:
            self.khat = pareto_khat(v, tail="both")
            self.khat_extra = pareto_khat(d, tail="both") if float(d.abs().max()) > 0 else -math.inf

    def _exact_kurtosis(self) -> float | None:
        """κ = μ₄/σ⁴ of a built-in's per-sequence estimate where the case enumerated it, else None."""
        spec = ESTIMATORS.get(self.entry.name)
        if self.case.kind != "sequence" or spec is None or spec.fn is not self.entry.fn or not spec.enumerated:
            return None
        exact = exact_moments(spec, self.case)
        var = exact["var"].value
        return exact["m4"].value / var ** 2 if var > 0 else None

    def plan(self, z_crit: float, z_power: float, config: GateConfig, size: int, max_chunks: int) -> None:
        """From the pilot: stop early where the test cannot mean anything, else choose N for the power (and,
        where the estimate's kurtosis is exact, for the normality of its mean)."""
        kurtosis = self._exact_kurtosis()
        if self.entry.uses_ratio and not self.case.ratio_variance_finite:
            self.verdict, self.reason = UNVERIFIABLE, self.case.breaks["ratio_variance"]
        elif kurtosis is not None and CLT_FACTOR * kurtosis > max_chunks * size:
            self.verdict, self.reason = UNVERIFIABLE, (
                f"its exact kurtosis (by enumeration) is {kurtosis:.3g}: a z-test needs N ≥ {CLT_FACTOR}κ = "
                f"{CLT_FACTOR * kurtosis:.3g}, above the cap of {max_chunks * size} samples")
        elif kurtosis is None and self.khat >= config.khat_max:
            why = ("the support is finite, so the variance is too, but the CLT needs far more samples than a test can "
                   "take" if self.case.finite_support else "the variance is likely infinite and a z-test meaningless")
            self.verdict, self.reason = UNVERIFIABLE, f"tail too heavy: Pareto k̂ = {self.khat:.2f} ≥ {config.khat_max}; {why}"
        elif not self.case.ratio_variance_finite and self.khat_extra >= config.khat_max:
            self.verdict, self.reason = UNVERIFIABLE, (
                f"what the estimate adds to k1 is heavy-tailed (Pareto k̂ = {self.khat_extra:.2f}), as any function "
                f"of r = q/p is here: {self.case.moments.mean_r2.note}")
        else:
            sd = math.sqrt(max(self._var("v", "vv"), 0.0))
            needed = ((z_crit + z_power) * sd / (config.rel_bias * max(abs(self.expected), 1e-300))) ** 2
            if kurtosis is not None:
                needed = max(needed, CLT_FACTOR * kurtosis)
            self.chunks = int(min(max_chunks, max(1, math.ceil(needed / size))))

    def _mean(self, key: str) -> float:
        return self.sums[key] / self.sums["n"]

    def _var(self, key: str, square: str) -> float:
        n = self.sums["n"]
        return max(self.sums[square] - n * self._mean(key) ** 2, 0.0) / max(n - 1, 1)

    def row(self, z_crit: float, z_power: float, config: GateConfig) -> dict:
        row = dict(estimator=self.entry.name, case=self.case.name, n=int(self.sums.get("n", 0)), expected=self.expected,
                   mean=np.nan, rel_bias=np.nan, z=np.nan, z_crit=z_crit, detectable=np.nan, khat=self.khat)
        if not self.entry.applies(self.case):
            why = ("it mixes the samples of one estimate, so it has no per-token use" if self.case.kind == "sequence"
                   else "it needs sequences")
            return {**row, "verdict": SKIPPED, "reason": why}
        if not self.testable:
            return {**row, "verdict": SKIPPED, "reason": "no exact finite expectation on this case"}
        if self.verdict == CAUGHT:
            return {**row, "verdict": CAUGHT, "reason": self.reason}
        n, mean = self.sums["n"], self._mean("v")
        se = math.sqrt(self._var("v", "vv") / n)
        bias = mean - self.expected
        scale = max(abs(self.expected), 1e-12)
        # A bias below the rounding error of the log-probs in the gate's dtype is no evidence of anything.
        tol = 2 * torch.finfo(config.dtype).eps * self._mean("abs_logp")
        z = 0.0 if abs(bias) <= tol else (bias / se if se > 0 else math.copysign(math.inf, bias))
        row.update(mean=mean, rel_bias=bias / scale, z=z, detectable=(z_crit + z_power) * se / scale)
        verdict, reason = self._judge(z, z_crit, bias, scale)
        return {**row, "verdict": verdict, "reason": reason}

    def _judge(self, z, z_crit, bias, scale) -> tuple[str, str]:
        if self.verdict is not None:
            return self.verdict, self.reason
        if abs(z) <= z_crit:
            return HOLDS, f"|z| = {abs(z):.2f} ≤ {z_crit:.2f}"
        case = self.case
        if not case.support_ok:
            c = self._ratio_cv_coefficient(z_crit)
            if c is not None:
                return ASSUMPTION, (f"the estimate is k1 + c·(r − 1) with c = {c:.3g}, biased by c·(E_p[q/p] − 1) = "
                                    f"{c * (case.moments.mean_r.value - 1):+.4g} because q has mass outside p's support "
                                    "(E_p[q/p] < 1)")
        return CAUGHT, (f"bias {bias:+.4g} ({bias / scale:+.2%} of {self.expected:.4g}), |z| = {abs(z):.1f} > "
                        f"{z_crit:.2f}")

    def _ratio_cv_coefficient(self, z_crit: float) -> float | None:
        """c if ``v − k1 − c·(r − 1)`` (c fitted by least squares) is unbiased for ``expected − KL``, else None.

        Then ``v`` is the control-variate estimator k1 + c(r − 1), unbiased only where E_p[r − 1] = 0: on a
        case that breaks that, its bias c·(E_p[r] − 1) is the case's doing, not a bug."""
        s, n = self.sums, self.sums["n"]
        if s["cc"] == 0:
            return None
        c = s["dc"] / s["cc"]
        rest_mean = (s["d"] - c * s["c"]) / n
        rest_ss = max(s["dd"] - 2 * c * s["dc"] + c * c * s["cc"] - n * rest_mean ** 2, 0.0)
        se = math.sqrt(rest_ss / max(n - 1, 1) / n)
        kl = self.case.truth.value
        # 1e-4·KL absorbs the O(1/N) coupling of a leave-one-out λ with its own sample.
        return c if abs(rest_mean - (self.expected - kl)) <= z_crit * se + 1e-4 * abs(kl) else None
