r"""Sequence-level estimators of KL(p || q) for autoregressive models, from per-token quantities.

A sequence :math:`x = (x_1, \dots, x_T) \sim p` has :math:`p(x) = \prod_t p(x_t \mid x_{<t})`, and likewise q.
With the per-token log-ratios :math:`\log r_t = \log q(x_t \mid x_{<t}) - \log p(x_t \mid x_{<t})`, the sequence
log-ratio :math:`\log R = \sum_t \log r_t` and the next-step KL
:math:`KL_t(x_{<t}) = KL(p(\cdot \mid x_{<t}) \| q(\cdot \mid x_{<t}))`, the chain rule gives
:math:`KL(p \| q) = E_p[-\log R] = E_p[\sum_t KL_t(x_{<t})]` for the sequence distributions. With a mask that ends
each sequence at its end-of-sequence token (a length decided by the tokens drawn, EOS included), the same holds
for the distributions of variable-length sequences.

Let :math:`m_t(x_{<t}) = \sum_{v:\,p(v \mid x_{<t}) = 0} q(v \mid x_{<t})` be the mass q puts where p cannot go
(top-k or top-p sampling: p truncated, q not). Then :math:`E[r_t \mid x_{<t}] = 1 - m_t` and
:math:`E_p[R] = q(\operatorname{supp} p)`:

- ``sequence_k1`` :math:`= -\log R`: unbiased for the sequence KL, always; may be negative.
- ``sequence_k3_per_token`` :math:`= \sum_t (r_t - 1) - \log r_t`, the form of most RLHF code: each term has
  :math:`E[\cdot \mid x_{<t}] = KL_t - m_t`, so the sum is unbiased for the sequence KL where every
  :math:`m_t = 0` (q's support inside p's at every prefix p reaches); otherwise its bias is
  :math:`-E_p[\sum_t m_t] < 0`.
- ``sequence_k3`` :math:`= (R - 1) - \log R`: bias :math:`E_p[R] - 1 = q(\operatorname{supp} p) - 1`, so unbiased
  under the same condition and biased (by a different amount) otherwise. Its variance is finite only where
  :math:`E_p[R^2] < \infty`, and :math:`E_p[R^2]` grows geometrically in T (it is :math:`\prod_t E[r_t^2]` for
  independent positions); ``expm1`` overflows to ``inf`` where :math:`\log R` exceeds ~88 (float32) or ~709 (float64).
- ``rao_blackwell_kl`` :math:`= \sum_t KL_t(x_{<t})` (Amini, Vieira & Cotterell, 2025): unbiased always, never
  negative, and needs both models' full next-token logits. Each term is :math:`E[k_{1,t} \mid x_{<t}]`, yet its
  variance is NOT below k1's in general: with :math:`V_t(x_{<t})` the KL still to come from prefix :math:`x_{<t}`,
  :math:`\operatorname{Var}(k_1) - \operatorname{Var}(RB) = \sum_t E[\operatorname{Var}(k_{1,t} \mid x_{<t})
  + 2 \operatorname{Cov}(k_{1,t}, V_{t+1}(x_{\le t}) \mid x_{<t})]`, negative where a token's log-ratio
  anticorrelates with the KL it leads to. It is :math:`\le` k1's for one step (T = 1) or independent positions.

Where q is zero at a token p samples, the sequence KL is infinite: ``log_q = -inf`` is rejected as non-finite, and
``rao_blackwell_kl`` returns ``inf`` (as ``token_kl`` does).

Shapes: log-probs and Bernoulli logits ``[..., T]``, categorical logits ``[..., T, V]`` (position t holds the
distribution that x_t was drawn from); results ``[...]``, summed over T. ``mask`` (shape ``[..., T]``, bool or 0/1)
marks real tokens with 1: padded positions (0) are ignored and may hold anything, NaN and inf included; inputs
are checked only where the mask is 1. An all-zero mask (a fully padded batch) gives 0.

Precision: the log-prob estimators form and sum the log-ratios in float64 and return float64 for float64
inputs, float32 otherwise (float16 and bfloat16 included), so a sum whose partial sums overflow float32 is still
exact, and an estimate is ``±inf`` only where its value is beyond the returned dtype's range.
"""
from __future__ import annotations

import torch
from torch import Tensor

from ._validate import binary_mask, check_finite, check_float_tensor, check_shape
from .kl import k3_of_log_ratio
from .vocab import token_kl

__all__ = ["sequence_k1", "sequence_k3_per_token", "sequence_k3", "rao_blackwell_kl", "bernoulli_rao_blackwell_kl",
           "categorical_token_log_probs", "bernoulli_token_log_probs"]

#: Where a mask selects the rows of ``rao_blackwell_kl``, they are copied at most this many logits at a time.
_GATHER = 1 << 22


def sequence_k1(log_p: Tensor, log_q: Tensor, mask: Tensor | None = None) -> Tensor:
    r""":math:`-\log R = \sum_t \text{mask}_t (\log p_t - \log q_t)`: unbiased for the sequence KL, may be negative."""
    return (-_log_ratios(log_p, log_q, mask).sum(-1)).to(_result_dtype(log_p))


def sequence_k3_per_token(log_p: Tensor, log_q: Tensor, mask: Tensor | None = None) -> Tensor:
    r""":math:`\sum_t \text{mask}_t\,((r_t - 1) - \log r_t) \ge 0`: bias :math:`-E_p[\sum_t m_t]`, 0 where q's support
    lies inside p's at every prefix."""
    return k3_of_log_ratio(_log_ratios(log_p, log_q, mask)).sum(-1).to(_result_dtype(log_p))


def sequence_k3(log_p: Tensor, log_q: Tensor, mask: Tensor | None = None) -> Tensor:
    r""":math:`(R - 1) - \log R \ge 0` with :math:`\log R = \sum_t \text{mask}_t \log r_t`: bias
    :math:`q(\operatorname{supp} p) - 1`, 0 where q's support lies inside p's."""
    return k3_of_log_ratio(_log_ratios(log_p, log_q, mask).sum(-1)).to(_result_dtype(log_p))


def rao_blackwell_kl(logits_p: Tensor, logits_q: Tensor, mask: Tensor | None = None) -> Tensor:
    r""":math:`\sum_t \text{mask}_t\,KL(\operatorname{softmax}(a_t) \| \operatorname{softmax}(b_t))` over logits
    ``[..., T, V]``: unbiased, never negative, exact per step (:func:`estimators.vocab.token_kl`); its variance is
    usually, not always, below k1's (see the module docstring).

    Returned in float64 for float64 logits, float32 otherwise. A ``-inf`` logit is a token of probability 0;
    a step where q is 0 at a token p can draw gives ``inf``. Masked rows are never read by ``token_kl``
    (the kept ones are gathered in blocks of ~4M logits).
    """
    _check_pair(logits_p, logits_q, ("logits_p", "logits_q"), min_dim=2)
    keep = _keep(mask, logits_p.shape[:-1], logits_p.device)
    if keep is None:
        return token_kl(logits_p, logits_q).sum(-1)
    vocab = logits_p.shape[-1]
    a, b = logits_p.reshape(-1, vocab), logits_q.reshape(-1, vocab)
    kl = torch.zeros(a.shape[0], dtype=torch.float64 if a.dtype == torch.float64 else torch.float32, device=a.device)
    kept = keep.reshape(-1).nonzero().squeeze(-1)
    for rows in kept.split(max(1, _GATHER // vocab)) if kept.numel() else ():  # all masked: every KL is 0
        kl[rows] = token_kl(a[rows], b[rows])
    return kl.reshape(keep.shape).sum(-1)


def bernoulli_rao_blackwell_kl(logits_p: Tensor, logits_q: Tensor, mask: Tensor | None = None) -> Tensor:
    r""":math:`\sum_d \text{mask}_d\,KL(\mathrm{Bern}(\sigma(a_d)) \| \mathrm{Bern}(\sigma(b_d)))` for binary models.

    Each term is :math:`\sigma(a)\,\ell_1 + \sigma(-a)\,\ell_0` with the log-ratios
    :math:`\ell_1 = \log\frac{\sigma(a)}{\sigma(b)} = \operatorname{softplus}(-b) - \operatorname{softplus}(-a)` and
    :math:`\ell_0 = \log\frac{\sigma(-a)}{\sigma(-b)} = \operatorname{softplus}(b) - \operatorname{softplus}(a)`,
    which never overflow. Where :math:`|b - a| < 1` they are computed as
    :math:`\ell_1 = \operatorname{log1p}(\sigma(-a) \operatorname{expm1}(a - b))` and
    :math:`\ell_0 = \operatorname{log1p}(\sigma(a)\operatorname{expm1}(b - a))`, exact to rounding however small
    :math:`b - a`, so that a KL near 0 (:math:`\approx \sigma(a)\sigma(-a)(b-a)^2/2`) keeps a relative error of
    about :math:`\epsilon / |b - a|`. Rounding below 0 is clamped to 0.
    """
    a, b = _checked(logits_p, logits_q, ("logits_p", "logits_q"), mask)
    d = b - a
    near, dc = d.abs() < 1, d.clamp(-1.0, 1.0)           # dc: no overflow in the branch where() leaves out
    sa, sna = torch.sigmoid(a), torch.sigmoid(-a)
    l1 = torch.where(near, torch.log1p(sna * torch.expm1(-dc)), _softplus(-b) - _softplus(-a))
    l0 = torch.where(near, torch.log1p(sa * torch.expm1(dc)), _softplus(b) - _softplus(a))
    return (sa * l1 + sna * l0).clamp_min(0.0).sum(-1)


def categorical_token_log_probs(logits: Tensor, x: Tensor) -> Tensor:
    r""":math:`\log \operatorname{softmax}(\text{logits})[x]
    = \text{logits}[x] - \operatorname{logsumexp}(\text{logits})`: the log-probs ``[..., T]`` of tokens ``x``
    (integers in [0, V)) under logits ``[..., T, V]``.

    Float32 for half-precision logits, the input dtype otherwise. Non-finite logits give non-finite log-probs
    at their own positions only, where a mask must then exclude them.
    """
    check_float_tensor("logits", logits)
    if logits.dim() < 2 or logits.shape[-1] == 0:
        raise ValueError(f"logits must have shape [..., T, V] with V > 0, got {tuple(logits.shape)}")
    check_shape("x", x, logits.shape[:-1], logits.device)
    if x.is_floating_point() or x.is_complex() or x.dtype == torch.bool:
        raise ValueError(f"x must have an integer dtype (token ids), got {x.dtype}")
    if not bool(((x >= 0) & (x < logits.shape[-1])).all()):
        raise ValueError(f"x must hold token ids in [0, {logits.shape[-1]}), got values outside it")
    acc = torch.promote_types(logits.dtype, torch.float32)
    return logits.gather(-1, x.long().unsqueeze(-1)).squeeze(-1).to(acc) - torch.logsumexp(logits.to(acc), -1)


def bernoulli_token_log_probs(logits: Tensor, x: Tensor) -> Tensor:
    r""":math:`\log \mathrm{Bern}(x; \sigma(a))`, :math:`-\operatorname{softplus}(a)` for x = 0 and
    :math:`-\operatorname{softplus}(-a)` for x = 1: the log-probs of binary ``x`` (bool, or 0/1 of any dtype)
    under logits of its shape.

    Float32 for half-precision logits, the input dtype otherwise; non-finite logits stay at their own positions.
    """
    check_float_tensor("logits", logits)
    ones = binary_mask("x", x, logits.shape, logits.device)
    acc = torch.promote_types(logits.dtype, torch.float32)
    return -_softplus(torch.where(ones, -logits, logits).to(acc))


def _softplus(x: Tensor) -> Tensor:
    r""":math:`\log(1 + e^x) = \max(x, 0) + \operatorname{log1p}(e^{-|x|})`, exact to rounding everywhere
    (``F.softplus`` returns x itself above 20, an error of :math:`e^{-20} \approx 2 \cdot 10^{-9}`)."""
    return x.clamp_min(0) + torch.log1p(torch.exp(-x.abs()))


def _log_ratios(log_p: Tensor, log_q: Tensor, mask: Tensor | None) -> Tensor:
    """Per-token ``log q - log p`` in float64 (so neither it nor a sum over T overflows or rounds before the
    result does), 0 where the mask is 0, after checking the inputs."""
    log_p, log_q = _checked(log_p, log_q, ("log_p", "log_q"), mask)
    return log_q.double() - log_p.double()


def _result_dtype(like: Tensor) -> torch.dtype:
    """float64 for float64 inputs, float32 otherwise."""
    return torch.promote_types(like.dtype, torch.float32)


def _checked(x: Tensor, y: Tensor, names: tuple[str, str], mask: Tensor | None) -> tuple[Tensor, Tensor]:
    """``x, y`` with 0 where the mask is 0, after checking them (finite where the mask is 1) and the mask."""
    _check_pair(x, y, names, min_dim=1)
    keep = _keep(mask, x.shape, x.device)
    x, y = x.to(_result_dtype(x)), y.to(_result_dtype(y))
    if keep is not None:
        x, y = x.where(keep, 0.0), y.where(keep, 0.0)
    for name, value in zip(names, (x, y)):
        check_finite(name, value, "they must be finite at unmasked positions")
    return x, y


def _check_pair(x: Tensor, y: Tensor, names: tuple[str, str], min_dim: int) -> None:
    """Two non-empty float tensors of one shape, dtype and device, with at least ``min_dim`` dimensions."""
    for name, value in zip(names, (x, y)):
        check_float_tensor(name, value)
        if value.dim() < min_dim or value.numel() == 0:
            raise ValueError(f"{name} must be non-empty with at least {min_dim} dimension(s), "
                             f"got shape {tuple(value.shape)}")
    for attr in ("shape", "dtype", "device"):
        if getattr(x, attr) != getattr(y, attr):
            raise ValueError(f"{names[0]} and {names[1]} must have the same {attr}, "
                             f"got {getattr(x, attr)} and {getattr(y, attr)}")


def _keep(mask: Tensor | None, shape: torch.Size, device: torch.device) -> Tensor | None:
    """The mask as a bool tensor, checked (None for no mask)."""
    return None if mask is None else binary_mask("mask", mask, shape, device)
