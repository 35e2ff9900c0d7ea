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
    λ = 1 (k3) where fewer than three samples are given or the other samples' r are all equal.
    Computed in float64 and returned in the input dtype.
    """
    lr = log_ratio(log_p, log_q)
    n = lr.shape[-1] if lr.dim() else 1
    x = lr.double()
    y = torch.expm1(x)  # r - 1, the control variate
    if n < 3:
        lam = torch.ones_like(x)
    else:
        m = n - 1  # leave-one-out sums: total minus own term
        sx = x.sum(-1, keepdim=True) - x
        sy = y.sum(-1, keepdim=True) - y
        sxy = (x * y).sum(-1, keepdim=True) - x * y
        syy = (y * y).sum(-1, keepdim=True) - y * y
        cov = sxy - sx * sy / m
        var = syy - sy * sy / m
        degenerate = var <= 64 * torch.finfo(torch.float64).eps * syy  # the others' r are all equal
        lam = torch.where(degenerate, torch.ones_like(var), cov / torch.where(degenerate, torch.ones_like(var), var))
    return (lam * y - x).to(lr.dtype)
