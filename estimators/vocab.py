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

That is the CPU path ("chunks"). On a GPU, ``token_kl`` takes one of two others (``backend`` chooses):

* ``"triton"`` (CUDA with Triton installed, float32/float16/bfloat16): fused kernels for the forward pass (the
  same online softmax, one program per row, float32 state) and the backward pass (:mod:`estimators.vocab_triton`);
* ``"rows"`` (any other GPU case: float64, no Triton, rows that are not unit-stride): blocks of whole rows, about
  2**26 logits at a time, through ``log_softmax`` and ``kl_div`` as eager torch computes them, in bounded memory;
  a block whose result is not finite (a ``-inf`` logit gives :math:`0 \cdot \infty`) is redone with the masks of
  the careful path. (The vocabulary-chunk loop tuned for CPU caches was 10x slower than eager on an H200.)

The gradient (when an input requires one) is :math:`\partial KL/\partial a_v = p_v(\log p_v - \log q_v - KL)`
(0 where :math:`p_v = 0`) and :math:`\partial KL/\partial b_v = q_v - p_v`, times the upstream gradient: on the CPU
chunk by chunk from the saved :math:`\mathrm{lse}` values, on the rows path block by block from ``log_softmax``
again, and in the backward kernel from the saved per-row :math:`\mathrm{lse}` and KL, written in the input dtype.
"""
from __future__ import annotations

import math
import warnings

import torch
import torch.nn.functional as F
from torch import Tensor

from ._validate import check_float_tensor, positive_int

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
            where ``block <= rows`` rows (about ``2**20 / chunk``) are taken at a time. (The CPU path only.)
        backend: ``"torch"``, ``"triton"`` (the fused kernels of :mod:`estimators.vocab_triton`, forward and
            backward: CUDA, or Triton's CPU interpreter, float32/float16/bfloat16 inputs), or ``"auto"``: Triton
            for CUDA tensors where it is installed and the rows are unit-stride views, else torch. The torch path
            is the one-pass algorithm above on the CPU, and on a GPU blocks of whole rows through ``log_softmax``
            (about ``2**26`` logits a block: bounded memory at the speed of eager ``log_softmax`` + ``kl_div``).
            If a kernel fails to launch under ``"auto"``, a warning says why and torch computes the result.

    Returns:
        A tensor of shape ``[...]``. It is accumulated and returned in float64 for float64 inputs and in
        float32 for every other float dtype (so float16 and bfloat16 inputs give a float32 result; the Triton
        kernel keeps its per-row sums in float32, the CPU path in float64). Zero rows give an empty result.

    A logit of ``-inf`` is a token of probability zero (a masked or top-k-truncated token): where
    :math:`p_v = 0` the term is 0, and where :math:`p_v > 0` but :math:`q_v = 0` the result is ``+inf``
    (a support mismatch, which is the correct value). A ``finfo(dtype).min`` logit (how Hugging Face masks) is
    a token of probability :math:`e^{-3.4 \cdot 10^{38}} = 0` in p; in q alone it makes a finite but huge term
    (or ``+inf`` once that overflows). Rounding can leave a KL near 0 a few ulps below 0; the result is clamped
    at 0, since KL is never negative. The gradient of a row whose KL is ``+inf`` is NaN.

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
    chunk_size = positive_int("chunk_size", chunk_size)

    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    vocab = logits_p.shape[-1]
    chunk = -(-vocab // -(-vocab // chunk_size))           # at most chunk_size, in equal parts
    grad = torch.is_grad_enabled() and (logits_p.requires_grad or logits_q.requires_grad)
    return _compute(_path(logits_p, logits_q, backend), logits_p, logits_q, chunk, grad, strict=backend != "auto")


def _path(logits_p: Tensor, logits_q: Tensor, backend: str) -> str:
    """The key of :data:`_PATHS` that computes ``token_kl`` for ``backend``: ``"triton"`` where asked for, or under
    ``"auto"`` for CUDA tensors whose rows the kernels read as they are; else :func:`_torch_path`."""
    if backend == "triton" or (backend == "auto" and logits_p.is_cuda):
        from . import vocab_triton  # imports Triton (~0.2 s), so only where its kernel may run

        if vocab_triton.available(logits_p):
            if backend == "triton" or all(_rows(t).dim() == 2 and _rows(t).stride(-1) == 1
                                          for t in (logits_p, logits_q)):
                return "triton"
        elif backend == "triton":
            raise ValueError(f"backend='triton' needs Triton and a CUDA tensor of dtype float32, float16 or bfloat16 "
                             f"(or TRITON_INTERPRET=1 on the CPU), got a {logits_p.dtype} tensor on "
                             f"{logits_p.device}" + ("" if vocab_triton.triton else " and Triton is not installed"))
    return _torch_path(logits_p)


def _torch_path(logits: Tensor) -> str:
    """``"chunks"`` on the CPU (the one-pass algorithm over cache-sized tiles), ``"rows"`` on any other device
    (blocks of whole rows: the vocabulary-chunk loop tuned for CPU caches is 10x slower than eager on a GPU)."""
    return "chunks" if logits.device.type == "cpu" else "rows"


def _compute(path: str, logits_p: Tensor, logits_q: Tensor, chunk: int, grad: bool, strict: bool = True) -> Tensor:
    """``token_kl`` on ``path``, differentiable where ``grad``; raises on invalid logits. Not strict (``"auto"``): a
    kernel that fails (Triton cannot compile for this GPU, say) is reported in a warning and
    :func:`_torch_path` computes the result."""
    try:
        if grad:
            kl = _TokenKL.apply(logits_p, logits_q, path, chunk)
        else:
            kl = _PATHS[path][0](logits_p, logits_q, chunk)[0]
    except Exception as err:  # a kernel that cannot compile here must not take token_kl down with it
        if strict or path != "triton":
            raise
        warnings.warn(f"token_kl's Triton kernel failed ({type(err).__name__}: {err}); using the torch path",
                      RuntimeWarning, stacklevel=3)
        return _compute(_torch_path(logits_p), logits_p, logits_q, chunk, grad)
    if bool(kl.isnan().any()):                             # a NaN, +inf or all -inf row: raise its error
        _check(logits_p, "logits_p", chunk)
        _check(logits_q, "logits_q", chunk)
    return kl


def _forward(logits_p: Tensor, logits_q: Tensor, chunk: int) -> tuple[Tensor, Tensor, Tensor]:
    r"""``(KL, r_a, log s_a, r_b, log s_b)``: the KL in the accumulation dtype, and in float64 the references and
    log-sums of the rows (:math:`\mathrm{lse} = r + \log s`), which the backward pass keeps apart: with the
    references exact logits, :math:`\log p_v = (a_v - r_a) - \log s_a` stays exact for large logits, where
    :math:`a_v - \mathrm{lse}(a)` rounded :math:`\mathrm{lse}` to the logits' ulp (2e-3 relative error in the
    gradient at logits of 1e5)."""
    acc = _acc(logits_p.dtype)
    a, b = _rows(logits_p), _rows(logits_q)               # views, never copies: [rows, V] or [rows, ..., V]
    block = max(1, _TILE // (chunk * math.prod(a.shape[1:-1])))
    outs = [torch.empty(a.shape[:-1], dtype=torch.float64, device=a.device) for _ in range(5)]
    for i in range(0, a.shape[0], block):                  # no rows: empty results
        ab, bb = a[i:i + block], b[i:i + block]
        for out, part in zip(outs, _fast(ab, bb, chunk, acc) or _careful(ab, bb, chunk, acc, logits_p, logits_q)):
            out[i:i + block] = part
    kl, *stats = (out.reshape(logits_p.shape[:-1]) for out in outs)
    return kl.clamp_min_(0.0).to(acc), *stats


def _acc(dtype: torch.dtype) -> torch.dtype:
    """The accumulation dtype: float64 for float64 logits, float32 for every other float dtype."""
    return torch.float64 if dtype == torch.float64 else torch.float32


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


def _result(sa: Tensor, sb: Tensor, t: Tensor, ra: Tensor, rb: Tensor) -> tuple[Tensor, ...]:
    """``(KL, r_a, log s_a, r_b, log s_b)`` from the sums and the references."""
    log_sa, log_sb = sa.log(), sb.log()
    return t / sa - log_sa + log_sb, ra, log_sa, rb, log_sb


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
    kl, *stats = _result(sa, sb, t, ra, rb)
    return torch.where(mismatch, inf, kl), *stats


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


def _grads(lp: Tensor, lq: Tensor, kl: Tensor, grad: Tensor, needs) -> tuple[Tensor | None, Tensor | None]:
    r"""The gradients of ``grad · KL`` on a tile with log p = ``lp`` and log q = ``lq`` (``kl`` and ``grad`` per row,
    broadcast): :math:`g\,p_v(\log p_v - \log q_v - KL)`, 0 where :math:`p_v = 0`, and :math:`g\,(q_v - p_v)`;
    None where ``needs`` (two flags) says that one is not needed."""
    p = lp.exp()
    ga = torch.where(p == 0, 0.0, grad * p * (lp - lq - kl)) if needs[0] else None
    gb = grad * (lq.exp() - p) if needs[1] else None
    return ga, gb


def _store(grads, index, values) -> None:
    """Write each tile of ``values`` into ``grads[index]``, where that gradient is wanted (not None)."""
    for out, value in zip(grads, values):
        if out is not None:
            out[index] = value


def _chunks_backward(a: Tensor, b: Tensor, kl: Tensor, stats, grad: Tensor, needs, chunk: int):
    r"""The CPU path's gradients, vocabulary chunk by vocabulary chunk, from the saved references and log-sums:
    :math:`\log p_v = (a_v - r_a) - \log s_a`."""
    acc = kl.dtype
    grad, kl = grad.to(acc).unsqueeze(-1), kl.unsqueeze(-1)
    ra, log_sa, rb, log_sb = (stat.to(acc).unsqueeze(-1) for stat in stats)
    grads = tuple(torch.empty_like(t) if need else None for t, need in zip((a, b), needs))
    for start in range(0, a.shape[-1], chunk):
        part = (..., slice(start, start + chunk))
        lp, lq = (a[part].to(acc) - ra).sub_(log_sa), (b[part].to(acc) - rb).sub_(log_sb)
        _store(grads, part, _grads(lp, lq, kl, grad, needs))
    return grads


#: Logits per block of whole rows on the GPU's torch path: 2**26 (256 MiB per float32 temporary).
_ROW_TILE = 1 << 26


def _row_blocks(a: Tensor, b: Tensor, acc: torch.dtype):
    """``(rows, log p, log q)`` for each block of whole rows (about :data:`_ROW_TILE` logits) of ``_rows`` views."""
    block = max(1, _ROW_TILE // math.prod(a.shape[1:]))
    for i in range(0, a.shape[0], block):
        rows = slice(i, i + block)
        yield rows, F.log_softmax(a[rows], -1, dtype=acc), F.log_softmax(b[rows], -1, dtype=acc)


def _rows_forward(logits_p: Tensor, logits_q: Tensor, chunk: int) -> tuple[Tensor]:
    r"""``(KL,)`` by blocks of whole rows: ``kl_div`` of the two ``log_softmax`` (eager's work, in bounded memory).
    Where that is not finite (a ``-inf`` logit of p gives :math:`0 \cdot \infty`), the block's terms are masked
    as on the careful path: 0 where :math:`p_v = 0`, and ``+inf`` for a token with :math:`q_v = 0 < p_v`."""
    a, b = _rows(logits_p), _rows(logits_q)
    kl = torch.empty(a.shape[:-1], dtype=_acc(a.dtype), device=a.device)
    for rows, lp, lq in _row_blocks(a, b, kl.dtype):
        part = F.kl_div(lq, lp, log_target=True, reduction="none").sum(-1)
        if not bool(part.isfinite().all()):
            p = lp.exp()
            part = torch.where(p == 0, 0.0, p * (lp - lq)).sum(-1)
            part.masked_fill_(((lq == -math.inf) & (lp > -math.inf)).any(-1), math.inf)   # a NaN row stays NaN
        kl[rows] = part
    return (kl.reshape(logits_p.shape[:-1]).clamp_min_(0.0),)


def _rows_backward(a: Tensor, b: Tensor, kl: Tensor, stats, grad: Tensor, needs, chunk: int):
    """The GPU torch path's gradients, by blocks of whole rows (``log_softmax`` again: nothing full-size saved)."""
    av, bv = _rows(a), _rows(b)
    grad, kl = grad.to(kl.dtype).reshape(av.shape[:-1]).unsqueeze(-1), kl.reshape(av.shape[:-1]).unsqueeze(-1)
    grads = tuple(torch.empty(av.shape, dtype=t.dtype, device=t.device) if need else None
                  for t, need in zip((a, b), needs))
    for rows, lp, lq in _row_blocks(av, bv, kl.dtype):
        _store(grads, rows, _grads(lp, lq, kl[rows], grad[rows], needs))
    return tuple(g if g is None else g.view(a.shape) for g in grads)


def _kernel_rows(logits: Tensor) -> Tensor:
    """``logits`` as ``[rows, V]`` with unit-stride rows, as the kernels read them: a view, or else a copy."""
    rows = logits.reshape(-1, logits.shape[-1])
    return rows if rows.stride(-1) == 1 else rows.contiguous()


def _triton_forward(logits_p: Tensor, logits_q: Tensor, chunk: int) -> tuple[Tensor, Tensor]:
    """``(KL, statistics)`` from the forward kernel: the KL shaped ``[...]``, the statistics ``[rows, 4]``."""
    from . import vocab_triton

    kl, stats = vocab_triton.forward(_kernel_rows(logits_p), _kernel_rows(logits_q))
    return kl.reshape(logits_p.shape[:-1]), stats


def _triton_backward(a: Tensor, b: Tensor, kl: Tensor, stats, grad: Tensor, needs, chunk: int):
    """The gradients from the backward kernel, in the input dtype."""
    from . import vocab_triton

    grads = vocab_triton.backward(_kernel_rows(a), _kernel_rows(b), kl.reshape(-1), stats[0], grad.reshape(-1),
                                  *needs)
    return tuple(g if g is None else g.view(a.shape) for g in grads)


#: ``token_kl``'s paths: ``(forward, backward)``, where ``forward(logits_p, logits_q, chunk)`` returns the KL and
#: the per-row statistics its ``backward(a, b, kl, statistics, grad, needs, chunk)`` reads.
_PATHS = {"chunks": (_forward, _chunks_backward), "rows": (_rows_forward, _rows_backward),
          "triton": (_triton_forward, _triton_backward)}


class _TokenKL(torch.autograd.Function):
    """``token_kl`` on one of :data:`_PATHS`, with its gradient."""

    @staticmethod
    def forward(ctx, logits_p: Tensor, logits_q: Tensor, path: str, chunk: int) -> Tensor:
        kl, *stats = _PATHS[path][0](logits_p, logits_q, chunk)
        ctx.save_for_backward(logits_p, logits_q, kl, *stats)
        ctx.path, ctx.chunk = path, chunk
        return kl

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad: Tensor):
        a, b, kl, *stats = ctx.saved_tensors
        return (*_PATHS[ctx.path][1](a, b, kl, stats, grad, ctx.needs_input_grad[:2], ctx.chunk), None, None)
