r"""Exact per-token KL divergence between two next-token distributions given as logits.

With :math:`p = \operatorname{softmax}(a)` and :math:`q = \operatorname{softmax}(b)` over the last (vocabulary)
dimension of the logits :math:`a` (``logits_p``) and :math:`b` (``logits_q``),

.. math:: KL(p \| q) = \sum_v p_v (\log p_v - \log q_v) = \mathbb{E}_p[a - b] - \mathrm{lse}(a) + \mathrm{lse}(b).

This is the exact value that the sampled estimators of :mod:`estimators.kl` estimate token by token, so it is
their ground truth when both models' full logits are at hand. It is computed in ONE pass over the logits, a
tile of ``rows x chunk`` of them at a time: each logit is read once, and the extra memory is three tiles in the
accumulation dtype (O(rows x chunk), never a full-size float32 copy of either tensor).

The one-pass algorithm (the online softmax of flash attention). Per row, with references :math:`r_a, r_b`
(shifts that keep ``exp`` in range), three sums are accumulated over the vocabulary,

.. math::

    s_a = \sum_v e^{a_v - r_a}, \qquad s_b = \sum_v e^{b_v - r_b}, \qquad
    t = \sum_v e^{a_v - r_a}\,\big((a_v - r_a) - (b_v - r_b)\big),

so that :math:`\mathrm{lse}(a) = r_a + \log s_a`, :math:`\mathrm{lse}(b) = r_b + \log s_b`, :math:`\mathbb{E}_p[a - b]
= t / s_a + r_a - r_b`, and

.. math:: KL(p \| q) = t / s_a - \log s_a + \log s_b.

The references cancel: keeping the shifted differences :math:`(a_v - r_a) - (b_v - r_b)` inside :math:`t` avoids
the cancellation of the large terms :math:`\mathbb{E}_p[a - b]` and :math:`\mathrm{lse}(a) - \mathrm{lse}(b)` when the
KL is small or the logits are large. Each logit is shifted by its reference before anything else (so logits of
5e9 or 1e30, and ``finfo.min`` masks, stay exact and finite); tiles are computed in the accumulation dtype
(float32, or float64 for float64 inputs), exponentials in base 2 (``exp2`` is ~2.5x faster than ``exp`` on CPU:
:math:`e^x = 2^{x \log_2 e}`); the per-row sums are kept in float64.

* Fast path: :math:`r_a, r_b` are the maxima of the first chunk and never change, and nothing is masked or tested
  per tile. A later logit far above its reference overflows (by ~88 in float32, ~709 in float64), a ``-inf`` logit
  gives a NaN (:math:`0 \cdot \infty`), and so a non-finite sum sends the block of rows to
* the careful path: :math:`r_a, r_b` are the running maxima :math:`m_a, m_b`. When a tile raises them to
  :math:`m_a', m_b'`, the sums are rescaled, :math:`s_a \leftarrow e^{m_a - m_a'} s_a`,
  :math:`s_b \leftarrow e^{m_b - m_b'} s_b` and
  :math:`t \leftarrow e^{m_a - m_a'}\,\big(t + s_a\,[(m_a - m_b) - (m_a' - m_b')]\big)`; a term whose
  :math:`e^{a_v - m_a}` is 0 (:math:`a_v = -\infty`, a ``finfo.min`` mask, or below the accumulation dtype's
  range) is 0, and a token with :math:`b_v = -\infty < a_v` (:math:`q_v = 0 < p_v`) makes the row ``+inf``, even
  where :math:`e^{a_v - m_a}` underflows to 0.

On a CUDA device with Triton installed, the forward pass runs as one fused kernel instead
(:mod:`estimators.vocab_triton`: the same online softmax, one program per row, float32 state); ``backend`` chooses.

The gradient (when an input requires one) is :math:`\partial KL/\partial a_v = p_v(\log p_v - \log q_v - KL)` and
:math:`\partial KL/\partial b_v = q_v - p_v`, computed chunk by chunk from the saved :math:`\mathrm{lse}` values.
"""
from __future__ import annotations

import math
import warnings

import torch
from torch import Tensor

from ._validate import check_float_tensor

__all__ = ["token_kl", "BACKENDS"]

#: Logits per tile (rows x chunk): rows are taken in blocks of about ``_TILE // chunk`` so that the three tile
#: buffers (12 MiB in float32) stay in the last-level cache. 2**20 with chunks of at most 16384 tokens was the
#: fastest setting on a 2-core AMD EPYC (2**18, 2**19, chunks of 8192 and 32768-65536 were 5-30% slower).
_TILE = 1 << 20
_LOG2E = 1.0 / math.log(2.0)


BACKENDS = ("auto", "torch", "triton")


def token_kl(logits_p: Tensor, logits_q: Tensor, chunk_size: int = 16384, backend: str = "auto") -> Tensor:
    r"""Exact :math:`KL(p \| q)` over the last dimension of two logit tensors of shape ``[..., V]``.

    Args:
        logits_p: unnormalized log-probabilities of p (the sampling policy), shape ``[..., V]``.
        logits_q: unnormalized log-probabilities of q (the reference), same shape, dtype and device.
        chunk_size: at most this many vocabulary entries are processed at once (the vocabulary is cut into
            equal chunks). The extra memory is three tiles of ``block x chunk`` elements of the accumulation dtype,
            where ``block <= rows`` rows (about ``2**20 / chunk``) are taken at a time. (The torch path only.)
        backend: ``"torch"`` (the chunked one-pass algorithm above), ``"triton"`` (the fused kernel of
            :mod:`estimators.vocab_triton`: CUDA, or Triton's CPU interpreter, float32/float16/bfloat16 inputs,
            no gradient), or ``"auto"``: Triton for CUDA tensors where it is installed and no gradient is
            needed, else torch. If the kernel fails to launch under ``"auto"``, a warning says why and torch
            computes the result.

    Returns:
        A tensor of shape ``[...]``. It is accumulated and returned in float64 for float64 inputs and in
        float32 for every other float dtype (so float16 and bfloat16 inputs give a float32 result; the Triton
        kernel keeps its per-row sums in float32, the torch path in float64).

    A logit of ``-inf`` is a token of probability zero (a masked or top-k-truncated token): where
    :math:`p_v = 0` the term is 0, and where :math:`p_v > 0` but :math:`q_v = 0` the result is ``+inf``
    (a support mismatch, which is the correct value). Rounding can leave a KL near 0 a few ulps below 0;
    the result is clamped at 0, since KL is never negative.

    Raises:
        ValueError: naming the argument, for a non-tensor, a non-float dtype, a 0-d tensor, an empty
            vocabulary, mismatched shape, dtype or device, a NaN or ``+inf`` logit, a row whose logits are
            all ``-inf``, a ``chunk_size`` that is not a positive integer, an unknown ``backend``, or
            ``backend="triton"`` where the kernel cannot run.
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

    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    grad = torch.is_grad_enabled() and (logits_p.requires_grad or logits_q.requires_grad)
    if backend == "triton" and grad:
        raise ValueError("backend='triton' has no backward pass; use backend='auto' or 'torch' for a gradient")
    vocab = logits_p.shape[-1]
    chunk = -(-vocab // -(-vocab // chunk_size))           # at most chunk_size, in equal parts
    if grad:
        return _TokenKL.apply(logits_p, logits_q, chunk)
    if backend == "triton" or (backend == "auto" and logits_p.is_cuda):
        from . import vocab_triton  # imports Triton (~0.2 s), so only where its kernel may run

        if vocab_triton.available(logits_p):
            kl = _triton(logits_p, logits_q, chunk, strict=backend == "triton")
            if kl is not None:
                return kl
        elif backend == "triton":
            raise ValueError(f"backend='triton' needs Triton and a CUDA tensor of dtype float32, float16 or bfloat16 "
                             f"(or TRITON_INTERPRET=1 on the CPU), got a {logits_p.dtype} tensor on "
                             f"{logits_p.device}" + ("" if vocab_triton.triton else " and Triton is not installed"))
    return _forward(logits_p, logits_q, chunk)[0]


def _triton(logits_p: Tensor, logits_q: Tensor, chunk: int, strict: bool) -> Tensor | None:
    """The fused kernel's result, shape ``[...]``; raises like the torch path on invalid logits. Not strict
    (``backend="auto"``): None where the rows are not a unit-stride view, or, with a warning, where the
    kernel fails to launch. Strict: the rows are copied to a contiguous layout if need be."""
    from . import vocab_triton

    vocab = logits_p.shape[-1]
    a, b = _rows(logits_p), _rows(logits_q)
    if a.dim() != 2 or a.stride(-1) != 1 or b.stride(-1) != 1:
        if not strict:
            return None
        a, b = logits_p.reshape(-1, vocab).contiguous(), logits_q.reshape(-1, vocab).contiguous()
    try:
        kl = vocab_triton.token_kl_triton(a, b)
    except Exception as err:  # a kernel that cannot compile here must not take token_kl down with it
        if strict:
            raise
        warnings.warn(f"token_kl's Triton kernel failed ({type(err).__name__}: {err}); using the torch path",
                      RuntimeWarning, stacklevel=3)
        return None
    if bool(kl.isnan().any()):                             # a NaN, +inf or all -inf row: raise its error
        _check(logits_p, "logits_p", chunk)
        _check(logits_q, "logits_q", chunk)
    return kl.reshape(logits_p.shape[:-1])


def _forward(logits_p: Tensor, logits_q: Tensor, chunk: int) -> tuple[Tensor, Tensor, Tensor]:
    """``(KL, lse(logits_p), lse(logits_q))``, the KL in the accumulation dtype and the lse in float64."""
    acc = torch.float64 if logits_p.dtype == torch.float64 else torch.float32
    a, b = _rows(logits_p), _rows(logits_q)               # views, never copies: [rows, V] or [rows, ..., V]
    block = max(1, _TILE // (chunk * math.prod(a.shape[1:-1])))
    kl, lse_a, lse_b = (torch.empty(a.shape[:-1], dtype=torch.float64, device=a.device) for _ in range(3))
    for i in range(0, a.shape[0], block):                  # no rows: empty results
        ab, bb = a[i:i + block], b[i:i + block]
        for out, part in zip((kl, lse_a, lse_b), _fast(ab, bb, chunk, acc) or _careful(ab, bb, chunk, acc,
                                                                                          logits_p, logits_q)):
            out[i:i + block] = part
    shape = logits_p.shape[:-1]
    return kl.reshape(shape).clamp_min_(0.0).to(acc), lse_a.reshape(shape), lse_b.reshape(shape)


def _rows(logits: Tensor) -> Tensor:
    """``logits`` as a ``[rows, V]`` view where one exists, else as it is (at least 2-d); never a copy."""
    if logits.dim() == 1:
        return logits.unsqueeze(0)
    try:
        return logits.view(-1, logits.shape[-1])
    except RuntimeError:
        return logits


def _tiles(a: Tensor, b: Tensor, chunk: int, acc: torch.dtype):
    """Yield each vocabulary chunk of ``a`` and ``b`` with three scratch buffers of its shape."""
    buffers = torch.empty(3, a[..., :chunk].numel(), dtype=acc, device=a.device)
    for start in range(0, a.shape[-1], chunk):
        at, bt = a[..., start:start + chunk], b[..., start:start + chunk]
        yield (at, bt, *(buf[:at.numel()].view(at.shape) for buf in buffers))


def _tile_sums(at: Tensor, bt: Tensor, ra: Tensor, rb: Tensor, x: Tensor, y: Tensor, d: Tensor):
    r"""With ``x = a - r_a`` and ``y = b - r_b``: the row sums of ``e^x`` and ``e^y``, and the products
    ``e^x (x - y)``, which the caller sums (after masking); all in the buffers ``x, y, d`` (``x`` then holds ``e^x``).

    The logits are shifted before anything else: ``a - r_a`` is exact where ``a`` is close to ``r_a`` (Sterbenz)
    whatever the size of the logits (5e9, 1e30), and a ``finfo.min`` logit stays finite, so that ``x - y`` is finite
    where both are masked and ``e^x`` (``2^{x log2 e}``, which may overflow to ``2^{-inf}`` = 0) is exactly 0. (The
    one multiply-add ``a log2(e) - r_a log2(e)`` rounded each logit by an ulp of the logit: a NaN at 5e9.)"""
    for src, ref, out in ((at, ra, x), (bt, rb, y)):
        if src.dtype != out.dtype:
            src = out.copy_(src)                          # convert in place (faster than a mixed-dtype sub)
        torch.sub(src, ref, out=out)
    torch.sub(x, y, out=d)
    ex = x.mul_(_LOG2E).exp2_()
    return ex.sum(-1), y.mul_(_LOG2E).exp2_().sum(-1), d.mul_(ex)


def _result(sa: Tensor, sb: Tensor, t: Tensor, ra: Tensor, rb: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """``(KL, lse_a, lse_b)`` from the sums and the references."""
    log_sa, log_sb = sa.log(), sb.log()
    return t / sa - log_sa + log_sb, ra + log_sa, rb + log_sb


def _fast(a: Tensor, b: Tensor, chunk: int, acc: torch.dtype) -> tuple[Tensor, Tensor, Tensor] | None:
    """The sums with fixed references (the first chunk's maxima), unmasked; None where one is not finite."""
    ra = a[..., :chunk].amax(-1, keepdim=True).to(acc)
    rb = b[..., :chunk].amax(-1, keepdim=True).to(acc)
    if not bool(torch.isfinite(ra).all() & torch.isfinite(rb).all()):
        return None
    sa = torch.zeros(a.shape[:-1], dtype=torch.float64, device=a.device)
    sb, t = torch.zeros_like(sa), torch.zeros_like(sa)
    for i, (at, bt, x, y, d) in enumerate(_tiles(a, b, chunk, acc)):
        sa_c, sb_c, terms = _tile_sums(at, bt, ra, rb, x, y, d)
        sa += sa_c
        sb += sb_c
        t += terms.sum(-1)
        if i == 0 and not bool(torch.isfinite(t).all()):  # a -inf in the first chunk: stop reading now
            return None
    if not bool(torch.isfinite(sa + sb + t).all()):
        return None
    return _result(sa, sb, t, ra.squeeze(-1).double(), rb.squeeze(-1).double())


def _careful(a: Tensor, b: Tensor, chunk: int, acc: torch.dtype,
             logits_p: Tensor, logits_q: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """The sums with running-max references and ``-inf`` masking; raises (``_check``) on invalid logits."""
    inf = math.inf
    ma = torch.full(a.shape[:-1], -inf, dtype=torch.float64, device=a.device)
    mb, ra, rb = ma.clone(), torch.zeros_like(ma), torch.zeros_like(ma)
    sa, sb, t = torch.zeros_like(ma), torch.zeros_like(ma), torch.zeros_like(ma)
    mismatch = torch.zeros(a.shape[:-1], dtype=torch.bool, device=a.device)
    for at, bt, x, y, d in _tiles(a, b, chunk, acc):
        ma2 = torch.maximum(ma, at.amax(-1).double())
        mb2 = torch.maximum(mb, bt.amax(-1).double())
        ra2, rb2 = ma2.nan_to_num(neginf=0.0), mb2.nan_to_num(neginf=0.0)   # reference 0 while all -inf
        alpha_a, alpha_b = (ma - ra2).exp(), (mb - rb2).exp()               # 0 while all -inf
        t = alpha_a * (t + sa * ((ra - rb) - (ra2 - rb2)))
        sa, sb, ma, mb, ra, rb = alpha_a * sa, alpha_b * sb, ma2, mb2, ra2, rb2
        sa_c, sb_c, terms = _tile_sums(at, bt, ra.to(acc).unsqueeze(-1), rb.to(acc).unsqueeze(-1), x, y, d)
        sa += sa_c
        sb += sb_c
        t += torch.where(x == 0, 0.0, terms).sum(-1)                        # e^x = 0 (p_v = 0): the term is 0
        mismatch |= ((bt == -inf) & (at != -inf)).any(-1)                    # q_v = 0 < p_v: +inf
    if not bool(torch.isfinite(ma).all() & torch.isfinite(mb).all()):
        _check(logits_p, "logits_p", chunk)
        _check(logits_q, "logits_q", chunk)
    kl, lse_a, lse_b = _result(sa, sb, t, ra, rb)
    return torch.where(mismatch, inf, kl), lse_a, lse_b


def _check(logits: Tensor, name: str, chunk: int) -> None:
    """Raise the ValueError for a NaN, a ``+inf`` or an all ``-inf`` row of ``logits``, checked chunk by chunk."""
    has_nan = has_pos_inf = False
    row_max = torch.full(logits.shape[:-1], -math.inf, dtype=logits.dtype, device=logits.device)
    for start in range(0, logits.shape[-1], chunk):
        part = logits[..., start:start + chunk]
        has_nan = has_nan or bool(part.isnan().any())
        has_pos_inf = has_pos_inf or bool(part.isposinf().any())
        row_max = torch.maximum(row_max, part.amax(-1))
    if has_nan:
        raise ValueError(f"{name} contains NaN")
    if has_pos_inf:
        raise ValueError(f"{name} contains +inf; logits must be finite or -inf (a masked token)")
    if bool(row_max.isneginf().any()):
        raise ValueError(f"{name} has a row whose logits are all -inf, so no token has positive probability")


class _TokenKL(torch.autograd.Function):
    """``token_kl`` with its gradient, computed chunk by chunk in the backward pass."""

    @staticmethod
    def forward(ctx, logits_p: Tensor, logits_q: Tensor, chunk: int) -> Tensor:
        kl, lse_a, lse_b = _forward(logits_p, logits_q, chunk)
        ctx.save_for_backward(logits_p, logits_q, kl, lse_a, lse_b)
        ctx.chunk = chunk
        return kl

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad: Tensor):
        a, b, kl, lse_a, lse_b = ctx.saved_tensors
        acc = kl.dtype
        grad, kl = grad.to(acc).unsqueeze(-1), kl.unsqueeze(-1)
        lse_a, lse_b = lse_a.to(acc).unsqueeze(-1), lse_b.to(acc).unsqueeze(-1)
        ga = torch.empty_like(a) if ctx.needs_input_grad[0] else None
        gb = torch.empty_like(b) if ctx.needs_input_grad[1] else None
        for start in range(0, a.shape[-1], ctx.chunk):
            part = (..., slice(start, start + ctx.chunk))
            lp, lq = a[part].to(acc) - lse_a, b[part].to(acc) - lse_b
            p = lp.exp()
            if ga is not None:                             # p_v = 0 (a -inf logit): no gradient, not NaN
                ga[part] = torch.where(lp == -math.inf, 0.0, grad * p * (lp - lq - kl))
            if gb is not None:
                gb[part] = grad * (lq.exp() - p)
        return ga, gb, None
