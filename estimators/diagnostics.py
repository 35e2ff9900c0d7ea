r"""Tail diagnostics for Monte Carlo samples.

:func:`pareto_khat` fits a generalized Pareto distribution to the largest values, as PSIS does
(Vehtari, Simpson, Gelman, Yao, Gabry 2024), with the empirical-Bayes estimator of Zhang & Stephens
(2009). A tail with shape k has finite moments of order < 1/k: k̂ ≥ 0.5 means the variance is
(probably) infinite, so a central-limit z-test of the mean is meaningless; k̂ > 0.7 makes even the mean
unreliable at practical sample sizes.
"""
from __future__ import annotations

import math

import numpy as np
import torch
from torch import Tensor

__all__ = ["pareto_khat", "MIN_TAIL_SAMPLES"]

#: The fewest values :func:`pareto_khat` accepts, and the fewest exceedances it fits.
MIN_TAIL_SAMPLES = 20
_MIN_EXCEEDANCES = 10


def pareto_khat(x: Tensor, tail: str = "right") -> float:
    """Pareto k̂ of the upper tail of ``x`` (``tail="both"``: of ``|x - median|``), from the largest
    ``M = max(min(n/5, 3√n), 10)`` values: PSIS's tail size, but never fewer than the 10 a fit needs (so
    for 20 ≤ n < 50 the tail is up to half the sample, and k̂ noisier, shrunk towards 0.5 by the prior).
    Returns ``-inf`` when the tail is degenerate (fewer than 10 distinct exceedances of the threshold: ties)."""
    if not isinstance(x, Tensor):
        raise ValueError(f"x must be a torch.Tensor, got {type(x).__name__}")
    if tail not in ("right", "both"):
        raise ValueError(f"tail must be 'right' or 'both', got {tail!r}")
    v = x.detach().reshape(-1).double().cpu()
    if v.numel() < MIN_TAIL_SAMPLES:
        raise ValueError(f"x needs at least {MIN_TAIL_SAMPLES} values for a tail fit, got {v.numel()}")
    if not bool(torch.isfinite(v).all()):
        raise ValueError("x contains non-finite values")
    if tail == "both":
        v = (v - v.median()).abs()
    n = v.numel()
    m = max(int(min(0.2 * n, 3 * math.sqrt(n))), _MIN_EXCEEDANCES)
    top = torch.topk(v, m + 1).values.numpy()[::-1]  # ascending: threshold first
    exceed = top[1:] - top[0]
    exceed = exceed[exceed > 0]  # ties at the threshold carry no tail information
    if exceed.shape[0] < _MIN_EXCEEDANCES:
        return -math.inf
    return _gpd_shape(exceed / exceed[-1])  # the shape is scale-free; in units of the largest nothing overflows


def _gpd_shape(x: np.ndarray) -> float:
    """Zhang & Stephens (2009) posterior-mean GPD shape for sorted positive exceedances ``x``,
    with the weakly informative prior PSIS uses (shrinks k̂ towards 0.5 by 10 pseudo-observations)."""
    n = x.shape[0]
    m_est = 30 + int(math.sqrt(n))
    b = 1 - np.sqrt(m_est / (np.arange(1, m_est + 1) - 0.5))
    b /= 3 * x[int(n / 4 + 0.5) - 1]
    b += 1 / x[-1]
    k = np.log1p(-b[:, None] * x).mean(axis=1)
    with np.errstate(divide="ignore", invalid="ignore"):
        log_lik = n * (np.log(-b / k) - k - 1)
    keep = np.isfinite(log_lik)  # a grid point with b = 0 (so k = 0) is the limit of its neighbours
    b, log_lik = b[keep], log_lik[keep]
    with np.errstate(over="ignore"):  # an overflowing term only sends a negligible weight to 0
        weights = 1 / np.exp(log_lik - log_lik[:, None]).sum(axis=1)
    b_post = np.sum(b * weights / weights.sum())
    k_post = np.log1p(-b_post * x).mean()
    return float((n * k_post + 10 * 0.5) / (n + 10))
