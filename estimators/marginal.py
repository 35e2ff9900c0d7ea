r"""Marginal-likelihood estimators from log importance weights, reduced over the last dimension.

The input is ``log_w[..., K]`` with :math:`\log w_k = \log p(x, z_k) - \log q(z_k \mid x)`, :math:`z_k \sim q`
i.i.d. Then :math:`\hat A = \frac1K\sum_k w_k` is unbiased for :math:`p(x)` (:math:`E_q[w] = p(x)`), and by
Jensen :math:`E[\log \hat A] \le \log p(x)`: the IWAE bound, increasing in K (Burda et al. 2016), with the
ELBO as its K = 1 case. With :math:`\mu, \mu_2, \mu_3` the mean and central moments of w, the delta
method (Nowozin 2018) gives

.. math:: E[\log \hat A] - \log \mu = -\frac{\mu_2}{2K\mu^2}
          + \frac{1}{K^2}\Big(\frac{\mu_3}{3\mu^3} - \frac{3\mu_2^2}{4\mu^4}\Big) + O(K^{-3}),

and the jackknife removes the 1/K (order 1) or the 1/K and 1/K² terms (order 2), leaving O(K^-2) or
O(K^-3). Everything is computed in log space: log-weights near -1e4 and K = 1e5 are fine; an entry of
-inf (w = 0) is allowed, NaN and +inf are not.
"""
from __future__ import annotations

import math
from fractions import Fraction

import torch
from torch import Tensor

from ._validate import check_finite, check_float_tensor, positive_int, real_number
from .diagnostics import MIN_TAIL_SAMPLES, pareto_khat

__all__ = ["log_mean_exp", "iwae", "elbo", "log_weights", "marginal_ratio", "effective_sample_size", "weight_khat",
           "delta_method_bias", "lognormal_moments", "lognormal_bias", "jackknife_log_mean_exp"]


def _check_log_w(log_w: Tensor, min_k: int = 1) -> int:
    """Validate ``log_w[..., K]`` and return K."""
    check_float_tensor("log_w", log_w)
    if log_w.dim() == 0:
        raise ValueError("log_w must have a last dimension holding the K log-weights, got a 0-d tensor")
    k = log_w.shape[-1]
    if k < min_k:
        raise ValueError(f"log_w needs at least {min_k} log-weights along its last dimension, got {k}")
    if log_w.numel() and not bool(log_w.max() < math.inf):  # the max is NaN if any entry is
        raise ValueError("log_w contains NaN or +inf; log-weights must be finite or -inf (w = 0)")
    return k


def _work(t: Tensor) -> Tensor:
    """``t`` in at least float32 (float16 and bfloat16 are upcast)."""
    return t.to(torch.promote_types(t.dtype, torch.float32))


def log_mean_exp(log_w: Tensor) -> Tensor:
    r""":math:`\log \frac1K \sum_k e^{\log w_k}` over the last dimension, max-shifted (``torch.logsumexp``).

    A row of only -inf gives -inf (:math:`\hat A = 0`). Computed in at least float32, returned in ``log_w``'s dtype."""
    return _log_mean_exp(log_w).to(log_w.dtype)


def _log_mean_exp(log_w: Tensor) -> Tensor:
    """:func:`log_mean_exp` in its working dtype (at least float32), before rounding to ``log_w``'s."""
    k = _check_log_w(log_w)
    return torch.logsumexp(_work(log_w), dim=-1) - math.log(k)


def iwae(log_w: Tensor) -> Tensor:
    r"""The K-sample IWAE bound :math:`\log \frac1K\sum_k w_k` (= :func:`log_mean_exp`); :math:`E \le \log p(x)`."""
    return log_mean_exp(log_w)


def elbo(log_w: Tensor) -> Tensor:
    r"""The K-sample average of the 1-sample bound, :math:`\frac1K\sum_k \log w_k`; its expectation is
    :math:`\log p(x) - KL(q(z|x) \,\|\, p(z|x))`, whatever K; -inf for a row with any -inf. Computed in
    float64 as :math:`s \cdot \operatorname{mean}(\log w / s)` with s the row's largest finite |log w| (at least
    1), so no sum overflows, even of float64 log-weights near its max; returned in ``log_w``'s dtype."""
    _check_log_w(log_w)
    lw = log_w.double()
    scale = lw.abs().masked_fill(lw == -math.inf, 0.0).amax(-1, keepdim=True).clamp_min(1.0)
    return ((lw / scale).mean(-1) * scale.squeeze(-1)).to(log_w.dtype)


def log_weights(log_joint: Tensor, log_proposal: Tensor) -> Tensor:
    r""":math:`\log w = \log p(x, z) - \log q(z|x)` for :math:`z \sim q`: ``log_proposal`` must be finite,
    ``log_joint`` may be -inf (z outside the model's support)."""
    for name, value in (("log_joint", log_joint), ("log_proposal", log_proposal)):
        check_float_tensor(name, value)
    if log_joint.shape != log_proposal.shape:
        raise ValueError(f"log_joint and log_proposal must have the same shape, got {tuple(log_joint.shape)} "
                         f"and {tuple(log_proposal.shape)}")
    if log_joint.dtype != log_proposal.dtype or log_joint.device != log_proposal.device:
        raise ValueError("log_joint and log_proposal must have the same dtype and device")
    check_finite("log_proposal", log_proposal, "the proposal's log-density at its own samples must be finite")
    if bool((torch.isnan(log_joint) | (log_joint == math.inf)).any()):
        raise ValueError("log_joint contains NaN or +inf")
    return log_joint - log_proposal


def marginal_ratio(log_w: Tensor, log_marginal: float | Tensor) -> Tensor:
    r""":math:`\hat A / p(x) = \exp(\mathrm{log\_mean\_exp}(\log w) - \log p(x))`, unbiased for 1.

    Formed in log space, so it is accurate however small p(x) is; ``log_marginal`` broadcasts against
    ``log_w.shape[:-1]`` (the result has that shape: a ``log_marginal`` that would enlarge it is an error).
    Formed in float64 and returned in ``log_w``'s dtype: ``+inf`` where the ratio exceeds its range."""
    lme = _log_mean_exp(log_w).double()
    lm = torch.as_tensor(log_marginal, dtype=torch.float64, device=lme.device)
    if not bool(torch.isfinite(lm).all()):
        raise ValueError(f"log_marginal must be finite, got {log_marginal}")
    if lm.dim() > lme.dim() or any(m not in (1, n) for m, n in zip(lm.shape[::-1], lme.shape[::-1])):
        raise ValueError(f"log_marginal of shape {tuple(lm.shape)} must broadcast to log_w.shape[:-1] = "
                         f"{tuple(lme.shape)} without enlarging it")
    return torch.exp(lme - lm).to(log_w.dtype)


def effective_sample_size(log_w: Tensor) -> Tensor:
    r"""Kish's :math:`(\sum w)^2 / \sum w^2 = \exp(2\,\mathrm{lse}(\log w) - \mathrm{lse}(2\log w))`, in [1, K];
    0 for a row of only -inf. Shift-invariant, so computed on :math:`\log w - \max \log w` (no ``2 log w``
    overflows; a row of only -inf is computed as zeros, so its gradient is 0, not NaN), in at least float32,
    returned in ``log_w``'s dtype."""
    _check_log_w(log_w)
    lw = _work(log_w)
    top = lw.amax(-1, keepdim=True)
    dead = top == -math.inf
    shifted = (lw - top.masked_fill(dead, 0.0)).masked_fill(dead, 0.0)
    ess = torch.exp(2 * torch.logsumexp(shifted, dim=-1) - torch.logsumexp(2 * shifted, dim=-1))
    return ess.masked_fill(dead.squeeze(-1), 0.0).to(log_w.dtype)


def weight_khat(log_w: Tensor) -> float:
    r"""Pareto k̂ of the right tail of the K weights of one estimate (1-D ``log_w``), from
    :func:`estimators.diagnostics.pareto_khat` on :math:`\exp(\log w - \max \log w)`.

    PSIS's reading (Vehtari et al. 2024): k̂ < 0.5 fine; 0.5–0.7 finite mean but slow convergence;
    k̂ > 0.7 the estimate is untrustworthy at this K. Log-normal weights have all moments, but their
    tail looks heavy at practical K (s = 3 gives k̂ ≈ 0.8–1.1 at K = 1e4)."""
    _check_log_w(log_w, min_k=MIN_TAIL_SAMPLES)
    if log_w.dim() != 1:
        raise ValueError(f"log_w must be 1-D (the K log-weights of one estimate), got shape {tuple(log_w.shape)}")
    top = log_w.max()
    if top == -math.inf:
        raise ValueError("log_w is all -inf: every weight is zero")
    return pareto_khat(torch.exp(log_w.double() - top))


def delta_method_bias(mu: float, mu2: float, K: int, mu3: float | None = None) -> float:
    r"""Bias of :math:`\log \hat A_K` for :math:`\log \mu` by the delta method (Nowozin 2018).

    First order :math:`-\mu_2/(2K\mu^2)` (:math:`\mu_2` the variance of w); with ``mu3`` (the third central
    moment) also the second-order term :math:`(\mu_3/(3\mu^3) - 3\mu_2^2/(4\mu^4))/K^2`. From
    :math:`\log(1+\delta) = \delta - \delta^2/2 + \delta^3/3 - \delta^4/4 + \dots` with
    :math:`E\delta^2 = \mu_2/(K\mu^2)`, :math:`E\delta^3 = \mu_3/(K^2\mu^3)`,
    :math:`E\delta^4 = 3\mu_2^2/(K^2\mu^4) + O(K^{-3})`.

    The moments are finite real numbers (floats, NumPy scalars or one-element tensors), K a positive integer
    (also NumPy's or a 0-d tensor's). Evaluated exactly in rationals and rounded once, so no intermediate
    over- or underflows (mu = 1e-200 is fine); ``±inf`` where the bias itself exceeds the float range."""
    mu, mu2 = real_number("mu", mu), real_number("mu2", mu2)
    if not mu > 0:
        raise ValueError(f"mu must be positive, got {mu}")
    if not mu2 >= 0:
        raise ValueError(f"mu2 must be a non-negative variance, got {mu2}")
    m3 = None if mu3 is None else Fraction(real_number("mu3", mu3))
    return _delta_bias(Fraction(mu), Fraction(mu2), positive_int("K", K), m3)


def _delta_bias(m: Fraction, m2: Fraction, k: int, m3: Fraction | None) -> float:
    """:func:`delta_method_bias` in exact rationals, rounded once to a float (``±inf`` beyond its range)."""
    bias = -m2 / (2 * k * m ** 2)
    if m3 is not None:
        bias += (m3 / (3 * m ** 3) - 3 * m2 ** 2 / (4 * m ** 4)) / k ** 2
    try:
        return float(bias)
    except OverflowError:
        return math.inf if bias > 0 else -math.inf


def lognormal_moments(s: float) -> tuple[float, float, float]:
    r"""Mean and central moments :math:`(\mu, \mu_2, \mu_3)` of :math:`w/E[w]` for :math:`\log w \sim N(m, s^2)`.

    With :math:`t = e^{s^2}`, :math:`E[(w/Ew)^n] = t^{n(n-1)/2}`, so :math:`\mu = 1`, :math:`\mu_2 = t - 1`,
    :math:`\mu_3 = t^3 - 3t + 2 = (t-1)^2(t+2)`. A moment beyond the float range is ``inf`` (:math:`\mu_2` for
    :math:`s^2` above 709.78, :math:`\mu_3` for :math:`s^2` above about 236.6)."""
    e = _lognormal_e(s)
    return 1.0, e, e * e * (e + 3)


def _lognormal_e(s: float) -> float:
    """e^{s²} - 1 for a finite s ≥ 0 (``expm1``: accurate for small s), ``inf`` beyond the float range."""
    s = real_number("s", s)
    if s < 0:
        raise ValueError(f"s must be non-negative, got {s}")
    try:
        return math.expm1(s * s)
    except OverflowError:
        return math.inf


def lognormal_bias(s: float, K: int, order: int = 2) -> float:
    r"""Delta-method bias of :math:`\log \hat A_K` for log-normal weights with log-sd ``s``.

    With :math:`e = e^{s^2} - 1`: order 1 :math:`-e/(2K)`; order 2 adds :math:`e^2(4e + 3)/(12K^2)` (exact, as
    in :func:`delta_method_bias`). Where e itself is beyond the float range, the dominant term's sign:
    ``-inf`` at order 1, ``+inf`` at order 2."""
    if order not in (1, 2):
        raise ValueError(f"order must be 1 or 2, got {order!r}")
    e, k = _lognormal_e(s), positive_int("K", K)
    if math.isinf(e):
        return math.inf if order == 2 else -math.inf
    m2 = Fraction(e)
    return _delta_bias(Fraction(1), m2, k, m2 * m2 * (m2 + 3) if order == 2 else None)


class _Normalized:
    r"""Each row's weights relative to its largest, :math:`e_i = w_i / \max w \in [0, 1]`, in float64, with
    what keeps :math:`\log(1 - \pi_i)` and :math:`\log(1 - \pi_i - \pi_j)` exact (:math:`\pi = e / S`,
    :math:`S = \sum e \in [1, K]`): only the largest weight (mask ``first``) can hold over half the mass,
    and the sums without it (:math:`S_1`) and without the two largest (:math:`S_{12}`) are summed
    directly, never formed by subtraction. A weight below 2.2e-308 (float64's smallest normal) × the
    largest counts as zero."""

    def __init__(self, log_w: Tensor):
        lw = log_w.double()
        top = lw.amax(dim=-1, keepdim=True)
        self.top = torch.where(torch.isfinite(top), top, torch.zeros_like(top))
        e = torch.exp(lw - self.top)
        e = e.masked_fill(e < torch.finfo(torch.float64).tiny, 0.0)  # subnormals have too few digits to count
        self.k = e.shape[-1]
        self.positive = (e > 0).sum(-1)
        self.first = torch.zeros_like(e, dtype=torch.bool).scatter_(-1, e.argmax(-1, keepdim=True), True)
        e1 = e.masked_fill(self.first, 0.0)
        self.second = torch.zeros_like(self.first).scatter_(-1, e1.argmax(-1, keepdim=True), True)
        self.e, self.e1 = e, e1
        self.s1 = e1.sum(-1, keepdim=True)
        self.s12 = e1.masked_fill(self.second, 0.0).sum(-1, keepdim=True)
        self.log_s = torch.log1p(self.s1) + torch.log(e.amax(-1, keepdim=True))  # S = 1 + S_1; -inf if all zero
        self.pi = e1 / (1 + self.s1)  # π_i off the largest (0 there)
        # log(1 − π_i): log1p off the largest (π_i ≤ 1/2), log(S_1/S) at it
        self.log1m = torch.where(self.first, torch.log(self.s1) - self.log_s, torch.log1p(-self.pi))

    def log_mean(self) -> Tensor:
        """``log_mean_exp`` of each row, in float64."""
        return (self.log_s + self.top).squeeze(-1) - math.log(self.k)

    def mean_leave_one_out(self) -> Tensor:
        r""":math:`\bar L_{K-1} - L_K = \log\frac{K}{K-1} + \mathrm{mean}_i \log(1 - \pi_i)`."""
        return self.log1m.mean(-1) - math.log1p(-1 / self.k)

    def mean_leave_two_out(self) -> Tensor:
        r""":math:`\bar L_{K-2} - L_K = \log\frac{K}{K-2} + \mathrm{mean}_{i<j} \log(1 - \pi_i - \pi_j)` (all pairs).

        Pairs with the largest weight: :math:`\log(S_1 - e_j) - \log S`, exact because :math:`e_j \le S_1/2`
        unless j is the second largest (then :math:`\log S_{12} - \log S`). The other pairs: with
        :math:`u = \pi/(1-\pi)`, :math:`1 - \pi_i - \pi_j = (1-\pi_i)(1-\pi_j)(1 - u_i u_j)` and
        :math:`\sum_{i<j}\log(1 - u_i u_j) = -\sum_n (q_n^2 - q_{2n})/(2n)`, :math:`q_n = \sum_i u_i^n`, a
        series in :math:`u_i u_j \le u_{(2)} u_{(3)} \le 1/4`, summed until its tail is below 1e-13 (nats of the
        estimate): O(K) per term; a few terms for spread-out weights, at most 22."""
        k, first, second = self.k, self.first, self.second
        pair = torch.log((self.s1 - self.e1).masked_fill(second, 1.0))
        with_first = torch.where(second, torch.log(self.s12), pair).masked_fill(first, 0.0).sum(-1)
        with_first = with_first - (k - 1) * self.log_s.squeeze(-1)
        rest = self.log1m.masked_fill(first, 0.0).sum(-1)
        u = self.pi / (1 - self.pi)
        u = u.masked_fill(u < 1e-20, 0.0)  # its terms are below the series' precision
        products = u.masked_fill(~second, 0.0).sum(-1) * u.masked_fill(second, 0.0).amax(-1)
        largest = float(products.max()) if products.numel() else 0.0  # an empty batch has no pairs
        terms = 1 if largest <= 0 else min(22, max(1, math.ceil(math.log(1e-13) / math.log(largest))))
        q, power = [], u
        for _ in range(2 * terms):
            q.append(power.sum(-1))
            power = (power * u).masked_fill_(power < 1e-150, 0.0)  # no subnormals: they are slow
        series = sum((q[n - 1] ** 2 - q[2 * n - 1]) / (2 * n) for n in range(1, terms + 1))
        total = with_first + (k - 2) * rest - series
        return total / (k * (k - 1) / 2) - math.log1p(-2 / k)


def jackknife_log_mean_exp(log_w: Tensor, order: int = 1) -> Tensor:
    r"""Jackknife-debiased :math:`\log \hat A` (Nowozin 2018), bias :math:`O(K^{-(order+1)})`.

    With :math:`L_m` the log-mean-exp of m weights and :math:`\bar L_{K-j}` its mean over all leave-j-out
    subsets, write :math:`E[L_m] = \log p + b_1/m + b_2/m^2 + \dots` and extrapolate to 1/m = 0 (Lagrange at
    the nodes :math:`n_j = K - j`: weights :math:`\prod_{i \ne j} n_j/(n_j - n_i)`):

    - order 1: :math:`K L_K - (K-1)\bar L_{K-1}` (needs K ≥ 2);
    - order 2: :math:`\tfrac{K^2}{2} L_K - (K-1)^2 \bar L_{K-1} + \tfrac{(K-2)^2}{2}\bar L_{K-2}` (needs K ≥ 3);
      the coefficients sum to 1 and cancel the 1/K and 1/K² terms.

    Both averages are exact and symmetric in the weights, in O(K): :math:`\bar L_{K-1}` over the K
    leave-one-out sets directly, :math:`\bar L_{K-2}` over all K(K-1)/2 pairs by a power-sum series (see
    ``_Normalized.mean_leave_two_out``; an incomplete set of pairs would not do: the K²-sized coefficients
    turn its sampling error into O(K^-1/2) noise). Computed in float64 as
    :math:`L_K + \sum_j c_j(\bar L_{K-j} - L_K)` from the normalized weights, so the large coefficients
    multiply accurate small numbers. Rows with fewer than order + 1 non-zero weights (a leave-out set would
    be all zeros) fall back to :func:`log_mean_exp`. Returned in ``log_w``'s dtype.
    """
    if order not in (1, 2):
        raise ValueError(f"order must be 1 or 2, got {order!r}")
    k = _check_log_w(log_w, min_k=order + 1)
    w = _Normalized(log_w)
    plain = w.log_mean()
    if order == 1:
        est = plain - (k - 1) * w.mean_leave_one_out()
    else:
        est = plain - (k - 1) ** 2 * w.mean_leave_one_out() + (k - 2) ** 2 / 2 * w.mean_leave_two_out()
    return torch.where(w.positive > order, est, plain).to(log_w.dtype)
