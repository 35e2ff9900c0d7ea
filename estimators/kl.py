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

All functions work on any device and float dtype and return the input dtype. They compute in at least
float32 (float16 and bfloat16 inputs are upcast, so half-precision log-probs lose nothing but the final
rounding; see the README's accuracy table); ``expm1`` keeps ``r - 1`` accurate when p ≈ q. Where the true
estimate exceeds the dtype's range (e.g. k3 for log r above ~88.7 in float32, or a log-ratio of finite
log-probs that overflows) the result is ``±inf``, never NaN.
"""
from __future__ import annotations

import torch
from torch import Tensor

from ._validate import check_log_probs

__all__ = ["log_ratio", "k1", "k2", "k3", "reverse_kl", "verl_low_var_kl", "openrlhf_k3", "k1_control_variate",
           "k3_of_log_ratio"]


def log_ratio(log_p: Tensor, log_q: Tensor) -> Tensor:
    """``log r = log q(x) - log p(x)`` after checking the inputs, in the input dtype (±inf where it overflows)."""
    return _log_ratio(log_p, log_q).to(log_p.dtype)


def k1(log_p: Tensor, log_q: Tensor) -> Tensor:
    """Naive Monte Carlo KL: ``-log r``; unbiased, may be negative."""
    return (-_log_ratio(log_p, log_q)).to(log_p.dtype)


def k2(log_p: Tensor, log_q: Tensor) -> Tensor:
    """``(log r)^2 / 2``; biased upward by ``E_p[(log r)^2]/2 - KL``, low variance when p ≈ q."""
    return (_log_ratio(log_p, log_q).square() / 2).to(log_p.dtype)


def k3(log_p: Tensor, log_q: Tensor) -> Tensor:
    """``(r - 1) - log r`` ≥ 0 (Schulman's k3); unbiased where ``E_p[r] = 1``."""
    return k3_of_log_ratio(_log_ratio(log_p, log_q)).to(log_p.dtype)


def reverse_kl(log_p: Tensor, log_q: Tensor) -> Tensor:
    r"""``r log r - (r - 1)`` ≥ 0: estimates the reverse KL(q || p) from samples of p.

    For log r ≤ 1 it is computed as written (``-expm1`` keeps r → 0 at 1); above, as
    :math:`e^{\log r}(\log r - 1) + 1`, a product of two positive numbers that overflows to ``+inf`` only where
    the value itself exceeds the dtype's range (log r above ~84.5 in float32, ~703 in float64)."""
    lr = _log_ratio(log_p, log_q)
    low = lr.clamp(-1e4, 1.0)  # e^-1e4 is 0 in every dtype, so the clamp is exact and keeps -inf · 0 out
    high = lr.clamp_min(1.0)
    out = torch.where(lr > 1, torch.exp(high) * (high - 1) + 1, low * torch.exp(low) - torch.expm1(low))
    return out.to(log_p.dtype)


def verl_low_var_kl(log_p: Tensor, log_q: Tensor) -> Tensor:
    """verl's ``low_var_kl``: k3 with ``log r`` clamped to [-20, 20] before ``exp`` and the result to [-10, 10].

    verl writes k3 as ``exp(lr) - lr - 1``; this is the same function through ``expm1``, without that form's
    cancellation near r = 1 (relative error up to 5 in float32 on sampled log-probs)."""
    lr = _log_ratio(log_p, log_q).clamp(-20.0, 20.0)
    return k3_of_log_ratio(lr).clamp(-10.0, 10.0).to(log_p.dtype)


def openrlhf_k3(log_p: Tensor, log_q: Tensor) -> Tensor:
    """OpenRLHF's k3: ``(r - 1) - log r`` with the result clamped to [-10, 10]."""
    return k3_of_log_ratio(_log_ratio(log_p, log_q)).clamp(-10.0, 10.0).to(log_p.dtype)


def k3_of_log_ratio(lr: Tensor) -> Tensor:
    """``expm1(lr) - lr``: ``+inf`` (never ``inf - inf``) where ``lr`` is ``±inf`` or ``expm1`` overflows, where
    the true value exceeds the dtype's range too."""
    return torch.expm1(lr) - lr.clamp_max(torch.finfo(lr.dtype).max)


def _log_ratio(log_p: Tensor, log_q: Tensor) -> Tensor:
    """``log q - log p`` after checking the inputs, computed in at least float32 (float16 and bfloat16 inputs
    are upcast: their difference is rounded once to float32, and nothing downstream to 3 significant digits)."""
    check_log_probs(log_p, log_q)
    work = torch.promote_types(log_p.dtype, torch.float32)
    return log_q.to(work) - log_p.to(work)


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

    λ y is invariant under :math:`x \to x/t,\ y \to y/s` (it becomes :math:`t \cdot λ' y'`), so rows whose y
    would overflow (x above 300) or whose x would (|x| above 1e150) are computed in units of their largest
    value: a log-ratio of 710 or more no longer turns its row into NaN. Computed in float64 and returned in
    the input dtype (``±inf`` where an estimate exceeds its range). A log-ratio that overflows float64
    itself (float64 log-probs beyond ±8.9e307) is a ValueError.
    """
    lr = _log_ratio(log_p, log_q)
    x = lr.double()
    if not bool(torch.isfinite(x).all()):
        raise ValueError("log_q - log_p overflows float64; log_p and log_q must be within ±8.9e307")
    if x.dim() == 0 or x.shape[-1] < 3:
        return k3_of_log_ratio(x).to(log_p.dtype)
    return (_loo_lambda_times_y(x) - x).to(log_p.dtype)


def _loo_lambda_times_y(x: Tensor) -> Tensor:
    """λ_{-i} (r_i - 1) for every sample of the rows ``x`` (float64, n ≥ 3): see :func:`k1_control_variate`."""
    n = x.shape[-1]
    drop = -n / (n - 1)
    t, log_s = _units(x)
    xs, ys = x / t, _scaled_expm1(x, log_s)
    xc, yc = xs - xs.mean(-1, keepdim=True), ys - ys.mean(-1, keepdim=True)
    sxx, sxy, syy = (torch.linalg.vecdot(u, v).unsqueeze(-1) for u, v in ((xc, xc), (xc, yc), (yc, yc)))
    cov = torch.addcmul(sxy, xc, yc, value=drop)
    var = torch.addcmul(syy, yc, yc, value=drop)
    others_yy = torch.addcmul(torch.linalg.vecdot(ys, ys).unsqueeze(-1), ys, ys, value=-1.0)  # Σ_{j≠i} y_j²
    lam_y = _lambda_times_y(cov, var, others_yy, t, x, log_s)
    dominant = (var < 0.5 * syy) | (torch.addcmul(sxx, xc, xc, value=drop) < 0.5 * sxx)
    if bool(dominant.any()):
        lam_y[dominant] = _others_directly(x, dominant)
    return lam_y


def _units(u: Tensor) -> tuple[Tensor, Tensor]:
    """Per row of ``u``: t = max|u| where that exceeds 1e150 (else 1) and L = max u where that exceeds 300
    (else 0), so that x / t and (e^x - 1) / e^L of the row, and products of two of them, are finite."""
    big, top = u.abs().amax(-1, keepdim=True), u.amax(-1, keepdim=True)
    return (torch.where(big > 1e150, big, torch.ones_like(big)),
            torch.where(top > 300, top, torch.zeros_like(top)))


def _scaled_expm1(x: Tensor, log_s: Tensor, lam: Tensor | float = 1.0) -> Tensor:
    r""":math:`\lambda (e^x - 1) / e^L`, finite wherever the value is: above x = 700 as
    :math:`(\lambda e^h) e^h - \lambda e^{-L}` with h = (x - L)/2, so e^x itself never overflows."""
    h = (x.clamp_min(700) - log_s) / 2
    big = (lam * torch.exp(h)) * torch.exp(h) - lam * torch.exp(-log_s)
    # (e^x - 1)·e^-L first: it is at most ~1, where λ·(e^x - 1) alone can overflow before e^-L takes it back
    return torch.where(x > 700, big, lam * (torch.expm1(x.clamp_max(700)) * torch.exp(-log_s)))


def _lambda_times_y(cov: Tensor, var: Tensor, others_yy: Tensor, t: Tensor, x: Tensor, log_s: Tensor) -> Tensor:
    """λ y = (cov / var) · y' · t from the others' sums in units (t, e^L); y = e^x - 1 itself (λ = 1) where the
    others' r are all equal (their Σ(y - ȳ)² is rounding noise against Σy²)."""
    degenerate = var <= 64 * torch.finfo(torch.float64).eps * others_yy
    lam = cov / torch.where(degenerate, torch.ones_like(var), var)
    return torch.where(degenerate, _scaled_expm1(x, torch.zeros_like(log_s)), _scaled_expm1(x, log_s, lam) * t)


def _others_directly(x: Tensor, where: Tensor) -> Tensor:
    """λ_{-i} (r_i - 1) at the samples ``where``, from the other samples' sums computed directly (two passes,
    in the others' own units)."""
    n = x.shape[-1]
    rows = x.reshape(-1, n)
    row, i = where.reshape(-1, n).nonzero(as_tuple=True)
    keep = torch.ones(len(row), n, dtype=torch.bool, device=x.device)
    keep[torch.arange(len(row), device=x.device), i] = False
    xo = rows[row][keep].view(-1, n - 1)
    t, log_s = _units(xo)
    xs, ys = xo / t, _scaled_expm1(xo, log_s)
    xd, yd = xs - xs.mean(-1, keepdim=True), ys - ys.mean(-1, keepdim=True)
    sums = (torch.linalg.vecdot(u, v).unsqueeze(-1) for u, v in ((xd, yd), (yd, yd), (ys, ys)))
    return _lambda_times_y(*sums, t, rows[row, i].unsqueeze(-1), log_s).squeeze(-1)
