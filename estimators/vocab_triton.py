r"""A fused Triton kernel for the forward pass of :func:`estimators.vocab.token_kl` on a GPU.

One program per row streams the row's two logit vectors once, ``BLOCK`` tokens at a time, and keeps the
online-softmax state of :mod:`estimators.vocab` in float32 registers: running maxima :math:`m_a, m_b`, the
sums :math:`s_a = \sum_v e^{a_v - m_a}`, :math:`s_b = \sum_v e^{b_v - m_b}` and
:math:`t = \sum_v e^{a_v - m_a}\big((a_v - m_a) - (b_v - m_b)\big)`, rescaled when a block raises a maximum, so
that :math:`KL(p \| q) = t / s_a - \log s_a + \log s_b` (computed in base 2: two FMAs and two ``exp2`` per
token pair, against 4 bytes read in bf16; whether that keeps the kernel at memory bandwidth is what
``benchmarks/bench_throughput.py::VocabKLGPU`` measures). Each logit is read once in its own dtype (bf16, fp16
or fp32) and nothing but the ``[rows]`` result is written, so the kernel is bound by memory bandwidth.

Semantics are those of the torch path: a ``-inf`` logit of p is a token of probability 0 (its term is 0), a
``-inf`` logit of q where p's is finite makes the row ``+inf``, and the result is clamped at 0. A row with a NaN
or ``+inf`` logit, or with all logits ``-inf``, comes back NaN; :func:`~estimators.vocab.token_kl` then raises the
same ValueError as on the CPU.

Triton is optional: without it (or without a GPU) ``token_kl`` uses torch. With ``TRITON_INTERPRET=1`` set
before Triton is first imported, ``backend="triton"`` runs the kernel on CPU tensors under Triton's interpreter
(slowly), which is how the tests check it on a machine without a GPU (``tests/conftest.py`` sets it there).
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

__all__ = ["available", "interpreting", "token_kl_triton", "DTYPES"]

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
    """(tokens per block, warps per program): 2048 tokens over 4 warps, so each thread reads two 16-byte vectors
    of bf16 per operand and block. Chosen from ptxas's report for sm_90, not yet from timings: 80 registers and
    no spills, so 6 programs (24 warps, 48 KiB of loads in flight) fit on an SM, where 8192 tokens over 16
    warps need 95 registers and fit one. Smaller vocabularies take the next power of two."""
    block = min(2048, triton.next_power_of_2(vocab))
    return block, max(1, min(4, block // 512))


def token_kl_triton(logits_p: Tensor, logits_q: Tensor) -> Tensor:
    """Per-row KL(softmax(a) ‖ softmax(b)) of two ``[rows, V]`` tensors whose last dimension is contiguous;
    float32 ``[rows]``. Inputs are assumed checked by ``token_kl`` (same shape, dtype and device)."""
    if triton is None:
        raise RuntimeError("Triton is not installed")
    rows, vocab = logits_p.shape
    out = torch.empty(rows, dtype=torch.float32, device=logits_p.device)
    if rows == 0:
        return out
    block, warps = block_and_warps(vocab)
    _kernel[(rows,)](logits_p, logits_q, out, vocab, logits_p.stride(0), logits_q.stride(0),
                     BLOCK=block, num_warps=warps, enable_fp_fusion=True)
    return out


if triton is not None:
    _LOG2E = tl.constexpr(1.4426950408889634)

    @triton.jit
    def _kernel(a_ptr, b_ptr, out_ptr, vocab, stride_a, stride_b, BLOCK: tl.constexpr):
        # Base 2 throughout, as on the torch path: x = a·log2(e) - r_a is one FMA and 2^x one MUFU op per logit.
        row = tl.program_id(0).to(tl.int64)             # row · stride overflows int32 at 16384 × 131072
        a_row = a_ptr + row * stride_a
        b_row = b_ptr + row * stride_b
        m_a = float("-inf")                             # running maxima (-inf while every logit so far is)
        m_b = float("-inf")
        r_a = 0.0                                       # references m·log2(e), or 0 while the maxima are -inf
        r_b = 0.0
        s_a = 0.0
        s_b = 0.0
        t = 0.0
        mismatch = 0                                    # tokens with q_v = 0 < p_v
        bad = 0                                         # NaN or +inf logits
        for start in range(0, vocab, BLOCK):
            offs = start + tl.arange(0, BLOCK)
            inside = offs < vocab
            a = tl.load(a_row + offs, mask=inside, other=float("-inf")).to(tl.float32)
            b = tl.load(b_row + offs, mask=inside, other=float("-inf")).to(tl.float32)
            bad += tl.sum(((a != a) | (a == float("inf")) | (b != b) | (b == float("inf"))).to(tl.int32), axis=0)
            m_a = tl.maximum(m_a, tl.max(a, axis=0))
            m_b = tl.maximum(m_b, tl.max(b, axis=0))
            r_a2 = tl.where(m_a == float("-inf"), 0.0, m_a * _LOG2E)
            r_b2 = tl.where(m_b == float("-inf"), 0.0, m_b * _LOG2E)
            alpha_a = tl.exp2(r_a - r_a2)               # rescale the sums to the new references
            alpha_b = tl.exp2(r_b - r_b2)
            t = alpha_a * (t + s_a * ((r_a - r_b) - (r_a2 - r_b2)))
            s_a = alpha_a * s_a
            s_b = alpha_b * s_b
            r_a = r_a2
            r_b = r_b2
            x = a * _LOG2E - r_a
            y = b * _LOG2E - r_b
            ea = tl.exp2(x)
            s_a += tl.sum(ea, axis=0)
            s_b += tl.sum(tl.exp2(y), axis=0)
            q_zero = (b == float("-inf")) & (a != float("-inf"))
            t += tl.sum(tl.where((a == float("-inf")) | q_zero, 0.0, ea * (x - y)), axis=0)
            mismatch += tl.sum(q_zero.to(tl.int32), axis=0)
        kl = tl.maximum((t / s_a - tl.log2(s_a) + tl.log2(s_b)) / _LOG2E, 0.0)
        kl = tl.where(mismatch > 0, float("inf"), kl)
        invalid = (bad > 0) | (m_a == float("-inf")) | (m_b == float("-inf"))
        tl.store(out_ptr + row, tl.where(invalid, float("nan"), kl))
