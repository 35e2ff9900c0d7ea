r"""Marginal-likelihood studies: each (case, estimator, K) replicated against the exact log p(x).

Vectorized over replicates: a chunk of log-weights of shape [replicates, K] is drawn at once (at most
:data:`CHUNK_ELEMENTS` per chunk), seeded from (seed, case, estimator, K, chunk) as in
:mod:`reports.study`. Besides the plain bias, each cell reports ``bias_cv``: the mean of
:math:`\hat\ell - (\hat A/p(x) - 1)` minus log p(x), unbiased for the same bias because
:math:`E[\hat A/p(x)] = 1` exactly, and far less noisy for a consistent estimator, whose error is
:math:`\delta - \delta^2/2 + \dots` with :math:`\delta = \hat A/p(x) - 1`: its standard error is
:math:`O(\mu_2/(K\sqrt R))` against :math:`O(\sqrt{\mu_2/(KR)})`, so a bias of order 1/K is measured to a
fixed relative precision with the same R at every K.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable

import numpy as np
import pandas as pd
import torch
from torch import Tensor
from tqdm.auto import tqdm

from estimators import marginal
from reference_models import MarginalCase, get_case

from .study import chunk_seed

__all__ = ["MarginalEstimator", "MARGINAL_ESTIMATORS", "DEFAULT_KS", "COLUMNS", "CHUNK_ELEMENTS",
           "run_marginal_study"]

CHUNK_ELEMENTS = 2 ** 21
DEFAULT_KS = tuple(2 ** i for i in range(13)) + (10 ** 4,)
COLUMNS = ["case", "estimator", "K", "replicates", "seed", "truth", "truth_method", "mean", "bias", "bias_se",
           "bias_cv", "bias_cv_se", "var", "rmse", "theory_first", "theory_second", "khat", "ess", "nonfinite"]


def _log_mean_exp_theory(case: MarginalCase, K: int) -> tuple[float, float]:
    m = case.weight_moments
    return (marginal.delta_method_bias(m.mu.value, m.mu2.value, K),
            marginal.delta_method_bias(m.mu.value, m.mu2.value, K, m.mu3.value))


def _jackknife1_theory(case: MarginalCase, K: int) -> tuple[float, float]:
    """With E[L_m] − log p = b₁/m + b₂/m², K·b(K) − (K−1)·b(K−1) = −b₂/(K(K−1))."""
    first, second = _log_mean_exp_theory(case, 1)  # at K = 1 the second-order term is b₂ itself
    return 0.0, -(second - first) / (K * (K - 1))


@dataclass(frozen=True)
class MarginalEstimator:
    """``fn(log_w[..., K]) -> log p̂`` with the smallest K it accepts and, where the case's exact moments
    give it, its predicted bias to first and to second order in 1/K."""

    name: str
    fn: Callable[[Tensor], Tensor]
    min_k: int = 1
    theory: Callable[[MarginalCase, int], tuple[float, float]] | None = None
    needs: str = "weight_moments"  # the case attribute the theory needs


MARGINAL_ESTIMATORS = {e.name: e for e in [
    MarginalEstimator("log_mean_exp", marginal.log_mean_exp, 1, _log_mean_exp_theory),
    MarginalEstimator("elbo", marginal.elbo, 1, lambda case, K: (case.elbo_gap.value,) * 2, "elbo_gap"),
    MarginalEstimator("jackknife1", lambda lw: marginal.jackknife_log_mean_exp(lw, 1), 2, _jackknife1_theory),
    MarginalEstimator("jackknife2", lambda lw: marginal.jackknife_log_mean_exp(lw, 2), 3,
                      lambda case, K: (0.0, 0.0)),  # bias O(K^-3): below both orders
]}


def _run_cell(case: MarginalCase, spec: MarginalEstimator, K: int, replicates: int, seed: int, bar) -> dict:
    per_chunk = max(1, CHUNK_ELEMENTS // K)
    sizes = [per_chunk] * (replicates // per_chunk) + ([replicates % per_chunk] if replicates % per_chunk else [])
    truth = case.log_marginal.value
    est, ratio, ess, khat = [], [], [], math.nan
    for i, reps in enumerate(sizes):
        g = torch.Generator().manual_seed(chunk_seed(seed, case.name, spec.name, K, i))
        log_w = case.draw_log_w((reps,), K, g)
        est.append(spec.fn(log_w).double())
        ratio.append(marginal.marginal_ratio(log_w, truth))
        ess.append(marginal.effective_sample_size(log_w))
        if i == 0 and K >= 64:  # below, fewer than 10 values in the tail fit
            khat = marginal.weight_khat(log_w[0])  # what a user sees for one estimate
        bar.update(1)
    v = torch.cat(est).numpy()
    cv = v - (torch.cat(ratio).numpy() - 1)
    has_theory = spec.theory is not None and getattr(case, spec.needs) is not None
    first, second = spec.theory(case, K) if has_theory else (math.nan, math.nan)
    return dict(
        case=case.name, estimator=spec.name, K=K, replicates=replicates, seed=seed, truth=truth,
        truth_method=case.log_marginal.describe(), mean=float(v.mean()), bias=float(v.mean() - truth),
        bias_se=float(v.std(ddof=1) / math.sqrt(replicates)), bias_cv=float(cv.mean() - truth),
        bias_cv_se=float(cv.std(ddof=1) / math.sqrt(replicates)), var=float(v.var(ddof=1)),
        rmse=float(np.sqrt(np.mean((v - truth) ** 2))), theory_first=first, theory_second=second, khat=khat,
        ess=float(torch.cat(ess).mean()), nonfinite=int((~np.isfinite(v)).sum()))


def run_marginal_study(cases, estimators, Ks=DEFAULT_KS, replicates: int = 1000, seed: int = 0,
                       progress: bool = False) -> pd.DataFrame:
    """One row per (case, estimator, K), columns :data:`COLUMNS`; cells with K below an estimator's
    minimum are skipped and listed in ``frame.attrs["skipped"]``.

    ``var`` is the variance of one estimate over replicates; ``theory_second`` is the prediction to
    second order (first plus second term), NaN where the case lacks the moments; ``khat`` is the Pareto
    k̂ of the first replicate's K weights (NaN for K < 64); ``ess`` is the mean Kish effective sample size.
    """
    built = [get_case(c, kind="marginal") for c in cases]
    unknown = [e for e in estimators if e not in MARGINAL_ESTIMATORS]
    if not built or not estimators or unknown:
        raise ValueError(f"cases and estimators must be non-empty lists of known names; unknown estimators "
                         f"{unknown}, known: {', '.join(MARGINAL_ESTIMATORS)}")
    if not Ks or any(isinstance(k, bool) or not isinstance(k, int) or k < 1 for k in Ks):
        raise ValueError(f"Ks must be positive ints, got {Ks!r}")
    if isinstance(replicates, bool) or not isinstance(replicates, int) or replicates < 2:
        raise ValueError(f"replicates must be an int ≥ 2, got {replicates!r}")
    specs = [MARGINAL_ESTIMATORS[e] for e in estimators]
    cells = [(c, s, k) for c in built for s in specs for k in Ks if k >= s.min_k]
    skipped = [f"{s.name} at K = {k}: needs K ≥ {s.min_k}" for s in specs for k in Ks if k < s.min_k]
    total = sum(math.ceil(replicates / max(1, CHUNK_ELEMENTS // k)) for _, _, k in cells)
    with tqdm(total=total, desc="marginal study", unit="chunk", disable=not progress) as bar:
        rows = [_run_cell(c, s, k, replicates, seed, bar) for c, s, k in cells]
    frame = pd.DataFrame(rows, columns=COLUMNS)
    frame.attrs["skipped"] = skipped
    return frame
