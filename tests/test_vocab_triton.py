"""The fused Triton kernel of token_kl against the torch path in float64: on a GPU where there is one, else on
the CPU under Triton's interpreter (tests/conftest.py sets TRITON_INTERPRET=1 there). Its speed is a
benchmark (benchmarks/bench_throughput.py), not a test."""
from __future__ import annotations

import math
import os
import subprocess
import sys
import textwrap

import pytest
import torch

from estimators import vocab, vocab_triton
from estimators.vocab import token_kl

pytest.importorskip("triton", reason="Triton is a dev dependency; the kernel is optional at run time")

# The interpreter computes the masked-out lanes too (0·inf, log 0 in rows that are about to be rejected), and
# a finfo.min logit scaled to base 2 overflows to -inf (its exp2 is 0, as meant).
pytestmark = [pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning"),
              pytest.mark.filterwarnings("ignore:divide by zero encountered:RuntimeWarning"),
              pytest.mark.filterwarnings("ignore:overflow encountered:RuntimeWarning")]

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
if DEVICE == "cpu" and not vocab_triton.interpreting():
    pytest.skip("no GPU and TRITON_INTERPRET is not set", allow_module_level=True)


def _logits(rows: int, vocab: int, seed: int, scale: float = 3.0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    a = scale * torch.randn(rows, vocab, generator=g)
    return a, a + 0.5 * torch.randn(rows, vocab, generator=g)


def _kernel(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """token_kl through the kernel on DEVICE, back on the CPU."""
    return token_kl(a.to(DEVICE), b.to(DEVICE), backend="triton").cpu()


def _exact(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """The torch path in float64 on the same (rounded) logits."""
    return token_kl(a.double(), b.double(), backend="torch")


# V = 20000 spans ten blocks of 2048, so the running maxima and the rescaling of the sums are exercised.
@pytest.mark.parametrize("vocab", [1, 7, 1000, 20000])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=str)
def test_kernel_matches_the_float64_torch_path(vocab, dtype):
    a, b = (t.to(dtype) for t in _logits(3, vocab, seed=vocab))
    got = _kernel(a, b)
    assert got.dtype == torch.float32 and got.shape == (3,)
    torch.testing.assert_close(got.double(), _exact(a, b), rtol=1e-5, atol=1e-6)


def test_a_maximum_in_a_later_block_rescales_the_sums():
    """Logits that jump by 1000 in the last block: without rescaling exp would overflow, with a stale
    reference the first blocks' mass would be counted at the wrong scale."""
    a, b = _logits(2, 20000, seed=1)
    a[:, -100:] += 1000.0
    b[0, -100:] += 1000.0
    b[1, -100:] += 990.0
    torch.testing.assert_close(_kernel(a, b).double(), _exact(a, b), rtol=1e-5, atol=1e-5)


def test_minus_inf_logits_follow_the_torch_path():
    """p_v = 0 contributes 0, q_v = 0 < p_v makes the row +inf, and a row whose first block is all -inf
    (a top-k mask) starts its maxima late."""
    a, b = _logits(4, 20000, seed=2)
    a[0, :50] = -math.inf                     # p_v = 0
    b[1, 123] = -math.inf                     # q_v = 0 < p_v: +inf
    a[2, :10000] = -math.inf                  # the first block of p is all -inf
    b[2, :10000] = -math.inf
    a[3, 5] = b[3, 5] = -math.inf             # both zero: no term
    got = _kernel(a, b)
    exact = _exact(a, b)
    assert got[1] == math.inf and exact[1] == math.inf
    keep = [0, 2, 3]
    torch.testing.assert_close(got[keep].double(), exact[keep], rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize(("where", "value", "match"), [
    ("p", math.nan, "logits_p contains NaN"),
    ("q", math.nan, "logits_q contains NaN"),
    ("p", math.inf, r"logits_p contains \+inf"),
    ("q", math.inf, r"logits_q contains \+inf"),
    ("p", -math.inf, "logits_p has a row whose logits are all -inf"),
    ("q", -math.inf, "logits_q has a row whose logits are all -inf"),
], ids=["nan-p", "nan-q", "+inf-p", "+inf-q", "all--inf-p", "all--inf-q"])
def test_invalid_logits_raise_the_torch_paths_errors(where, value, match):
    a, b = _logits(3, 300, seed=3)
    target = a if where == "p" else b
    if value == -math.inf:
        target[1] = -math.inf
    else:
        target[1, 17] = value
    with pytest.raises(ValueError, match=match):
        _kernel(a, b)


def test_batch_shapes_and_strided_rows():
    a, b = _logits(6, 500, seed=4)
    got = _kernel(a.view(2, 3, 500), b.view(2, 3, 500))
    torch.testing.assert_close(got.double(), _exact(a, b).view(2, 3), rtol=1e-5, atol=1e-6)
    at, bt = (t.to(DEVICE).T.contiguous().T for t in (a, b))  # same values, column-major: no unit-stride rows
    got = token_kl(at, bt, backend="triton").cpu()
    torch.testing.assert_close(got.double(), _exact(a, b), rtol=1e-5, atol=1e-6)


def test_auto_uses_the_kernels_on_cuda_only_for_values_and_gradients(monkeypatch):
    calls = []
    kernels = vocab_triton.forward, vocab_triton.backward
    monkeypatch.setattr(vocab_triton, "forward", lambda *args: calls.append("forward") or kernels[0](*args))
    monkeypatch.setattr(vocab_triton, "backward", lambda *args: calls.append("backward") or kernels[1](*args))
    a, b = _logits(2, 100, seed=5)
    token_kl(a, b)                                         # CPU: the interpreter is never chosen by itself
    assert calls == []
    a, b = a.to(DEVICE).requires_grad_(True), b.to(DEVICE)
    token_kl(a, b).sum().backward()
    assert a.grad is not None and calls == (["forward", "backward"] if DEVICE == "cuda" else [])
    calls.clear()
    token_kl(a.detach().T.contiguous().T, b)               # auto leaves rows that are not unit-stride to torch
    assert calls == []


def test_a_failing_kernel_falls_back_to_torch_with_a_warning_unless_asked_for(monkeypatch):
    def broken(a, b):
        raise RuntimeError("no such PTX target")

    monkeypatch.setattr(vocab_triton, "forward", broken)
    a, b = (t.to(DEVICE) for t in _logits(2, 100, seed=6))
    with pytest.warns(RuntimeWarning, match="no such PTX target"):                # what backend="auto" does
        got = vocab._compute("triton", a, b, chunk=100, grad=False, strict=False)
    torch.testing.assert_close(got.cpu(), token_kl(a.cpu(), b.cpu(), backend="torch"))
    with pytest.raises(RuntimeError, match="no such PTX target"):
        token_kl(a, b, backend="triton")


def test_triton_backend_refuses_what_it_cannot_do(monkeypatch):
    a, b = _logits(2, 10, seed=7)
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    with pytest.raises(ValueError, match="needs Triton and a CUDA tensor"):
        token_kl(a, b, backend="triton")                    # a CPU tensor, no interpreter
    with pytest.raises(ValueError, match="needs Triton and a CUDA tensor"):
        token_kl(a.double().to(DEVICE), b.double().to(DEVICE), backend="triton")  # float64 stays on torch
    with pytest.raises(ValueError, match="backend must be one of"):
        token_kl(a, b, backend="cuda")


# --- issue 13 on the kernel: finfo.min masks, huge logits, zero rows; and a row that starts all -inf


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_finfo_min_masks_and_huge_logits(dtype):
    """finfo.min masks in both, in p only and over the whole first block; logits of 5e9 and 1e30 (NaN or 0
    before: the kernel scaled each logit before shifting it)."""
    a, b = (t.to(dtype) for t in _logits(3, 5000, seed=8))
    low = torch.finfo(dtype).min
    a[0, 1000:3000] = b[0, 1000:3000] = low
    a[1, 1000:3000] = low
    a[2, :2500] = b[2, :2500] = low
    got = _kernel(a, b)
    torch.testing.assert_close(got.double(), _exact(a, b), rtol=1e-5, atol=1e-6)
    assert (got > 0.01).all()
    for offset in (5e9, 1e30):
        a, b = _logits(2, 3000, seed=9, scale=offset * 1e-6)
        a, b = a + offset, b + offset
        torch.testing.assert_close(_kernel(a, b).double(), _exact(a, b), rtol=1e-5, atol=1e-6)


def test_a_row_whose_first_block_is_all_minus_inf_and_then_small():
    """The sums are rescaled from the old maximum (-inf: factor 0), not from the reference 0 it stood for, which
    gave 2^144 · 0 = NaN for logits below -88 after an all -inf block."""
    a, b = _logits(2, 5000, seed=10)
    a[:, :2048] = b[:, :2048] = -math.inf
    a[:, 2048:] -= 200
    b[:, 2048:] -= 300
    torch.testing.assert_close(_kernel(a, b).double(), _exact(a, b), rtol=1e-5, atol=1e-6)


def test_gradient_at_large_logits():
    """The backward kernel takes log p = (a - r_a) - log s_a from the saved reference and log-sum: at float32 logits
    of 1e5, a - lse(a) would round lse to the logits' ulp (a 2e-3 relative error in the gradient)."""
    a, b = _logits(3, 3000, seed=13)
    a, b = a + 1e5, b + 1e5
    ga, gb = _reference_grads(a, b, torch.ones(3, dtype=torch.float64))
    ad, bd = (t.to(DEVICE).requires_grad_() for t in (a, b))
    token_kl(ad, bd, backend="triton").sum().backward()
    for got, expected in ((ad.grad, ga), (bd.grad, gb)):
        torch.testing.assert_close(got.cpu().double(), expected, rtol=0, atol=1e-5 * expected.abs().max())


def test_zero_rows_give_an_empty_result():
    assert _kernel(torch.zeros(0, 7), torch.zeros(0, 7)).shape == (0,)
    a = torch.zeros(2, 0, 7, device=DEVICE, requires_grad=True)
    kl = token_kl(a, torch.zeros(2, 0, 7, device=DEVICE), backend="triton")
    kl.sum().backward()
    assert kl.shape == (2, 0) and a.grad.shape == (2, 0, 7)


# --- the backward kernel against float64 autograd


def _reference_grads(a: torch.Tensor, b: torch.Tensor, weights: torch.Tensor):
    """Float64 autograd of Σ weights · Σ_v p_v (log p_v - log q_v) through log_softmax, on the same (rounded)
    logits, -inf as -1e4 (p_v = e^-1e4 is exactly 0, and autograd has no NaN)."""
    a64 = a.detach().double().nan_to_num(neginf=-1e4).requires_grad_()
    b64 = b.detach().double().nan_to_num(neginf=-1e4).requires_grad_()
    lp, lq = torch.log_softmax(a64, -1), torch.log_softmax(b64, -1)
    ((lp.exp() * (lp - lq)).sum(-1) * weights).sum().backward()
    return a64.grad, b64.grad


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=str)
def test_backward_kernel_matches_float64_autograd(dtype):
    """Both gradients in the input dtype, through -inf masks (zero gradient), a finfo.min mask, a row whose
    first block is masked, batch dimensions and rows that are not contiguous in memory."""
    a, b = _logits(6, 5000, seed=11)
    a[0, :100] = -math.inf                                 # p_v = 0: no gradient
    a[1, 10:20] = b[1, 10:20] = -math.inf
    a[2, :2500] = b[2, :2500] = -math.inf                  # the first block of the row: all -inf
    a[3, 4000:] = torch.finfo(dtype).min
    a, b = a.to(dtype), b.to(dtype)
    weights = torch.randn(2, 3, generator=torch.Generator().manual_seed(12), dtype=torch.float64)
    ga, gb = _reference_grads(a, b, weights.view(-1))
    tol = {torch.float32: 1e-5, torch.bfloat16: 1e-2, torch.float16: 1e-3}[dtype]
    # both logit tensors in one leaf [6, 2 V]: rows with a stride of 2 V, seen as [2, 3, V]
    wide = torch.cat([a, b], dim=-1).to(DEVICE).requires_grad_()
    kl = token_kl(wide[:, :5000].view(2, 3, 5000), wide[:, 5000:].view(2, 3, 5000), backend="triton")
    (kl * weights.float().to(DEVICE)).sum().backward()
    assert wide.grad.dtype == dtype
    got_a, got_b = wide.grad[:, :5000].cpu().double(), wide.grad[:, 5000:].cpu().double()
    assert (got_a[0, :100] == 0).all() and (got_a[2, :2500] == 0).all()
    torch.testing.assert_close(got_a, ga, rtol=tol, atol=tol * ga.abs().max())
    torch.testing.assert_close(got_b, gb, rtol=tol, atol=tol * gb.abs().max())
    # one gradient only: the kernel writes that one
    ad = a.to(DEVICE).requires_grad_()
    (token_kl(ad, b.to(DEVICE), backend="triton") * weights.view(-1).float().to(DEVICE)).sum().backward()
    torch.testing.assert_close(ad.grad.cpu().double(), ga, rtol=tol, atol=tol * ga.abs().max())


_COMPILE_FOR_H100 = textwrap.dedent("""
    import collections, json, re, sys
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource
    from estimators.vocab_triton import _backward_kernel, _forward_kernel, block_and_warps

    block, warps = block_and_warps(131072)
    out = {}
    for dtype in ("bf16", "fp16", "fp32"):
        logits = {"a_ptr": "*" + dtype, "b_ptr": "*" + dtype, "kl_ptr": "*fp32", "stats_ptr": "*fp32"}
        for name, fn, pointers, constexprs in (
                ("forward", _forward_kernel, logits, {"BLOCK": block}),
                ("backward", _backward_kernel, {**logits, "grad_ptr": "*fp32", "ga_ptr": "*" + dtype,
                                                "gb_ptr": "*" + dtype}, {"BLOCK": block, "GRAD_P": True, "GRAD_Q": True})):
            signature = {**pointers, "vocab": "i32", "stride_a": "i32", "stride_b": "i32",
                         **dict.fromkeys(constexprs, "constexpr")}
            # what the JIT specialises at V = 131072: every pointer and integer argument divisible by 16
            attrs = {(i,): [["tt.divisibility", 16]] for i in range(len(pointers) + 3)}
            src = ASTSource(fn=fn, signature=signature, constexprs=constexprs, attrs=attrs)
            kernel = triton.compile(src, target=GPUTarget("cuda", 90, 32),
                                    options={"num_warps": warps, "enable_fp_fusion": True})
            ptx = kernel.asm["ptx"]
            out[f"{dtype} {name}"] = {
                "cubin": len(kernel.asm["cubin"]), "ex2": len(re.findall(r"ex2\\.approx", ptx)),
                "loads": collections.Counter(re.findall(r"ld\\.global[.\\w]*", ptx)),
                "stores": collections.Counter(re.findall(r"st\\.global[.\\w]*", ptx)),
                "per_thread": block // (32 * warps), "bytes": {"bf16": 2, "fp16": 2, "fp32": 4}[dtype]}
    json.dump(out, sys.stdout)
""")


def test_kernels_compile_for_an_h100_with_vector_loads_and_two_exp2_per_token():
    """Ahead-of-time compilation for sm_90 runs on any machine (Triton ships ptxas): each kernel must build to a
    cubin, read its logits (and the backward write its gradients) with 128-bit accesses only, and spend exactly
    two exp2 per token pair (the forward two more per block, to rescale): what a bandwidth-bound kernel needs.
    The forward reads nothing else; the backward six scalars a row (the upstream gradient, the KL and the four
    statistics). Their speed on a real card is the asv benchmark's business."""
    import json

    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    done = subprocess.run([sys.executable, "-c", _COMPILE_FOR_H100], capture_output=True, text=True, env=env,
                          timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    for kernel, got in json.loads(done.stdout).items():
        assert got["cubin"] > 0
        vectors = 2 * got["per_thread"] * got["bytes"] // 16          # 16-byte accesses per thread for two tensors
        per_block = 2 if kernel.endswith("forward") else 0
        assert got["ex2"] == 2 * got["per_thread"] + per_block, (kernel, got["ex2"])
        scalars = {} if kernel.endswith("forward") else {"ld.global.b32": 6}
        assert got["loads"] == {"ld.global.v4.b32": vectors, **scalars}, (kernel, got["loads"])
        if kernel.endswith("backward"):
            assert got["stores"] == {"st.global.v4.b32": vectors}, (kernel, got["stores"])


def test_the_gpu_table_has_every_method_pass_and_ratio(monkeypatch):
    """vocab_gpu_figures on a small shape (on the CPU under the interpreter where there is no GPU), with stand-ins
    for Liger-Kernel's KL loss and torch.compile, and with ones that fail: the table keeps its other rows."""
    from reports import throughput

    def stand_in(log_q, log_p):  # Liger's KL loss on log-probabilities: Σ_v p_v (log p_v - log q_v), summed
        return (log_p.float().exp() * (log_p.float() - log_q.float())).sum()

    monkeypatch.setattr(throughput, "liger_kl", lambda: stand_in)
    monkeypatch.setattr(throughput, "compiled_torch_token_kl", lambda: throughput.torch_token_kl)
    frame = throughput.vocab_gpu_figures(4, 3000, torch.bfloat16, repeat=1, device=DEVICE)
    methods = ["token_kl (triton)", "token_kl (torch)", "log_softmax + kl_div", "torch.compile(log_softmax + kl_div)",
               "Liger KL (kernel alone)", "Liger KL (from logits)"]
    assert list(frame["method"]) == [m for m in methods for _ in throughput.PASSES]
    assert list(frame["pass"]) == list(throughput.PASSES) * len(methods)
    indexed = frame.set_index(["method", "pass"])
    for column, baseline in throughput.BASELINES.items():
        assert (indexed.loc[baseline, column] == 1.0).all()
    assert (frame["GB/s"] > 0).all() and frame.attrs["shape"] == "[4, 3000] torch.bfloat16"
    # asv's GPU tracks read this table: every ratio of the Triton kernels in both passes
    from benchmarks.bench_throughput import VocabKLGPU
    bench = VocabKLGPU()
    for work in throughput.PASSES:
        bench.triton = indexed.loc[("token_kl (triton)", work)]  # what setup reads off the table on a GPU
        ratios = {name: getattr(bench, name)(work) for name in dir(bench) if name.startswith("track_")}
        assert len(ratios) == 5 and all(value > 0 for name, value in ratios.items() if "peak" not in name)

    def broken(log_q, log_p):
        raise TypeError("LigerKLDIVLoss.forward() got an unexpected keyword argument 'eps'")

    def no_compiler(*logits):
        raise RuntimeError("Compiler: cc is not found")

    monkeypatch.setattr(throughput, "liger_kl", lambda: broken)
    monkeypatch.setattr(throughput, "compiled_torch_token_kl", lambda: no_compiler)
    frame = throughput.vocab_gpu_figures(4, 3000, torch.bfloat16, repeat=1, device=DEVICE)
    assert set(frame["method"]) == set(methods[:3])
    assert frame.attrs["Liger KL (kernel alone), forward"].startswith("failed, left out: TypeError")
    assert frame.attrs["torch.compile(log_softmax + kl_div), forward + backward"].endswith("cc is not found")
    assert frame[list(throughput.BASELINES)[:3]].isna().all().all()
