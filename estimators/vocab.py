r"""Exact per-token KL divergence between two next-token distributions given as logits.

With :math:`p = \operatorname{softmax}(\text{logits\_p})` and :math:`q = \operatorname{softmax}(\text{logits\_q})`
over the last (vocabulary) dimension,

.. math:: KL(p \| q) = \sum_v p_v \log(p_v / q_v) = \sum_v p_v (\log p_v - \log q_v).

This is the exact value that the sampled estimators of :mod:`estimators.kl` estimate token by token, so it is
their ground truth when both models' full logits are at hand. It is computed as a two-pass chunked
log-softmax, so that a vocabulary of 200,000 tokens never needs a full-size float32 copy of either tensor:

1. pass 1 walks the vocabulary in chunks and combines each chunk's ``logsumexp`` with ``logaddexp`` into
   :math:`\mathrm{lse}_p` and :math:`\mathrm{lse}_q`;
2. pass 2 walks it again and accumulates :math:`\sum_v e^{lp_v}(lp_v - lq_v)` with
   :math:`lp = \text{logits\_p} - \mathrm{lse}_p` and :math:`lq = \text{logits\_q} - \mathrm{lse}_q`.

Only one chunk at a time is cast to the accumulation dtype, so the extra memory is
O(rows x chunk_size) elements, not O(rows x V).
"""
from __future__ import annotations

import math

import torch
from torch import Tensor

from ._validate import check_float_tensor

__all__ = ["token_kl"]


def token_kl(logits_p: Tensor, logits_q: Tensor, chunk_size: int = 8192) -> Tensor:
    r"""Exact :math:`KL(p \| q)` over the last dimension of two logit tensors of shape ``[..., V]``.

    Args:
        logits_p: unnormalized log-probabilities of p (the sampling policy), shape ``[..., V]``.
        logits_q: unnormalized log-probabilities of q (the reference), same shape, dtype and device.
        chunk_size: number of vocabulary entries processed at once; bounds the extra memory at
            about ``rows * chunk_size`` elements of the accumulation dtype.

    Returns:
        A tensor of shape ``[...]``. It is accumulated and returned in float64 for float64 inputs and in
        float32 for every other float dtype (so float16 and bfloat16 inputs give a float32 result).

    A logit of ``-inf`` is a token of probability zero (a masked or top-k-truncated token): where
    :math:`p_v = 0` the term is 0, and where :math:`p_v > 0` but :math:`q_v = 0` the result is ``+inf``
    (a support mismatch, which is the correct value). Rounding can leave a KL near 0 a few ulps below 0;
    the result is clamped at 0, since KL is never negative.

    Raises:
        ValueError: naming the argument, for a non-tensor, a non-float dtype, a 0-d tensor, an empty
            vocabulary, mismatched shape, dtype or device, a NaN or ``+inf`` logit, a row whose logits are
            all ``-inf``, or a ``chunk_size`` that is not a positive integer.
    """
    for name, value in (("logits_p", logits_p), ("logits_q", logits_q)):
        check_float_tensor(name, value)
        if value.dim() == 0:
            raise ValueError(f"{name} must have at least one dimension (the vocabulary), got a 0-d tensor")
        if value.shape[-1] == 0:
            raise ValueError(f"{name} has an empty vocabulary (last dimension of size 0), shape {tuple(value.shape)}")
    if logits_p.shape != logits_q.shape:
        raise ValueError(f"logits_p and logits_q must have the same shape, "
                         f"got {tuple(logits_p.shape)} and {tuple(logits_q.shape)}")
    if logits_p.dtype != logits_q.dtype:
        raise ValueError(f"logits_p and logits_q must have the same dtype, got {logits_p.dtype} and {logits_q.dtype}")
    if logits_p.device != logits_q.device:
        raise ValueError(f"logits_p and logits_q must be on the same device, "
                         f"got {logits_p.device} and {logits_q.device}")
    if isinstance(chunk_size, bool) or not isinstance(chunk_size, int) or chunk_size < 1:
        raise ValueError(f"chunk_size must be a positive integer, got {chunk_size!r}")

    acc = torch.float64 if logits_p.dtype == torch.float64 else torch.float32
    vocab = logits_p.shape[-1]
    starts = range(0, vocab, chunk_size)
    lse_p = _chunked_logsumexp(logits_p, "logits_p", starts, chunk_size, acc)
    lse_q = _chunked_logsumexp(logits_q, "logits_q", starts, chunk_size, acc)

    kl = torch.zeros(logits_p.shape[:-1], dtype=acc, device=logits_p.device)
    for start in starts:
        lp = logits_p[..., start:start + chunk_size].to(acc) - lse_p.unsqueeze(-1)
        lq = logits_q[..., start:start + chunk_size].to(acc) - lse_q.unsqueeze(-1)
        # p_v = 0 exactly when its logit is -inf: that term is 0 (not NaN from -inf - -inf or 0 * inf).
        # q_v = 0 with p_v > 0 is +inf even when exp(lp) underflows to 0.
        term = torch.where(lq == -math.inf, math.inf, lp.exp() * (lp - lq))
        kl += torch.where(lp == -math.inf, 0.0, term).sum(-1)
    return kl.clamp_min(0.0)


def _chunked_logsumexp(logits: Tensor, name: str, starts: range, chunk_size: int, acc: torch.dtype) -> Tensor:
    """``logsumexp`` over the last dimension, one vocabulary chunk at a time, after checking the logits."""
    lse = torch.full(logits.shape[:-1], -math.inf, dtype=acc, device=logits.device)
    has_nan = torch.zeros((), dtype=torch.bool, device=logits.device)
    has_pos_inf = has_nan
    for start in starts:
        chunk = logits[..., start:start + chunk_size]
        has_nan = has_nan | chunk.isnan().any()
        has_pos_inf = has_pos_inf | chunk.isposinf().any()
        lse = torch.logaddexp(lse, torch.logsumexp(chunk.to(acc), dim=-1))
    if has_nan:
        raise ValueError(f"{name} contains NaN")
    if has_pos_inf:
        raise ValueError(f"{name} contains +inf; logits must be finite or -inf (a masked token)")
    if lse.isneginf().any():
        raise ValueError(f"{name} has a row whose logits are all -inf, so no token has positive probability")
    return lse
