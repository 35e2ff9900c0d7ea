r"""Studies: run each (case, estimator, size) many times against the exact truth, into a tidy frame.

A study is vectorized over replicates: a chunk of replicates is drawn as one tensor ([replicates, n]
samples of a KL case, [replicates, K] log-weights of a marginal case) and the estimator is applied to the
whole chunk. Chunks hold at most :data:`CHUNK_ELEMENTS` draws × event elements, cut by a rule that depends
only on the cell, and each is seeded from (seed, case, estimator, size, chunk) (``reports.stats``), so that
any executor, one process or a cluster, gives identical numbers for the same seed.

KL and sequence cases give the columns :data:`COLUMNS`; marginal cases, whose size is the number K of
importance weights per estimate, give :data:`MARGINAL_COLUMNS`: besides the plain bias, ``bias_cv`` is the
mean of :math:`\hat\ell - (\hat A/p(x) - 1)` minus log p(x), unbiased for the same bias because
:math:`E[\hat A/p(x)] = 1` exactly, and far less noisy for a consistent estimator, whose error is
:math:`\delta - \delta^2/2 + \dots` with :math:`\delta = \hat A/p(x) - 1`: its standard error is
:math:`O(\mu_2/(K\sqrt R))` against :math:`O(\sqrt{\mu_2/(KR)})`, so a bias of order 1/K is measured to a
fixed relative precision with the same R at every K.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from estimators import marginal
from reference_models import get_case

from . import stats
from .cache import CellCache, fingerprint
from .catalog import EstimatorSpec, get_estimator, per_sample_estimates
from .stats import Chunk, Task

__all__ = ["StudyConfig", "run_study", "COLUMNS", "MARGINAL_COLUMNS", "CHUNK_ELEMENTS", "DEFAULT_KS"]

#: Draws × event elements per chunk; fixed so that chunking never changes the numbers.
CHUNK_ELEMENTS = 2 ** 21
DEFAULT_KS = tuple(2 ** i for i in range(13)) + (10 ** 4,)

COLUMNS = ["case", "estimator", "n", "replicates", "seed", "truth", "truth_method", "expected", "mean", "bias",
           "bias_se", "rel_bias", "var", "rsd", "rmse", "frac_negative", "nonfinite", "breaks"]
MARGINAL_COLUMNS = ["case", "estimator", "K", "replicates", "seed", "truth", "truth_method", "mean", "bias",
                    "bias_se", "bias_cv", "bias_cv_se", "var", "rmse", "theory_first", "theory_second", "khat", "ess",
                    "nonfinite"]


@dataclass(frozen=True)
class StudyConfig:
    """Every (case, estimator, n) of the named cases and estimators, ``replicates`` estimates each; on a
    marginal case n is K, the number of importance weights per estimate."""

    cases: tuple[str, ...]
    estimators: tuple[str, ...]
    ns: tuple[int, ...] = (10, 100, 1000)
    replicates: int = 1000
    seed: int = 0

    def __post_init__(self):
        if not self.cases:
            raise ValueError("cases must name at least one case")
        if not self.estimators:
            raise ValueError("estimators must name at least one estimator")
        for e in self.estimators:
            get_estimator(e)
        if not self.ns:
            raise ValueError("ns must name at least one size")
        for n in self.ns:
            stats.positive_int("ns", n)
        stats.positive_int("replicates", self.replicates, 2)


def _kl_chunk(chunk: Chunk, case_name: str, spec: EstimatorSpec, n: int) -> tuple[torch.Tensor, int, int]:
    """Replicate means of one chunk, the count of negative estimates, and of non-finite ones."""
    case = get_case(case_name)
    reps = chunk.size
    sample = case.draw(reps * n, chunk.generator(case.device))
    if case.kind == "kl":  # the estimator sees [replicates, n]: its samples lie along the last dim
        sample = type(sample)(*(t.reshape(reps, n) for t in sample))
    est = per_sample_estimates(spec, sample, finite=False).reshape(reps, n)
    means = est.mean(-1)
    nonfinite = 0 if bool(torch.isfinite(means).all()) else int((~torch.isfinite(est)).sum())
    return means, int(torch.count_nonzero(est < 0)), nonfinite


def _marginal_chunk(chunk: Chunk, case_name: str, spec: EstimatorSpec, k: int) -> tuple:
    """Estimates, Â/p(x) and Kish's ESS of each replicate, and (first chunk, K ≥ 64: below, fewer than 10
    values in the tail fit) the weights' Pareto k̂ of the first replicate, what a user sees for one estimate."""
    case = get_case(case_name)
    log_w = case.draw_log_w((chunk.size,), k, chunk.generator())
    truth = case.log_marginal.value
    khat = marginal.weight_khat(log_w[0]) if chunk.index == 0 and k >= 64 else math.nan
    return (per_sample_estimates(spec, log_w, finite=False), marginal.marginal_ratio(log_w, truth),
            marginal.effective_sample_size(log_w), khat)


class _Cell:
    """One (case, estimator, n) of a study: its chunks, then its row."""

    def __init__(self, case, spec: EstimatorSpec, n: int, replicates: int, seed: int, cache: CellCache | None):
        self.case, self.spec, self.n, self.replicates, self.seed, self.cache = case, spec, n, replicates, seed, cache
        per_chunk = CHUNK_ELEMENTS // (n if case.kind == "marginal" else n * case.event_numel)
        self.sizes = stats.chunk_sizes(replicates, per_chunk)
        self.results: list = []
        self.row: dict | None = None
        if cache is not None:  # keyed by all the row depends on: the estimator (its code), the case, the sizes, the seed
            self.key = fingerprint(spec, case.name, case.description, n, replicates, seed, CHUNK_ELEMENTS)
            self.label = f"{case.name}__{spec.name}__n{n}__r{replicates}__s{seed}"
            self.row = cache.load(self.key, self.label)

    def task(self, index: int) -> Task | None:
        if self.row is not None or index >= len(self.sizes):
            return None
        work = _marginal_chunk if self.case.kind == "marginal" else _kl_chunk
        return Task(work, Chunk((self.seed, self.case.name, self.spec.name, self.n), index, self.sizes[index]),
                    (self.case.name, self.spec, self.n))

    def absorb(self, index: int, result) -> None:
        """Take chunk ``index``; after the last one, make the row and store it at once (so that an interrupted
        study keeps it)."""
        self.results.append(result)
        if index == len(self.sizes) - 1:
            self.row = self._marginal_row() if self.case.kind == "marginal" else self._kl_row()
            if self.cache is not None:
                self.cache.store(self.key, self.label, self.row)

    def _kl_row(self) -> dict:
        case, spec, n, replicates = self.case, self.spec, self.n, self.replicates
        m = torch.cat([r[0] for r in self.results]).numpy()
        truth, expected = spec.target_value(case), spec.expected(case)
        mean, var_of_mean = float(m.mean()), float(m.var(ddof=1))
        return dict(
            case=case.name, estimator=spec.name, n=n, replicates=replicates, seed=self.seed, truth=truth,
            truth_method=spec.target_truth(case).describe(),
            expected=np.nan if expected is None else expected, mean=mean, bias=mean - truth,
            bias_se=math.sqrt(var_of_mean / replicates), rel_bias=(mean - truth) / abs(truth),
            var=n * var_of_mean, rsd=math.sqrt(n * var_of_mean) / abs(truth),
            rmse=float(np.sqrt(np.mean((m - truth) ** 2))),
            frac_negative=sum(r[1] for r in self.results) / (n * replicates),
            nonfinite=sum(r[2] for r in self.results), breaks="; ".join(case.breaks if spec.uses_ratio else ()))

    def _marginal_row(self) -> dict:
        case, spec, k, replicates = self.case, self.spec, self.n, self.replicates
        v, ratio, ess = (torch.cat([r[i] for r in self.results]).numpy() for i in range(3))
        truth = case.log_marginal.value
        cv = v - (ratio - 1)
        theory = spec.theory(case, k) if spec.theory is not None else None
        first, second = theory if theory is not None else (math.nan, math.nan)
        return dict(
            case=case.name, estimator=spec.name, K=k, replicates=replicates, seed=self.seed, truth=truth,
            truth_method=case.log_marginal.describe(), mean=float(v.mean()), bias=float(v.mean() - truth),
            bias_se=float(v.std(ddof=1) / math.sqrt(replicates)), bias_cv=float(cv.mean() - truth),
            bias_cv_se=float(cv.std(ddof=1) / math.sqrt(replicates)), var=float(v.var(ddof=1)),
            rmse=float(np.sqrt(np.mean((v - truth) ** 2))), theory_first=first, theory_second=second,
            khat=self.results[0][3], ess=float(ess.mean()), nonfinite=int((~np.isfinite(v)).sum()))



def _skip_reason(case, spec: EstimatorSpec) -> str | None:
    if not spec.applies(case):
        if case.kind == "sequence":
            return "it mixes the samples of one estimate"
        return "sequences only" if case.kind == "kl" else f"a {spec.form}-form estimator does not apply to a {case.kind} case"
    target = spec.target_truth(case)
    if not target.finite:
        return f"its target {spec.target} is infinite ({target.note})"
    return None


def run_study(config: StudyConfig, progress: bool = True, cache_dir: str | Path | None = None,
              executor: stats.Executor | None = None) -> pd.DataFrame:
    """Run every (case, estimator, n) of ``config``; one row each, columns :data:`COLUMNS` (or
    :data:`MARGINAL_COLUMNS` when every case is a marginal one).

    With ``cache_dir``, each finished cell is written there (``reports.cache``: keyed by a fingerprint of
    the estimator's code, the case, the configuration and the package, with a checksum) and a rerun loads it
    instead of recomputing it, so an interrupted study resumes where it stopped (the numbers are the same
    either way: every chunk is seeded).

    ``var`` is n × the variance of the replicate means (the per-sample variance for i.i.d. estimators,
    and the honest equivalent for the leave-one-out control variate); ``rsd = √var / |truth|``;
    ``bias_se`` is the standard error of ``bias``. On a marginal case ``var`` is the variance of one
    estimate over replicates; ``theory_second`` the prediction to second order, NaN where the case lacks
    the moments; ``khat`` the Pareto k̂ of the first replicate's K weights (NaN for K < 64); ``ess`` the
    mean Kish effective sample size. Cells that cannot run (a form that does not apply, an infinite target,
    K below an estimator's minimum) are listed in ``frame.attrs["skipped"]``.
    """
    cases = [get_case(c) for c in config.cases]
    kinds = {case.kind == "marginal" for case in cases}
    if len(kinds) > 1:
        raise ValueError("a study runs either marginal cases or KL and sequence cases, not both")
    specs = [get_estimator(e) for e in config.estimators]
    cache = CellCache(cache_dir) if cache_dir is not None else None
    cells, skipped = [], []
    for case in cases:
        for spec in specs:
            why = _skip_reason(case, spec)
            if why is not None:
                skipped.append(f"{spec.name} on {case.name}: {why}")
                continue
            for n in config.ns:
                if n < spec.min_k and case.kind == "marginal":
                    why = f"{spec.name} at K = {n}: needs K ≥ {spec.min_k}"
                    skipped += [why] if why not in skipped else []
                    continue
                cells.append(_Cell(case, spec, n, config.replicates, config.seed, cache))
    todo = [cell for cell in cells if cell.row is None]
    stats.run_jobs(todo, executor, desc="study", progress=progress, total=sum(len(c.sizes) for c in todo))
    marginal_frame = kinds == {True}
    frame = pd.DataFrame([cell.row for cell in cells], columns=MARGINAL_COLUMNS if marginal_frame else COLUMNS)
    frame.attrs["skipped"] = skipped
    return frame
