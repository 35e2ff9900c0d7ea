r"""The gradient gate: does a KL loss's expected gradient equal ∇θ KL(p_θ‖q), within a stated false-alarm rate?

A loss ``f(log_p, log_q, log_p_old, mask) -> loss[B]`` is run on samples x ~ p_old of every gradient case
(``reference_models.gradient_cases``). Its gradient is projected, per sample, on the case's K orthonormal
directions (u_0 along the true gradient g = ∇θ KL(p_θ‖q), u_1 along the rest of ∇θ KL(q‖p_θ), the others
random): d_k = ∇θ loss(x) · u_k (``catalog.per_sample_gradients``; the model never runs, its ∇ log p · u is
tabulated). Each direction's mean is z-tested against t_k = g · u_k (``reports.stats``):

    z_k = (mean d_k − t_k) / (sd_k / √N),   caught when max_k |z_k| > z_crit = Φ⁻¹(1 − α / 2mK)

with α the false-alarm rate of the whole run, m the tested cells and K the directions (Bonferroni).

**Sized for power.** The first chunk is a pilot: from the standard deviation σ̂_0 of d_0 the cell takes
N = ((z_crit + z_power)·σ̂_0 / (rel_bias·‖g‖))² samples, so that a relative bias of ``rel_bias`` along the true
gradient is caught with probability ``power``, up to ``max_budget`` (samples × T × K). ``detectable`` is the
relative bias along u_0 the cell detects with that probability.

**What it follows instead.** A caught cell is tested, with the same rule, against ∇θ KL(q‖p_θ) (the other
direction) and against zero: ``follows`` names each candidate it is consistent with, or "none". ``rel_bias`` =
‖m − t‖/‖t‖ and the cosines are measured in the span of the K directions (m the mean projections), which holds
both candidate gradients exactly: a bias outside that span shows only through the random directions, so
``rel_bias`` is a lower bound of ‖E[∇loss] − g‖/‖g‖ and the cosines are upper bounds in size. ``grad_var`` =
Σ_k Var(d_k)/‖g‖² is one sample's relative gradient variance in that span: a batch of B samples has relative
mean squared error rel_bias² + grad_var/B.

**Validity.** A Pareto k̂ ≥ ``khat_max`` of d_0 or d_1 in the pilot makes the cell unverifiable (importance
weights far off-policy are heavy-tailed): never a false alarm. For a built-in loss on an enumerable case the
exact kurtosis κ of d_0 and d_1 under p_old replaces k̂ (a finite support has finite moments, but a rare state
with a large log-ratio can make κ huge): the cell takes N ≥ CLT_FACTOR·κ, and is unverifiable where that
exceeds the cap. A raised exception, ``sys.exit``, a hang, a mutated
input, a wrong shape or a non-finite loss or gradient is caught.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from functools import partial

import numpy as np
import pandas as pd
import torch

from reference_models import case_names, get_case

from . import stats
from .catalog import EstimatorSpec, exact_gradient_kurtosis, per_sample_gradients
from .gate import GateConfig, GateResult
from .stats import CAUGHT, HOLDS, SKIPPED, UNVERIFIABLE, Cell, Chunk, Finding, Moments, Task

__all__ = ["run_grad_gate", "GRAD_CONFIG", "FOLLOWS", "COLUMNS"]

#: What an expected gradient can follow, by the name of the case's target.
FOLLOWS = {"kl": "∇KL(p‖q)", "reverse_kl": "∇KL(q‖p)", "zero": "zero"}
COLUMNS = ("estimator", "case", "policy", "verdict", "follows", "n", "rel_bias", "cos_kl", "cos_reverse_kl", "z",
           "detectable", "grad_var", "khat", "reason")


#: The gradient gate's defaults: chunks of 2^19 tokens (the pilot already sizes most cells), 2^26 in all per cell.
GRAD_CONFIG = GateConfig(chunk=2 ** 19)


def run_grad_gate(specs: list[EstimatorSpec], cases: list[str] | None = None, config: GateConfig = GRAD_CONFIG,
                  progress: bool = False, executor: stats.Executor | None = None) -> GateResult:
    """Gate every loss on every gradient case (default: those tagged "gate")."""
    if not specs:
        raise ValueError("specs must hold at least one loss")
    wrong = [s.name for s in specs if s.form != "loss"]
    if wrong:
        raise ValueError(f"the gradient gate takes losses (form 'loss'); not: {', '.join(wrong)}")
    jobs = [_GradJob(get_case(c, kind="gradient"), specs, config)
            for c in (cases or case_names(kind="gradient", tag="gate"))]
    tests = sum(job.k for job in jobs for cell in job.cells if cell.testable)
    z_crit, z_power = stats.critical_z(config.alpha, tests), stats.power_z(config.power)
    for job in jobs:
        job.z_crit, job.z_power = z_crit, z_power
    stats.run_jobs(jobs, executor, desc="gradient gate", progress=progress)
    frame = pd.DataFrame([job.row(cell) for job in jobs for cell in job.cells])
    frame.attrs.update(tests=tests, test_unit="directions × tested cells", rule=f"max |z| > {z_crit:.2f} is caught")
    return GateResult(frame, config, COLUMNS)


def _series(k: int, pair: tuple[torch.Tensor, torch.Tensor]) -> dict[str, torch.Tensor]:
    d, a = pair
    return {**{f"d{i}": d[:, i] for i in range(k)}, "a": a}


def _grad_chunk(chunk: Chunk, case_name: str, specs: tuple[EstimatorSpec, ...], dtype: torch.dtype,
                timeout: float | None, pilot: bool) -> list[tuple[Moments | Finding, dict]]:
    """One chunk of one gradient case for each loss: the moments of its projected gradients d_k and rounding
    scale a; from the pilot, the k̂ of every d_k. Or the finding that closes the cell."""
    case = get_case(case_name, kind="gradient")
    sample = case.draw(chunk.size, chunk.generator(case.device), dtype=dtype)
    k = case.u.shape[0]
    return stats.outcomes([partial(per_sample_gradients, spec, sample, timeout) for spec in specs],
                          partial(_series, k), ("d0", "d1") if pilot else ())


@dataclass
class _GradCell(Cell):
    spec: EstimatorSpec = None
    applies: bool = True

    @property
    def testable(self) -> bool:
        return self.applies


class _GradJob(stats.CellsJob):
    """Every loss's cell on one gradient case: draws shared, the pilot sizes each cell."""

    def __init__(self, case, specs: list[EstimatorSpec], config: GateConfig):
        super().__init__()
        self.case, self.config = case, config
        self.targets = {name: t.numpy() for name, t in case.targets.items()}
        self.k = case.u.shape[0]
        self.scale = float(np.linalg.norm(self.targets["kl"]))
        self.cells = [_GradCell(spec=s, applies=s.applies(case)) for s in specs]
        self.size = max(2 ** 10, config.chunk // case.event_numel)
        self.max_chunks = max(1, config.max_budget // config.chunk)
        self.z_crit = self.z_power = math.nan

    def chunk_task(self, index: int, cells: list[_GradCell]) -> Task:
        return Task(_grad_chunk, Chunk((self.config.seed, "grad-gate", self.case.name), index, self.size),
                    (self.case.name, tuple(c.spec for c in cells), self.config.dtype, self.config.timeout, index == 0))

    def plan(self, cell: _GradCell, index: int) -> None:
        """From the pilot: unverifiable where a projection's tail is too heavy (its exact kurtosis κ needs more
        than the cap, N ≥ CLT_FACTOR·κ, for a built-in on an enumerable case; else its k̂), otherwise N for the
        power along u_0 (and for the normality of the mean, where κ is exact)."""
        if index:
            return
        kurtosis = exact_gradient_kurtosis(cell.spec, self.case) if cell.spec.enumerated else None
        khat, cap = max(cell.khat.values(), default=-math.inf), self.max_chunks * self.size
        if kurtosis is not None and stats.CLT_FACTOR * kurtosis > cap:
            cell.close(UNVERIFIABLE, f"the exact kurtosis of its projected gradient (by enumeration) is {kurtosis:.3g}: "
                                     f"a z-test needs N ≥ {stats.CLT_FACTOR}κ, above the cap of {cap} samples")
            return
        if kurtosis is None and khat >= self.config.khat_max:
            cell.close(UNVERIFIABLE, f"tail too heavy: Pareto k̂ = {khat:.2f} ≥ {self.config.khat_max} for a "
                                     "projection of the gradient; the variance is likely infinite")
            return
        sd = math.sqrt(cell.moments.var("d0"))
        needed = stats.required_n(sd, self.config.rel_bias * self.scale, self.z_crit, self.z_power)
        if kurtosis is not None:
            needed = max(needed, stats.CLT_FACTOR * kurtosis)
        cell.chunks = int(min(self.max_chunks, max(1, math.ceil(needed / self.size))))

    def _z(self, m: Moments, target: np.ndarray, tol: float) -> np.ndarray:
        return np.array([stats.z_score(m.mean_of(f"d{i}"), float(target[i]), m.se(f"d{i}"), tol)
                         for i in range(self.k)])

    def row(self, cell: _GradCell) -> dict:
        m = cell.moments
        row = dict(estimator=cell.spec.name, case=self.case.name, policy="off" if self.case.off_policy else "on",
                   n=m.n if m else 0, follows="", rel_bias=math.nan, cos_kl=math.nan, cos_reverse_kl=math.nan,
                   z=math.nan, z_crit=self.z_crit, detectable=math.nan, grad_var=math.nan,
                   khat=max(cell.khat.values(), default=math.nan))
        if not cell.applies:
            return {**row, "verdict": SKIPPED, "reason": "not a loss"}
        if cell.verdict == CAUGHT:
            return {**row, "verdict": CAUGHT, "reason": cell.reason}
        mean = np.array([m.mean_of(f"d{i}") for i in range(self.k)])
        # A difference below the rounding of the loss's inputs and gradient in the gate's dtype is no evidence.
        tol = 64 * torch.finfo(self.config.dtype).eps * m.mean_of("a")
        z = {name: self._z(m, t, tol) for name, t in self.targets.items()}
        cos = lambda t: float(mean @ t / (np.linalg.norm(mean) * np.linalg.norm(t))) if np.linalg.norm(mean) > 0 else 0.0
        row.update(rel_bias=float(np.linalg.norm(mean - self.targets["kl"]) / self.scale), cos_kl=cos(self.targets["kl"]),
                   cos_reverse_kl=cos(self.targets["reverse_kl"]), z=float(np.abs(z["kl"]).max()),
                   detectable=stats.detectable(m.se("d0"), self.z_crit, self.z_power) / self.scale,
                   grad_var=sum(m.var(f"d{i}") for i in range(self.k)) / self.scale ** 2)
        if not cell.open:
            return {**row, "verdict": cell.verdict, "reason": cell.reason}
        consistent = [FOLLOWS[name] for name in self.targets if np.abs(z[name]).max() <= self.z_crit]
        row["follows"] = ", ".join(consistent) or "none of them"
        if FOLLOWS["kl"] in consistent:
            return {**row, "verdict": HOLDS, "reason": f"max |z| = {row['z']:.2f} ≤ {self.z_crit:.2f} on {self.k} "
                                                        "directions"}
        return {**row, "verdict": CAUGHT,
                "reason": (f"E[∇loss] follows {row['follows']}, not ∇KL(p‖q): relative bias {row['rel_bias']:.3g}, "
                           f"cosine {row['cos_kl']:.3f} with ∇KL(p‖q) and {row['cos_reverse_kl']:.3f} with ∇KL(q‖p); "
                           f"max |z| = {row['z']:.1f} > {self.z_crit:.2f}")}
