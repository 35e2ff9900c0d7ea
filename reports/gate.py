"""The gate: is an estimator unbiased on every KL case, within a stated false-alarm rate?

For each (estimator, case) cell the gate streams samples x ~ p in chunks (chunk i seeded from
(seed, case, i), shared by all estimators of one run), applies the estimator to each chunk and z-tests
the mean of all its estimates against the exact expectation (``reports.stats``):

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
finite too but whose ratios span orders of magnitude, so that the CLT needs far more samples than the test).
Where the case enumerates a built-in's exact kurtosis κ, the cell takes N ≥ CLT_FACTOR·κ instead of
trusting k̂. Where a case breaks the support assumption (E_p[q/p] < 1) and the estimate is
k1 + c·(r − 1) plus an unbiased rest (k3: c = 1; the control variates: c = λ), its bias
c·(E_p[q/p] − 1) is reported as the case's *assumption* rather than as the estimator's failure. Where
E_p[(q/p)²] = ∞, an estimate that adds a heavy-tailed term to k1 (Pareto k̂ of the pilot's v − k1 ≥
``khat_max``, as r − 1 has) is *unverifiable*: its sample mean cannot be trusted, whether or not it is
right, even where its own k̂ looks harmless (the 100-dimensional pair). Any non-finite output, an
exception, ``sys.exit``, a hang past ``timeout``, a mutated input or a wrong output shape is caught.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from functools import partial

import pandas as pd
import torch

from reference_models import case_names, get_case

from . import stats
from .catalog import KL_KINDS, EstimatorSpec, exact_moments, per_sample_estimates
from .stats import ASSUMPTION, CAUGHT, HOLDS, SKIPPED, UNVERIFIABLE, Cell, Chunk, Finding, Moments, Task

__all__ = ["GateConfig", "GateResult", "run_gate", "HOLDS", "CAUGHT", "UNVERIFIABLE", "ASSUMPTION", "SKIPPED"]


@dataclass(frozen=True)
class GateConfig:
    """``alpha``: false-alarm rate of one gate run (all cells together); ``rel_bias`` and ``power``: the
    bias each cell is sized to detect and the probability of detecting it; ``chunk``: samples × event
    elements per chunk (the first is the pilot); ``max_budget``: the cap per cell, in the same units;
    ``timeout``: seconds one call of an estimator may take (None: no limit)."""

    seed: int = 0
    alpha: float = 1e-4
    rel_bias: float = 0.02
    power: float = 0.9
    khat_max: float = 0.5
    chunk: int = 2 ** 21
    max_budget: int = 2 ** 26
    dtype: torch.dtype = torch.float32  # the log-probs an estimator is given, as RLHF code has them
    timeout: float | None = None

    def __post_init__(self):
        if not 0 < self.alpha < 1:
            raise ValueError(f"alpha must be in (0, 1), got {self.alpha}")
        if not 0 < self.power < 1:
            raise ValueError(f"power must be in (0, 1), got {self.power}")
        if not self.rel_bias > 0:
            raise ValueError(f"rel_bias must be positive, got {self.rel_bias}")
        stats.positive_int("chunk", self.chunk, 2 ** 10)
        stats.positive_int("max_budget", self.max_budget, self.chunk)
        if self.timeout is not None and not self.timeout > 0:
            raise ValueError(f"timeout must be positive or None, got {self.timeout}")


@dataclass
class GateResult:
    """The verdicts of a gate run, one row per cell (or check); ``columns`` are those :meth:`table` shows."""

    frame: pd.DataFrame
    config: object
    columns: tuple[str, ...] = ("estimator", "case", "verdict", "n", "expected", "mean", "rel_bias", "z",
                                "detectable", "khat", "reason")

    def caught(self, name: str | None = None) -> pd.DataFrame:
        rows = self.frame[self.frame.verdict == CAUGHT]
        return rows if name is None else rows[rows.estimator == name]

    def holds(self, name: str | None = None) -> bool:
        """No cell caught (for one estimator, or for all)."""
        return self.caught(name).empty

    def table(self) -> str:
        with pd.option_context("display.max_colwidth", 100, "display.width", 250):
            return self.frame.reindex(columns=list(self.columns)).to_string(
                index=False, float_format=lambda v: f"{v:.4g}")


def run_gate(specs: list[EstimatorSpec], cases: list[str] | None = None, config: GateConfig = GateConfig(),
             progress: bool = False, executor: stats.Executor | None = None) -> GateResult:
    """Gate every estimator on every case (default: all registered KL and sequence cases)."""
    if not specs:
        raise ValueError("specs must hold at least one estimator")
    built = [get_case(c) for c in (cases or case_names(kind=KL_KINDS))]
    jobs = [_CaseJob(case, specs, config) for case in built]
    m = sum(cell.testable for job in jobs for cell in job.cells)
    z_crit, z_power = stats.critical_z(config.alpha, m), stats.power_z(config.power)
    for job in jobs:
        job.z_crit, job.z_power = z_crit, z_power
    stats.run_jobs(jobs, executor, desc="gate", progress=progress)
    frame = pd.DataFrame([row for job in jobs for row in job.rows()])
    frame.attrs.update(tests=m, test_unit="tested cells", rule=f"|z| > {z_crit:.2f} is caught")
    return GateResult(frame, config)


def _gate_chunk(chunk: Chunk, case_name: str, specs: tuple[EstimatorSpec, ...], dtype: torch.dtype,
                timeout: float | None, pilot: bool) -> list[tuple[Moments | Finding, dict]]:
    """One chunk of one case for each of ``specs``: the moments of the series the gate streams per sample, the
    estimate v, what it adds to k1 (d = v − k1 = v + log r), the control variate c = r − 1 and
    a = |log p| + |log q| (the scale of the inputs' rounding); from the pilot, the k̂ of v and d. Or the
    finding that closes the cell."""
    case = get_case(case_name)
    sample = case.draw(chunk.size, chunk.generator(case.device), dtype=dtype)
    log_r, cv, scale = _ratio_terms(sample, case.kind == "sequence")
    return stats.outcomes([partial(per_sample_estimates, spec, sample, timeout) for spec in specs],
                          lambda v: dict(v=v, d=v + log_r, c=cv, a=scale),
                          ("v", "d") if pilot and case.diagnose_tails else ())


def _ratio_terms(sample, sequence: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per sample, in float64, what every estimator's cell needs: log r, the control variate r − 1 and the
    inputs' scale |log p| + |log q| (on a sequence: Σ_t log r_t and Σ_t (r_t − 1) over the mask)."""
    lp, lq = sample.log_p.double(), sample.log_q.double()
    if not sequence:
        log_r = lq - lp
        return log_r, torch.expm1(log_r), lp.abs() + lq.abs()
    log_r_t = torch.where(sample.mask, lq - lp, 0.0)
    return log_r_t.sum(-1), torch.expm1(log_r_t).sum(-1), (lp.abs() + lq.abs()).sum(-1)


@dataclass
class _GateCell(Cell):
    spec: EstimatorSpec = None
    expected: float | None = None
    applies: bool = True
    chunks: int = 1

    @property
    def testable(self) -> bool:
        return self.applies and self.expected is not None and math.isfinite(self.expected)


class _CaseJob:
    """Every estimator's cell on one case: the draws of a chunk are shared, the pilot sizes each cell."""

    def __init__(self, case, specs: list[EstimatorSpec], config: GateConfig):
        self.case, self.config = case, config
        self.cells = [_GateCell(spec=s, applies=s.applies(case), expected=s.expected(case) if s.applies(case) else None)
                      for s in specs]
        self.size = max(2 ** 10, config.chunk // case.event_numel)
        self.max_chunks = max(1, config.max_budget // config.chunk)
        self.z_crit = self.z_power = math.nan
        self._running: list[_GateCell] = []

    def task(self, index: int) -> Task | None:
        self._running = [c for c in self.cells if c.testable and c.open and c.chunks > index]
        if not self._running:
            return None
        return Task(_gate_chunk, Chunk((self.config.seed, "gate", self.case.name), index, self.size),
                    (self.case.name, tuple(c.spec for c in self._running), self.config.dtype, self.config.timeout,
                     index == 0))

    def absorb(self, index: int, result) -> None:
        for cell, (outcome, khat) in zip(self._running, result):
            cell.take(outcome, khat)
            if index == 0 and cell.open:
                self._plan(cell)

    def _exact_kurtosis(self, cell: _GateCell) -> float | None:
        """κ = μ₄/σ⁴ of the per-sequence estimate where the spec asks for it on a sequence case, else None."""
        if not cell.spec.enumerated or self.case.kind != "sequence":
            return None
        exact = exact_moments(cell.spec, self.case)
        var = exact["var"].value
        return exact["m4"].value / var ** 2 if var > 0 else None

    def _plan(self, cell: _GateCell) -> None:
        """From the pilot: close the cell where the test cannot mean anything, else choose N for the power
        (and, where the estimate's kurtosis is exact, for the normality of its mean)."""
        case, config = self.case, self.config
        kurtosis = self._exact_kurtosis(cell)
        khat, khat_extra = cell.khat.get("v", math.nan), cell.khat.get("d", math.nan)
        cap = self.max_chunks * self.size
        if cell.spec.uses_ratio and not case.ratio_variance_finite:
            cell.close(UNVERIFIABLE, case.breaks["ratio_variance"])
        elif kurtosis is not None and stats.CLT_FACTOR * kurtosis > cap:
            cell.close(UNVERIFIABLE, f"its exact kurtosis (by enumeration) is {kurtosis:.3g}: a z-test needs "
                                     f"N ≥ {stats.CLT_FACTOR}κ = {stats.CLT_FACTOR * kurtosis:.3g}, above the cap "
                                     f"of {cap} samples")
        elif kurtosis is None and khat >= config.khat_max:
            why = ("the support is finite, so the variance is too, but the CLT needs far more samples than a test "
                   "can take" if case.finite_support else "the variance is likely infinite and a z-test meaningless")
            cell.close(UNVERIFIABLE, f"tail too heavy: Pareto k̂ = {khat:.2f} ≥ {config.khat_max}; {why}")
        elif not case.ratio_variance_finite and khat_extra >= config.khat_max:
            cell.close(UNVERIFIABLE, f"what the estimate adds to k1 is heavy-tailed (Pareto k̂ = {khat_extra:.2f}), "
                                     f"as any function of r = q/p is here: {case.moments.mean_r2.note}")
        else:
            sd = math.sqrt(cell.moments.var("v"))
            needed = stats.required_n(sd, config.rel_bias * cell.expected, self.z_crit, self.z_power)
            if kurtosis is not None:
                needed = max(needed, stats.CLT_FACTOR * kurtosis)
            cell.chunks = int(min(self.max_chunks, max(1, math.ceil(needed / self.size))))

    def rows(self) -> list[dict]:
        return [self._row(cell) for cell in self.cells]

    def _row(self, cell: _GateCell) -> dict:
        m = cell.moments
        row = dict(estimator=cell.spec.name, case=self.case.name, n=m.n if m else 0, expected=cell.expected,
                   mean=math.nan, rel_bias=math.nan, z=math.nan, z_crit=self.z_crit, detectable=math.nan,
                   khat=cell.khat.get("v", math.nan))
        if not cell.applies:
            why = ("it estimates a log marginal likelihood" if cell.spec.form == "log_weights" else
                   "it mixes the samples of one estimate, so it has no per-token use" if self.case.kind == "sequence"
                   else "it needs sequences")
            return {**row, "verdict": SKIPPED, "reason": why}
        if not cell.testable:
            return {**row, "verdict": SKIPPED, "reason": "no exact finite expectation on this case"}
        if cell.verdict == CAUGHT:
            return {**row, "verdict": CAUGHT, "reason": cell.reason}
        mean, se = m.mean_of("v"), m.se("v")
        bias, scale = mean - cell.expected, max(abs(cell.expected), 1e-12)
        # A bias below the rounding error of the log-probs in the gate's dtype is no evidence of anything.
        z = stats.z_score(mean, cell.expected, se, tol=2 * torch.finfo(self.config.dtype).eps * m.mean_of("a"))
        row.update(mean=mean, rel_bias=bias / scale, z=z,
                   detectable=stats.detectable(se, self.z_crit, self.z_power) / scale)
        verdict, reason = self._judge(cell, z, bias, scale)
        return {**row, "verdict": verdict, "reason": reason}

    def _judge(self, cell: _GateCell, z: float, bias: float, scale: float) -> tuple[str, str]:
        if not cell.open:
            return cell.verdict, cell.reason
        if abs(z) <= self.z_crit:
            return HOLDS, f"|z| = {abs(z):.2f} ≤ {self.z_crit:.2f}"
        if not self.case.support_ok:
            c = self._ratio_cv_coefficient(cell)
            if c is not None:
                return ASSUMPTION, (f"the estimate is k1 + c·(r − 1) with c = {c:.3g}, biased by c·(E_p[q/p] − 1) = "
                                    f"{c * (self.case.moments.mean_r.value - 1):+.4g} because q has mass outside p's "
                                    "support (E_p[q/p] < 1)")
        return CAUGHT, (f"bias {bias:+.4g} ({bias / scale:+.2%} of {cell.expected:.4g}), |z| = {abs(z):.1f} > "
                        f"{self.z_crit:.2f}")

    def _ratio_cv_coefficient(self, cell: _GateCell) -> float | None:
        """c if ``v − k1 − c·(r − 1)`` (c fitted by least squares through the origin) is unbiased for
        ``expected − KL``, else None.

        Then ``v`` is the control-variate estimator k1 + c(r − 1), unbiased only where E_p[r − 1] = 0: on a
        case that breaks that, its bias c·(E_p[r] − 1) is the case's doing, not a bug."""
        m = cell.moments
        cc = m.raw("c", "c")
        if cc == 0:
            return None
        c = m.raw("d", "c") / cc
        rest_mean = m.mean_of("d") - c * m.mean_of("c")
        rest_ss = max(m.raw("d", "d") - 2 * c * m.raw("d", "c") + c * c * cc - m.n * rest_mean ** 2, 0.0)
        se = math.sqrt(rest_ss / max(m.n - 1, 1) / m.n)
        kl = self.case.truth.value
        # 1e-4·KL absorbs the O(1/N) coupling of a leave-one-out λ with its own sample.
        return c if abs(rest_mean - (cell.expected - kl)) <= self.z_crit * se + 1e-4 * abs(kl) else None
