r"""The marginal-likelihood gate: is ``f(log_w[..., K]) -> log p̂`` a sound estimator of log p(x)?

Every estimator of log p(x) from K importance weights is biased; the gate holds it to the standard of
plain ``log_mean_exp`` (bias :math:`b_L(K) \approx -\mu_2/(2K) < 0`, vanishing as 1/K). Checks, one row each:

- **range** (deterministic): log-weights :math:`c + z_i`, z the quantile grid of N(-1/2, 1) at K = 1e5,
  c ∈ {-9999.5, -1234.5, -37.2, 0, 987.6}, and one row with every other weight zero (log w = -inf). The
  output must have shape [rows], be finite and agree with each row's exact log-mean-exp within 0.01 nats
  (a correct debiasing correction there is ~1e-5).
- **below** (each case and K): f is no more biased downwards than log_mean_exp L on the same draws:
  the paired :math:`f - L` is z-tested, caught when :math:`z < -z_{crit}`.
- **above**: f's bias is not above :math:`|b_L|`: :math:`f + L - 2\log p - 2(\hat A/p - 1)` has mean
  :math:`b_f + b_L` (the last term has mean 0 exactly, and removes most of the noise), caught when
  :math:`z > z_{crit}`.
- **consistency** (each case, at the largest K): :math:`|b_f| \le` 0.01 nats, from
  :math:`f - \log p - (\hat A/p - 1)`; caught when :math:`(|\bar b| - 0.01)/se > z_{crit}`. With the two
  bias checks, which bound :math:`|b_f| \le |b_L(K)| = O(1/K)` at every tested K, the bias is shown small
  and falling.

**False alarms.** One-sided z-tests, each looked at twice (after the pilot, and at the planned size), at
:math:`z_{crit} = \Phi^{-1}(1 - \alpha/2m)`, m the number of tests of the run (Bonferroni over tests and
looks), so a correct estimator is caught with probability ≤ α (1e-4) per run. A difference below the
float64 rounding of the log-weights is no evidence and scores z = 0.
**Power.** The first chunk of draws (shared by all estimators) is the pilot: a cell caught (or with
every test unverifiable) there stops;
the others take :math:`R = ((z_{crit} + z_{power})\,\hat\sigma / (0.5\,|b_L|))^2` replicates (up to a cap;
σ̂ and b_L re-estimated after every chunk), so that an excess bias of half log_mean_exp's is caught with
probability 0.9; ``detectable`` is the excess caught with that probability, in nats.
**Validity.** A z-test needs a finite variance: a test whose pilot statistic has Pareto k̂ ≥ 0.5 is
*unverifiable*. A wrong output shape, a non-finite value, an exception, ``sys.exit``, a hang past the
timeout or a mutated input is caught outright (``reports.stats``).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from functools import partial

import pandas as pd
import torch
from torch import Tensor

from estimators import marginal
from reference_models import case_names, get_case

from . import stats
from .catalog import EstimatorSpec, per_sample_estimates
from .gate import GateResult
from .stats import CAUGHT, HOLDS, UNVERIFIABLE, Cell, Chunk, Finding, Moments, Task

__all__ = ["MarginalGateConfig", "run_marginal_gate", "RANGE_OFFSETS", "COLUMNS", "HOLDS", "CAUGHT",
           "UNVERIFIABLE"]

RANGE_OFFSETS = (-9999.5, -1234.5, -37.2, 0.0, 987.6)  # off float16's grid: its rounding shows
COLUMNS = ("estimator", "check", "case", "K", "verdict", "n", "bias", "baseline", "z", "detectable", "khat", "reason")
_EPS = torch.finfo(torch.float64).eps


@dataclass(frozen=True)
class MarginalGateConfig:
    """``alpha``: false-alarm rate of one run; ``excess`` and ``power``: each cell detects a bias beyond
    log_mean_exp's of ``excess`` × |its bias| with probability ``power``; ``chunk``: replicates per chunk
    (the first is the pilot); ``max_replicates``: the cap per cell; ``tol``: the consistency bound and
    the range check's tolerance, in nats; ``range_k``: K of the range check's rows; ``timeout``: seconds
    one call of an estimator may take (None: no limit)."""

    seed: int = 0
    alpha: float = 1e-4
    power: float = 0.9
    excess: float = 0.5
    Ks: tuple[int, ...] = (4, 16, 64, 256, 1024)
    chunk: int = 1000
    max_replicates: int = 32000
    tol: float = 0.01
    khat_max: float = 0.5
    range_k: int = 10 ** 5
    timeout: float | None = None

    def __post_init__(self):
        if not 0 < self.alpha < 1 or not 0 < self.power < 1:
            raise ValueError(f"alpha and power must be in (0, 1), got {self.alpha} and {self.power}")
        if not self.excess > 0 or not self.tol > 0:
            raise ValueError(f"excess and tol must be positive, got {self.excess} and {self.tol}")
        if not self.Ks:
            raise ValueError("Ks must name at least one K")
        for k in self.Ks:
            stats.positive_int("Ks (a second-order jackknife needs 3)", k, 3)
        stats.positive_int("range_k", self.range_k, 8)
        stats.positive_int("chunk", self.chunk, 100)
        stats.positive_int("max_replicates", self.max_replicates, self.chunk)
        if self.timeout is not None and not self.timeout > 0:
            raise ValueError(f"timeout must be positive or None, got {self.timeout}")


def _range_inputs(k: int) -> Tensor:
    """The range check's log-weights: one row per offset, then the every-other-weight-zero row."""
    s = 1.0
    grid = s * torch.special.ndtri((torch.arange(k, dtype=torch.float64) + 0.5) / k) - s * s / 2
    sparse = grid.clone()
    sparse[1::2] = -math.inf
    return torch.stack([grid + c for c in RANGE_OFFSETS] + [sparse])


def _range_row(spec: EstimatorSpec, log_w: Tensor, reference: Tensor, config: MarginalGateConfig) -> dict:
    row = dict(estimator=spec.name, check="range", case="extreme log-weights", K=config.range_k, n=len(log_w))
    try:
        v = per_sample_estimates(spec, log_w, config.timeout)
    except Finding as err:
        return {**row, "verdict": CAUGHT, "reason": str(err)}
    err = (v - reference).abs()
    worst = int(err.argmax())
    if float(err[worst]) > config.tol:
        where = f"offset {RANGE_OFFSETS[worst]:g}" if worst < len(RANGE_OFFSETS) else "half the weights zero"
        return {**row, "verdict": CAUGHT, "bias": float(err[worst]),
                "reason": f"off the exact log-mean-exp by {float(err[worst]):.4g} nats (> {config.tol}) at {where}"}
    return {**row, "verdict": HOLDS, "bias": float(err.max()),
            "reason": f"finite, within {float(err.max()):.2g} nats of the exact log-mean-exp on every row"}


#: The series a cell streams per replicate, with f the estimate, L = log_mean_exp on the same draws and
#: δ = Â/p(x) − 1 (mean 0 exactly): f − L (below), f + L − 2 log p − 2δ (above), f − log p − δ (bias) and
#: L − log p − δ (the baseline's bias).
_SERIES = ("below", "above", "bias", "baseline")


def _marginal_chunk(chunk: Chunk, case_name: str, k: int, specs: tuple[EstimatorSpec, ...], timeout: float | None,
                    pilot: bool) -> list[tuple[Moments | Finding, dict]]:
    case = get_case(case_name)
    log_p = case.log_marginal.value
    log_w = case.draw_log_w((chunk.size,), k, chunk.generator())
    base = marginal.log_mean_exp(log_w)
    cv = marginal.marginal_ratio(log_w, log_p) - 1
    return stats.outcomes([partial(per_sample_estimates, spec, log_w, timeout) for spec in specs],
                          lambda v: dict(below=v - base, above=v + base - 2 * log_p - 2 * cv, bias=v - log_p - cv,
                                         baseline=base - log_p - cv),
                          _SERIES[:3] if pilot else ())


@dataclass
class _MarginalCell(Cell):
    spec: EstimatorSpec = None


class _CaseKJob(stats.CellsJob):
    """Every estimator's cell on one (case, K): draws shared, replicates re-planned after every chunk from
    σ̂ and b̂_L (nuisance parameters, never from the tested means)."""

    replans = True

    def __init__(self, case, k: int, specs: list[EstimatorSpec], config: MarginalGateConfig, z_crit: float,
                 z_power: float):
        super().__init__()
        self.case, self.k, self.config, self.z_crit, self.z_power = case, k, config, z_crit, z_power
        self.last = k == max(config.Ks)
        self.cells = [_MarginalCell(spec=s) for s in specs]

    def chunk_task(self, index: int, cells: list[_MarginalCell]) -> Task:
        return Task(_marginal_chunk, Chunk((self.config.seed, "marginal-gate", self.case.name, self.k), index,
                                           self.config.chunk),
                    (self.case.name, self.k, tuple(c.spec for c in cells), self.config.timeout, index == 0))

    def plan(self, cell: _MarginalCell, index: int) -> None:
        """Replicates for an excess bias of ``excess`` × |b_L| at the stated power; one chunk where the first look
        already decides (caught, or nothing verifiable)."""
        m, config = cell.moments, self.config
        sd = max(m.se(key) for key in ("below", "above")) * math.sqrt(m.n)
        needed = stats.required_n(sd, config.excess * abs(m.mean_of("baseline")), self.z_crit, self.z_power)
        cell.chunks = int(min(config.max_replicates // config.chunk, max(1, math.ceil(needed / config.chunk))))
        if index == 0:
            first_look = {r["verdict"] for r in self._rows(cell)}
            if CAUGHT in first_look or first_look == {UNVERIFIABLE}:
                cell.chunks = 1

    def rows(self) -> list[dict]:
        return [row for cell in self.cells for row in self._rows(cell)]

    def _rows(self, cell: _MarginalCell) -> list[dict]:
        m = cell.moments
        head = dict(estimator=cell.spec.name, case=self.case.name, K=self.k, n=m.n if m else 0, z_crit=self.z_crit)
        checks = ["below", "above"] + (["consistency"] if self.last else [])
        if cell.verdict == CAUGHT:
            return [{**head, "check": c, "verdict": CAUGHT, "reason": cell.reason} for c in checks]
        log_p = self.case.log_marginal.value
        baseline, bias = m.mean_of("baseline"), m.mean_of("bias")
        round_tol = 1e3 * _EPS * (abs(log_p) + math.log(self.k) + 1)  # float64 rounding of the log-weights
        rows = []
        for check in checks:
            key = "bias" if check == "consistency" else check
            mean, se = m.mean_of(key), m.se(key)
            khat = cell.khat[key]
            if check == "consistency":
                excess = abs(mean) - self.config.tol
                z = excess / se if se > 0 else (math.inf if excess > 0 else 0.0)
            else:
                z = stats.z_score(mean, 0.0, se, tol=round_tol)
            verdict, reason = self._judge(check, z, mean, bias, baseline, khat)
            rows.append({**head, "check": check, "bias": bias, "baseline": baseline, "khat": khat,
                         "detectable": stats.detectable(se, self.z_crit, self.z_power), "z": z, "verdict": verdict,
                         "reason": reason})
        return rows

    def _judge(self, check: str, z: float, mean: float, bias: float, baseline: float, khat: float) -> tuple[str, str]:
        z_crit, config = self.z_crit, self.config
        bad = z < -z_crit if check == "below" else z > z_crit
        if khat >= config.khat_max:
            return UNVERIFIABLE, (f"tail too heavy: Pareto k̂ = {khat:.2f} ≥ {config.khat_max}, the variance is "
                                  "likely infinite and a z-test meaningless")
        if not bad:
            return HOLDS, f"z = {z:+.2f} ≥ −{z_crit:.2f}" if check == "below" else f"z = {z:+.2f} ≤ {z_crit:.2f}"
        if check == "below":
            return CAUGHT, (f"more biased downwards than log_mean_exp: by {mean:+.4g} nats on the same draws (its "
                            f"bias {bias:+.4g}, log_mean_exp's {baseline:+.4g}), z = {z:.1f}")
        if check == "above":
            return CAUGHT, (f"biased upwards by more than log_mean_exp's |bias|: {bias:+.4g} > {-baseline:.4g} nats, "
                            f"z = {z:.1f}")
        return CAUGHT, f"|bias| = {abs(bias):.4g} > {config.tol} nats at K = {self.k}, z = {z:.1f}"


def run_marginal_gate(specs: list[EstimatorSpec], cases: list[str] | None = None,
                      config: MarginalGateConfig = MarginalGateConfig(), progress: bool = False,
                      executor: stats.Executor | None = None) -> GateResult:
    """Gate every estimator ``f(log_w[..., K]) -> log p̂[...]``: the range check, then the bias checks on
    every case (default: the cases tagged "gate") and every K of ``config``, all cells of one (case, K)
    sharing their draws."""
    if not specs:
        raise ValueError("specs must hold at least one estimator")
    built = [get_case(c) for c in (cases or case_names(kind="marginal", tag="gate"))]
    tests = len(specs) * len(built) * (2 * len(config.Ks) + 1)
    z_crit = stats.critical_z(config.alpha, tests, sides=1, looks=2)
    z_power = stats.power_z(config.power)
    extreme = _range_inputs(config.range_k)
    reference = marginal.log_mean_exp(extreme)  # before any user call: no mutation can move it
    rows = [_range_row(s, extreme, reference, config) for s in specs]
    jobs = [_CaseKJob(case, k, specs, config, z_crit, z_power) for case in built for k in config.Ks]
    stats.run_jobs(jobs, executor, desc="marginal gate", progress=progress)
    frame = pd.DataFrame(rows + [row for job in jobs for row in job.rows()])
    frame.attrs.update(tests=tests, test_unit="one-sided z-tests, two looks each",
                       rule=f"z beyond {z_crit:.2f} on the tested side is caught")
    return GateResult(frame, config, COLUMNS)
