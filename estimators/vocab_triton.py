r"""Fused Triton kernels for :func:`estimators.vocab.token_kl` on a GPU: the forward pass and its gradient.

Forward: one program per row streams the row's two logit vectors once, ``BLOCK`` tokens at a time, and keeps the
online-softmax state of :mod:`estimators.vocab` in float32 registers: running maxima :math:`m_a, m_b`, the
sums :math:`s_a = \sum_v e^{a_v - m_a}`, :math:`s_b = \sum_v e^{b_v - m_b}` and
:math:`t = \sum_v e^{a_v - m_a}\big((a_v - m_a) - (b_v - m_b)\big)`, rescaled when a block raises a maximum, so
that :math:`KL(p \| q) = t / s_a - \log s_a + \log s_b`. Per token pair: two shifts, two scalings to base 2 and
two ``exp2``, against 4 bytes read in bf16; the only per-token bookkeeping is a per-lane flag for a support
mismatch, reduced once after the loop (reducing integer counts every block cost a third of the kernel's time on an
H200, 3.38 ms against 2.28 ms at [16384, 131072] bf16, as measured in issue 12). Each logit is read once in its own
dtype (bf16, fp16 or fp32); the ``[rows]`` KL and ``[rows, 4]`` statistics (the references and log-sums of
:math:`\mathrm{lse}(a)` and :math:`\mathrm{lse}(b)`) are all it writes.

Backward: one program per (row, block of tokens), no loop and no reduction: with :math:`\log p_v = (a_v - r_a) -
\log s_a` and :math:`\log q_v = (b_v - r_b) - \log s_b` from the saved statistics,

.. math:: \partial KL / \partial a_v = p_v(\log p_v - \log q_v - KL), \qquad \partial KL / \partial b_v = q_v - p_v,

times the row's upstream gradient, written straight into gradient tensors of the input dtype: one more read of the
logits, one write per gradient, and no float32 temporary.

Semantics are those of the torch path: a token whose :math:`e^{a_v - m_a}` is 0 (a ``-inf`` or ``finfo.min`` logit
of p) has term 0 and gradient 0, a ``-inf`` logit of q where p's is not makes the row ``+inf``, and the result is
clamped at 0. A row with a NaN or ``+inf`` logit, or with all logits ``-inf``, comes back NaN;
:func:`~estimators.vocab.token_kl` then raises the same ValueError as on the CPU.

Triton is optional: without it (or without a GPU) ``token_kl`` uses torch. With ``TRITON_INTERPRET=1`` set
before Triton is first imported, ``backend="triton"`` runs the kernels on CPU tensors under Triton's interpreter
(slowly), which is how the tests check them on a machine without a GPU (``tests/conftest.py`` sets it there).
Whether they reach the card's memory bandwidth is what ``benchmarks/bench_throughput.py::VocabKLGPU`` measures.
"""
from __future__ import annotations

import os

import torch
from torch import Tensor

try:
    import triton
    import triton.language as tl
except ImportError:  # Triton is optional; token_kl then always uses its torch path
    triton = None

__all__ = ["available", "interpreting", "forward", "backward", "DTYPES"]

#: The input dtypes the kernel reads directly (float64 stays on the torch path, which accumulates in float64).
DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def interpreting() -> bool:
    """Whether Triton runs kernels in its CPU interpreter (``TRITON_INTERPRET=1``)."""
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def available(logits: Tensor) -> bool:
    """Whether the kernel can run on ``logits``: Triton is installed, the tensor is on CUDA (or on the CPU
    while Triton interprets) and its dtype is one of :data:`DTYPES`."""
    return triton is not None and logits.dtype in DTYPES and (logits.is_cuda or (interpreting() and logits.is_cpu))


def block_and_warps(vocab: int) -> tuple[int, int]:
    """(tokens per block, warps per program), for both kernels: 2048 tokens over 4 warps, so each thread reads two
    16-byte vectors of bf16 per operand and block. Chosen from ptxas's report for sm_90, not yet from timings: the
    forward kernel needs 72 registers in bf16 (77 in fp32; 87 before its per-lane flags) and the backward 48, no
    spills, so 6-7 forward programs (24-28 warps, 48-56 KiB of loads in flight) fit on an SM, where 8192 tokens
    over 16 warps needed 95 and fit one. Smaller vocabularies take the next power of two."""
    block = min(2048, triton.next_power_of_2(vocab))
    return block, max(1, min(4, block // 512))


def forward(logits_p: Tensor, logits_q: Tensor) -> tuple[Tensor, Tensor]:
    r"""Per-row ``KL(softmax(a) ‖ softmax(b))`` of two ``[rows, V]`` tensors whose last dimension is contiguous,
    float32 ``[rows]``, and the per-row statistics the backward pass needs, float32 ``[rows, 4]``: the references
    (row maxima) and log-sums :math:`(r_a, \log s_a, r_b, \log s_b)`, so that :math:`\mathrm{lse} = r + \log s`.
    Inputs are assumed checked by ``token_kl`` (same shape, dtype and device)."""
    if triton is None:
        raise RuntimeError("Triton is not installed")
    rows, vocab = logits_p.shape
    kl = torch.empty(rows, dtype=torch.float32, device=logits_p.device)
    stats = torch.empty(rows, 4, dtype=torch.float32, device=logits_p.device)
    if rows:
        block, warps = block_and_warps(vocab)
        _forward_kernel[(rows,)](logits_p, logits_q, kl, stats, vocab, logits_p.stride(0), logits_q.stride(0),
                                 BLOCK=block, num_warps=warps, enable_fp_fusion=True)
    return kl, stats


def backward(logits_p: Tensor, logits_q: Tensor, kl: Tensor, stats: Tensor, grad: Tensor, grad_p: bool,
             grad_q: bool) -> tuple[Tensor | None, Tensor | None]:
    r"""The gradients of :math:`\sum_r g_r KL_r` with respect to ``logits_p`` and ``logits_q`` (``[rows, V]``, last
    dimension contiguous), contiguous in the input dtype, or None where ``grad_p`` / ``grad_q`` is False: one more
    read of the logits, with ``kl`` and ``stats`` from :func:`forward` and the upstream gradient ``grad`` (``[rows]``)."""
    if triton is None:
        raise RuntimeError("Triton is not installed")
    rows, vocab = logits_p.shape
    ga = torch.empty(rows, vocab, dtype=logits_p.dtype, device=logits_p.device) if grad_p else None
    gb = torch.empty(rows, vocab, dtype=logits_q.dtype, device=logits_q.device) if grad_q else None
    if rows:
        block, warps = block_and_warps(vocab)
        grad = grad.to(torch.float32).contiguous()         # autograd may hand an expanded (stride-0) gradient
        # a gradient that is not wanted is never written: its pointer slot takes kl as a placeholder
        _backward_kernel[(rows, triton.cdiv(vocab, block))](
            logits_p, logits_q, kl, stats, grad, ga if grad_p else kl, gb if grad_q else kl, vocab,
            logits_p.stride(0), logits_q.stride(0), BLOCK=block, GRAD_P=grad_p, GRAD_Q=grad_q, num_warps=warps,
            enable_fp_fusion=True)
    return ga, gb


if triton is not None:
    _LOG2E = tl.constexpr(1.4426950408889634)

    @triton.jit
    def _forward_kernel(a_ptr, b_ptr, kl_ptr, stats_ptr, vocab, stride_a, stride_b, BLOCK: tl.constexpr):
        # Each logit is shifted by its row's running maximum first (x = a - r_a: exact for logits of any size, and a
        # finfo.min mask stays finite), then scaled to base 2 for one MUFU exp2: e^x = 2^(x·log2 e).
        row = tl.program_id(0).to(tl.int64)             # row · stride overflows int32 at 16384 × 131072
        a_row = a_ptr + row * stride_a
        b_row = b_ptr + row * stride_b
        m_a = float("-inf")                             # running maxima (-inf while every logit so far is)
        m_b = float("-inf")
        r_a = 0.0                                       # references: the maxima, or 0 while they are -inf
        r_b = 0.0
        s_a = 0.0
        s_b = 0.0
        t = 0.0
        mismatch = tl.zeros([BLOCK], dtype=tl.int1)     # per lane, reduced once after the loop: q_v = 0 < p_v
        for start in range(0, vocab, BLOCK):
            offs = start + tl.arange(0, BLOCK)
            inside = offs < vocab
            a = tl.load(a_row + offs, mask=inside, other=float("-inf")).to(tl.float32)
            b = tl.load(b_row + offs, mask=inside, other=float("-inf")).to(tl.float32)
            m_a2 = tl.maximum(m_a, tl.max(a, axis=0))
            m_b2 = tl.maximum(m_b, tl.max(b, axis=0))
            r_a2 = tl.where(m_a2 == float("-inf"), 0.0, m_a2)
            r_b2 = tl.where(m_b2 == float("-inf"), 0.0, m_b2)
            alpha_a = tl.exp2((m_a - r_a2) * _LOG2E)    # rescale the sums to the new references (0 while all -inf)
            alpha_b = tl.exp2((m_b - r_b2) * _LOG2E)
            s_a = alpha_a * s_a
            s_b = alpha_b * s_b
            t = alpha_a * t + s_a * ((r_a - r_b) - (r_a2 - r_b2))
            m_a = m_a2
            m_b = m_b2
            r_a = r_a2
            r_b = r_b2
            x = a - r_a
            y = b - r_b
            ea = tl.exp2(x * _LOG2E)
            s_a += tl.sum(ea, axis=0)
            s_b += tl.sum(tl.exp2(y * _LOG2E), axis=0)
            t += tl.sum(tl.where(ea == 0.0, 0.0, ea * (x - y)), axis=0)    # e^x = 0 (p_v = 0): the term is 0
            mismatch = mismatch | ((b == float("-inf")) & (a != float("-inf")))
        log_s_a = tl.log2(s_a) / _LOG2E
        log_s_b = tl.log2(s_b) / _LOG2E
        kl = tl.maximum(t / s_a - log_s_a + log_s_b, 0.0)
        kl = tl.where(tl.max(mismatch.to(tl.int32), axis=0) > 0, float("inf"), kl)
        # A NaN logit makes its exp and so the sum NaN; a +inf one raises the maximum to +inf, and its own
        # shifted value inf - inf is NaN: an invalid row needs no test per token.
        invalid = (s_a != s_a) | (s_b != s_b) | (m_a == float("-inf")) | (m_b == float("-inf"))
        tl.store(kl_ptr + row, tl.where(invalid, float("nan"), kl))
        tl.store(stats_ptr + 4 * row, r_a)          # lse = r + log s, kept apart: see the backward kernel
        tl.store(stats_ptr + 4 * row + 1, log_s_a)
        tl.store(stats_ptr + 4 * row + 2, r_b)
        tl.store(stats_ptr + 4 * row + 3, log_s_b)

    @triton.jit
    def _backward_kernel(a_ptr, b_ptr, kl_ptr, stats_ptr, grad_ptr, ga_ptr, gb_ptr, vocab, stride_a, stride_b,
                         BLOCK: tl.constexpr, GRAD_P: tl.constexpr, GRAD_Q: tl.constexpr):
        # One program per (row, block of BLOCK tokens); no loop and no reduction: log p = (a - r_a) - log s_a
        # (r_a is a logit, so a - r_a rounds to its own ulp; a - lse(a) would round lse to the logits' ulp), and
        # dKL/da = p (log p - log q - KL) (0 where p = 0), dKL/db = q - p, each times the row's upstream gradient.
        row = tl.program_id(0).to(tl.int64)
        offs = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
        inside = offs < vocab
        a = tl.load(a_ptr + row * stride_a + offs, mask=inside, other=float("-inf")).to(tl.float32)
        b = tl.load(b_ptr + row * stride_b + offs, mask=inside, other=float("-inf")).to(tl.float32)
        g = tl.load(grad_ptr + row)
        lp = (a - tl.load(stats_ptr + 4 * row)) - tl.load(stats_ptr + 4 * row + 1)
        lq = (b - tl.load(stats_ptr + 4 * row + 2)) - tl.load(stats_ptr + 4 * row + 3)
        p = tl.exp2(lp * _LOG2E)
        if GRAD_P:
            ga = tl.where(p == 0.0, 0.0, g * p * ((lp - lq) - tl.load(kl_ptr + row)))
            tl.store(ga_ptr + row * vocab + offs, ga.to(ga_ptr.dtype.element_ty), mask=inside)
        if GRAD_Q:
            gb = g * (tl.exp2(lq * _LOG2E) - p)
            tl.store(gb_ptr + row * vocab + offs, gb.to(gb_ptr.dtype.element_ty), mask=inside)
