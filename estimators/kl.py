r"""Per-sample Monte Carlo estimators of KL(p || q) from samples ``x ~ p``.

Every function takes ``log_p = log p(x)`` and ``log_q = log q(x)`` for samples ``x ~ p`` (the sampling
policy and the reference, in RLHF terms) and returns per-sample estimates of the same shape. With the
log-ratio :math:`\log r = \log q(x) - \log p(x)`:

- ``k1 = -log r``: unbiased for KL(p||q); negative whenever q(x) > p(x); high variance when p ≈ q.
- ``k2 = (log r)^2 / 2``: biased, :math:`E[k_2] = E_p[(\log r)^2]/2 \ge KL` (for a unit Gaussian shift μ
  the bias is μ⁴/8), but low variance when p ≈ q.
- ``k3 = (r - 1) - log r``: k1 plus the control variate ``r - 1`` with :math:`E_p[r-1]=0`; never negative,
  unbiased **only where q's support lies inside p's** (otherwise :math:`E_p[r] < 1` and the bias is
  :math:`E_p[r]-1`). Its variance is finite only where :math:`E_p[r^2] < \infty`.
- ``reverse_kl``: ``r log r - (r - 1)`` estimates the *reverse* KL(q || p) from the same samples of p
  (importance weight r turns :math:`E_p[r\log r]` into :math:`E_q[\log r]`); same support condition as k3.
- ``verl_low_var_kl`` and ``openrlhf_k3``: the clamped k3 of production RLHF code, kept so that the bias
  the clamps introduce can be measured.
- ``k1_control_variate``: ``k1 + λ (r - 1)`` with λ estimated from the other samples (leave-one-out), so
  the estimate stays unbiased while λ is close to the variance-minimising :math:`\operatorname{Cov}(\log r, r)/\operatorname{Var}(r)`.

All functions work on any device and float dtype; ``expm1`` keeps ``r - 1`` accurate when p ≈ q.
"""
from __future__ import annotations

import torch
from torch import Tensor

from ._validate import check_log_probs

__all__ = ["log_ratio", "k1", "k2", "k3", "reverse_kl", "verl_low_var_kl", "openrlhf_k3", "k1_control_variate"]


def log_ratio(log_p: Tensor, log_q: Tensor) -> Tensor:
    """``log r = log q(x) - log p(x)`` after checking the inputs."""
    check_log_probs(log_p, log_q)
    return log_q - log_p


def k1(log_p: Tensor, log_q: Tensor) -> Tensor:
    """Naive Monte Carlo KL: ``-log r``; unbiased, may be negative."""
    return -log_ratio(log_p, log_q)


def k2(log_p: Tensor, log_q: Tensor) -> Tensor:
    """``(log r)^2 / 2``; biased upward by ``E_p[(log r)^2]/2 - KL``, low variance when p ≈ q."""
    return log_ratio(log_p, log_q).square() / 2


def k3(log_p: Tensor, log_q: Tensor) -> Tensor:
    """``(r - 1) - log r`` ≥ 0 (Schulman's k3); unbiased where ``E_p[r] = 1``."""
    lr = log_ratio(log_p, log_q)
    return torch.expm1(lr) - lr


def reverse_kl(log_p: Tensor, log_q: Tensor) -> Tensor:
    """``r log r - (r - 1)`` ≥ 0: estimates the reverse KL(q || p) from samples of p."""
    lr = log_ratio(log_p, log_q)
    return torch.exp(lr) * lr - torch.expm1(lr)


def verl_low_var_kl(log_p: Tensor, log_q: Tensor) -> Tensor:
    """verl's ``low_var_kl``: k3 with ``log r`` clamped to [-20, 20] before ``exp`` and the result to [-10, 10]."""
    lr = log_ratio(log_p, log_q).clamp(-20.0, 20.0)
    return (torch.exp(lr) - lr - 1).clamp(-10.0, 10.0)


def openrlhf_k3(log_p: Tensor, log_q: Tensor) -> Tensor:
    """OpenRLHF's k3: ``(r - 1) - log r`` with the result clamped to [-10, 10]."""
    lr = log_ratio(log_p, log_q)
    return (torch.expm1(lr) - lr).clamp(-10.0, 10.0)


def k1_control_variate(log_p: Tensor, log_q: Tensor) -> Tensor:
    r"""``-log r_i + λ_{-i} (r_i - 1)`` with a leave-one-out λ along the last dimension.

    The last dimension holds the i.i.d. samples of one estimate. For sample i, λ is the
    variance-minimising coefficient :math:`\widehat{\operatorname{Cov}}(\log r, r)/\widehat{\operatorname{Var}}(r)`
    computed from the *other* samples, so λ_{-i} is independent of r_i and
    :math:`E[λ_{-i}(r_i - 1)] = E[λ_{-i}]\,E[r_i - 1] = 0`: the estimate stays unbiased wherever k3 is.
    With :math:`x = \log r`, :math:`y = r - 1`, their deviations :math:`\tilde x, \tilde y` from the means of all
    n samples and m = n - 1, the other samples' centred sums are exactly

    .. math:: \sum_{j \ne i} (x_j - \bar x_{-i})(y_j - \bar y_{-i}) = \sum_j \tilde x_j \tilde y_j - \tfrac{n}{m}\,\tilde x_i \tilde y_i,

    and likewise for :math:`y` with itself, so every λ_{-i} costs O(1) after a few dot products per row.
    Where sample i holds more than half of its row's spread in x or y (a ratio far out in the tail), that
    subtraction would cancel most digits, and the other samples' sums are computed directly instead.
    λ = 1 (k3) where fewer than three samples are given or the other samples' r are all equal.
    Computed in float64 and returned in the input dtype.
    """
    lr = log_ratio(log_p, log_q)
    n = lr.shape[-1] if lr.dim() else 1
    x = lr.double()
    y = torch.expm1(x)  # r - 1, the control variate
    if n < 3:
        return (y - x).to(lr.dtype)
    drop = -n / (n - 1)
    xc, yc = x - x.mean(-1, keepdim=True), y - y.mean(-1, keepdim=True)
    sxx, sxy, syy = (torch.linalg.vecdot(u, v).unsqueeze(-1) for u, v in ((xc, xc), (xc, yc), (yc, yc)))
    cov = torch.addcmul(sxy, xc, yc, value=drop)
    var = torch.addcmul(syy, yc, yc, value=drop)
    others_yy = torch.addcmul(torch.linalg.vecdot(y, y).unsqueeze(-1), y, y, value=-1.0)  # Σ_{j≠i} y_j²
    dominant = (var < 0.5 * syy) | (torch.addcmul(sxx, xc, xc, value=drop) < 0.5 * sxx)
    if bool(dominant.any()):
        _others_sums_directly(x, y, dominant, cov, var, others_yy)
    degenerate = var <= 64 * torch.finfo(torch.float64).eps * others_yy  # the others' r all equal
    lam = cov.div_(var).masked_fill_(degenerate, 1.0)
    return lam.mul_(y).sub_(x).to(lr.dtype)


def _others_sums_directly(x: Tensor, y: Tensor, where: Tensor, cov: Tensor, var: Tensor, others_yy: Tensor) -> None:
    """At the samples ``where``, overwrite the other samples' centred sums Σ(x-x̄)(y-ȳ) and Σ(y-ȳ)², and their
    Σy², with values computed from those samples alone (two passes each)."""
    n = x.shape[-1]
    where = where.reshape(-1, n)
    row, i = where.nonzero(as_tuple=True)
    keep = torch.ones(len(row), n, dtype=torch.bool, device=x.device)
    keep[torch.arange(len(row), device=x.device), i] = False
    xo, yo = (t.reshape(-1, n)[row][keep].view(-1, n - 1) for t in (x, y))
    xd, yd = xo - xo.mean(-1, keepdim=True), yo - yo.mean(-1, keepdim=True)
    cov.view(-1, n)[where] = torch.linalg.vecdot(xd, yd)
    var.view(-1, n)[where] = torch.linalg.vecdot(yd, yd)
    others_yy.view(-1, n)[where] = torch.linalg.vecdot(yo, yo)
