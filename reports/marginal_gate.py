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
*unverifiable*. A wrong output shape, a non-finite value or an exception is caught outright.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Callable

import pandas as pd
import torch
from scipy import stats
from torch import Tensor
from tqdm.auto import tqdm

from estimators import marginal
from estimators.diagnostics import pareto_khat
from reference_models import MarginalCase, case_names, get_case

from .gate import CAUGHT, HOLDS, UNVERIFIABLE, GateResult
from .study import chunk_seed

__all__ = ["MarginalGateConfig", "MarginalEntry", "MarginalGateResult", "run_marginal_gate", "RANGE_OFFSETS",
           "HOLDS", "CAUGHT", "UNVERIFIABLE"]

RANGE_OFFSETS = (-9999.5, -1234.5, -37.2, 0.0, 987.6)  # off float16's grid: its rounding shows
_EPS = torch.finfo(torch.float64).eps


@dataclass(frozen=True)
class MarginalGateConfig:
    """``alpha``: false-alarm rate of one run; ``excess`` and ``power``: each cell detects a bias beyond
    log_mean_exp's of ``excess`` × |its bias| with probability ``power``; ``chunk``: replicates per chunk
    (the first is the pilot); ``max_replicates``: the cap per cell; ``tol``: the consistency bound and
    the range check's tolerance, in nats; ``range_k``: K of the range check's rows."""

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

    def __post_init__(self):
        if not 0 < self.alpha < 1 or not 0 < self.power < 1:
            raise ValueError(f"alpha and power must be in (0, 1), got {self.alpha} and {self.power}")
        if not self.excess > 0 or not self.tol > 0:
            raise ValueError(f"excess and tol must be positive, got {self.excess} and {self.tol}")
        if not self.Ks or any(isinstance(k, bool) or not isinstance(k, int) or k < 3 for k in self.Ks):
            raise ValueError(f"Ks must be ints ≥ 3 (a second-order jackknife needs 3), got {self.Ks!r}")
        if isinstance(self.range_k, bool) or not isinstance(self.range_k, int) or self.range_k < 8:
            raise ValueError(f"range_k must be an int ≥ 8, got {self.range_k!r}")
        if self.chunk < 100 or self.max_replicates < self.chunk:
            raise ValueError(f"chunk must be ≥ 100 and max_replicates ≥ chunk, got {self.chunk} and "
                             f"{self.max_replicates}")


@dataclass(frozen=True)
class MarginalEntry:
    """An estimator to gate: ``fn(log_w[..., K]) -> log p̂[...]``."""

    name: str
    fn: Callable[[Tensor], Tensor]


@dataclass
class MarginalGateResult(GateResult):
    """The verdicts of a marginal gate run, one row per check (``caught``/``holds`` as in the KL gate)."""

    config: MarginalGateConfig

    def table(self) -> str:
        cols = ["estimator", "check", "case", "K", "verdict", "n", "bias", "baseline", "z", "detectable", "khat",
                "reason"]
        with pd.option_context("display.max_colwidth", 100, "display.width", 250):
            return self.frame[cols].to_string(index=False, float_format=lambda v: f"{v:.4g}")


class _Caught(Exception):
    """The estimator failed outright on a chunk (exception, shape, non-finite)."""


def _apply(fn, log_w: Tensor) -> Tensor:
    try:
        out = fn(log_w)
    except Exception as err:  # a user's estimator may raise anything: that is a finding, not a crash
        raise _Caught(f"raised {type(err).__name__}: {err}") from err
    want = tuple(log_w.shape[:-1])
    if not isinstance(out, Tensor) or tuple(out.shape) != want:
        got = tuple(out.shape) if isinstance(out, Tensor) else type(out).__name__
        raise _Caught(f"returned {got}, expected one estimate per row, shape {want}")
    v = out.detach().double().cpu()
    bad = int((~torch.isfinite(v)).sum())
    if bad:
        raise _Caught(f"{bad} non-finite estimates out of {v.numel()}")
    return v


def _range_inputs(k: int) -> Tensor:
    """The range check's log-weights: one row per offset, then the every-other-weight-zero row."""
    s = 1.0
    grid = s * torch.special.ndtri((torch.arange(k, dtype=torch.float64) + 0.5) / k) - s * s / 2
    sparse = grid.clone()
    sparse[1::2] = -math.inf
    return torch.stack([grid + c for c in RANGE_OFFSETS] + [sparse])


def _range_row(entry: MarginalEntry, log_w: Tensor, config: MarginalGateConfig) -> dict:
    row = dict(estimator=entry.name, check="range", case="extreme log-weights", K=config.range_k, n=len(log_w))
    try:
        v = _apply(entry.fn, log_w)
    except _Caught as err:
        return {**row, "verdict": CAUGHT, "reason": str(err)}
    err = (v - marginal.log_mean_exp(log_w)).abs()
    worst = int(err.argmax())
    if float(err[worst]) > config.tol:
        where = f"offset {RANGE_OFFSETS[worst]:g}" if worst < len(RANGE_OFFSETS) else "half the weights zero"
        return {**row, "verdict": CAUGHT, "bias": float(err[worst]),
                "reason": f"off the exact log-mean-exp by {float(err[worst]):.4g} nats (> {config.tol}) at {where}"}
    return {**row, "verdict": HOLDS, "bias": float(err.max()),
            "reason": f"finite, within {float(err.max()):.2g} nats of the exact log-mean-exp on every row"}


@dataclass
class _Cell:
    """Streaming sums of one (estimator, case, K): the three test statistics and the baseline's bias."""

    entry: MarginalEntry
    chunks: int = 1
    failure: str = ""
    khat: dict = field(default_factory=dict)
    sums: dict = field(default_factory=dict)

    def add(self, log_w: Tensor, base: Tensor, cv: Tensor, log_p: float, pilot: bool) -> None:
        try:
            v = _apply(self.entry.fn, log_w)
        except _Caught as err:
            self.failure = str(err)
            return
        series = {"below": v - base, "above": v + base - 2 * log_p - 2 * cv, "bias": v - log_p - cv,
                  "baseline": base - log_p - cv}
        for key, x in series.items():
            self.sums[key] = self.sums.get(key, 0.0) + float(x.sum())
            self.sums[key + "2"] = self.sums.get(key + "2", 0.0) + float((x * x).sum())
            if pilot and key != "baseline":
                spread = float(x.max() - x.min())
                self.khat[key] = pareto_khat(x, tail="both") if spread > 0 and x.numel() >= 20 else -math.inf
        self.sums["n"] = self.sums.get("n", 0) + v.numel()

    def mean_se(self, key: str) -> tuple[float, float]:
        n = self.sums["n"]
        mean = self.sums[key] / n
        var = max(self.sums[key + "2"] - n * mean * mean, 0.0) / max(n - 1, 1)
        return mean, math.sqrt(var / n)

    def plan(self, z_sum: float, config: MarginalGateConfig) -> None:
        """Replicates for an excess bias of ``excess`` × |b_L| at the stated power, from the spread seen so
        far (re-planned after every chunk from σ̂ and b̂_L, nuisance parameters, never from the tested means)."""
        if self.failure:
            return
        target = config.excess * abs(self.mean_se("baseline")[0])
        sd = max(self.mean_se(k)[1] for k in ("below", "above")) * math.sqrt(self.sums["n"])
        needed = (z_sum * sd / max(target, 1e-300)) ** 2
        self.chunks = int(min(config.max_replicates // config.chunk, max(1, math.ceil(needed / config.chunk))))


def _test_rows(cell: _Cell, case: MarginalCase, k: int, z_crit: float, z_sum: float, config: MarginalGateConfig,
               last: bool) -> list[dict]:
    head = dict(estimator=cell.entry.name, case=case.name, K=k, n=cell.sums.get("n", 0), z_crit=z_crit)
    checks = ["below", "above"] + (["consistency"] if last else [])
    if cell.failure:
        return [{**head, "check": c, "verdict": CAUGHT, "reason": cell.failure} for c in checks]
    log_p = case.log_marginal.value
    baseline = cell.mean_se("baseline")[0]
    round_tol = 1e3 * _EPS * (abs(log_p) + math.log(k) + 1)  # float64 rounding of the log-weights
    bias = cell.mean_se("bias")[0]
    rows = []
    for check in checks:
        key = "bias" if check == "consistency" else check
        mean, se = cell.mean_se(key)
        khat = cell.khat[key]
        row = {**head, "check": check, "bias": bias, "baseline": baseline, "khat": khat,
               "detectable": z_sum * se}
        if check == "consistency":
            excess = abs(mean) - config.tol
            z = excess / se if se > 0 else (math.inf if excess > 0 else 0.0)
        else:
            z = 0.0 if abs(mean) <= round_tol else (mean / se if se > 0 else math.copysign(math.inf, mean))
        bad = z < -z_crit if check == "below" else z > z_crit
        if khat >= config.khat_max:
            verdict, reason = UNVERIFIABLE, (f"tail too heavy: Pareto k̂ = {khat:.2f} ≥ {config.khat_max}, the "
                                             "variance is likely infinite and a z-test meaningless")
        elif not bad:
            verdict, reason = HOLDS, (f"z = {z:+.2f} ≥ −{z_crit:.2f}" if check == "below" else
                                      f"z = {z:+.2f} ≤ {z_crit:.2f}")
        elif check == "below":
            verdict, reason = CAUGHT, (f"more biased downwards than log_mean_exp: by {mean:+.4g} nats on the same "
                                       f"draws (its bias {bias:+.4g}, log_mean_exp's {baseline:+.4g}), z = {z:.1f}")
        elif check == "above":
            verdict, reason = CAUGHT, (f"biased upwards by more than log_mean_exp's |bias|: {bias:+.4g} > "
                                       f"{-baseline:.4g} nats, z = {z:.1f}")
        else:
            verdict, reason = CAUGHT, f"|bias| = {abs(bias):.4g} > {config.tol} nats at K = {k}, z = {z:.1f}"
        rows.append({**row, "z": z, "verdict": verdict, "reason": reason})
    return rows


def run_marginal_gate(entries: list[MarginalEntry], cases: list[str] | None = None,
                      config: MarginalGateConfig = MarginalGateConfig(), progress: bool = False) -> MarginalGateResult:
    """Gate every entry: the range check, then the bias checks on every case (default: the marginal cases tagged ``"gate"``)
    and every K of ``config``, all cells of one (case, K) sharing their draws."""
    if not entries:
        raise ValueError("entries must hold at least one estimator")
    built = [get_case(c, kind="marginal") for c in (cases or case_names(kind="marginal", tag="gate"))]
    m = len(entries) * len(built) * (2 * len(config.Ks) + 1)
    z_crit = float(stats.norm.isf(config.alpha / (2 * m)))  # two looks per test
    z_sum = z_crit + float(stats.norm.isf(1 - config.power))
    extreme = _range_inputs(config.range_k)
    rows = [_range_row(e, extreme, config) for e in entries]
    for case in tqdm(built, desc="marginal gate", unit="case", disable=not progress):
        log_p = case.log_marginal.value
        for k in config.Ks:
            last = k == max(config.Ks)
            cells = [_Cell(e) for e in entries]
            live, i = cells, 0
            while live:
                g = torch.Generator().manual_seed(chunk_seed(config.seed, "marginal-gate", case.name, k, i))
                log_w = case.draw_log_w((config.chunk,), k, g)
                base = marginal.log_mean_exp(log_w)
                cv = marginal.marginal_ratio(log_w, log_p) - 1
                for cell in live:
                    cell.add(log_w, base, cv, log_p, pilot=(i == 0))
                    cell.plan(z_sum, config)
                    if i == 0:
                        first_look = {r["verdict"] for r in _test_rows(cell, case, k, z_crit, z_sum, config, last)}
                        if CAUGHT in first_look or first_look == {UNVERIFIABLE}:
                            cell.chunks = 1  # decided at the first look
                i += 1
                live = [c for c in live if not c.failure and c.chunks > i]
            rows += [r for c in cells for r in _test_rows(c, case, k, z_crit, z_sum, config, last)]
    return MarginalGateResult(pd.DataFrame(rows), config)
