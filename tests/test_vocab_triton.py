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

# The interpreter computes the masked-out lanes too (0·inf, log 0 in rows that are about to be rejected).
pytestmark = [pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning"),
              pytest.mark.filterwarnings("ignore:divide by zero encountered:RuntimeWarning")]

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


def test_auto_uses_the_kernel_on_cuda_only_and_torch_for_gradients(monkeypatch):
    calls = []
    kernel = vocab_triton.token_kl_triton
    monkeypatch.setattr(vocab_triton, "token_kl_triton", lambda a, b: calls.append(a.device.type) or kernel(a, b))
    a, b = _logits(2, 100, seed=5)
    token_kl(a, b)                                         # CPU: the interpreter is never chosen by itself
    assert calls == []
    if DEVICE == "cuda":
        a, b = a.cuda(), b.cuda()
        token_kl(a, b)
        assert calls == ["cuda"]
    a.requires_grad_(True)
    token_kl(a, b).sum().backward()
    assert a.grad is not None and len(calls) == (DEVICE == "cuda")


def test_a_failing_kernel_falls_back_to_torch_with_a_warning_unless_asked_for(monkeypatch):
    def broken(a, b):
        raise RuntimeError("no such PTX target")

    monkeypatch.setattr(vocab_triton, "token_kl_triton", broken)
    a, b = (t.to(DEVICE) for t in _logits(2, 100, seed=6))
    with pytest.warns(RuntimeWarning, match="no such PTX target"):
        assert vocab._triton(a, b, chunk=100, strict=False) is None      # what backend="auto" does
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
    with pytest.raises(ValueError, match="no backward pass"):
        token_kl(a.requires_grad_(True), b, backend="triton")


_COMPILE_FOR_H100 = textwrap.dedent("""
    import collections, json, re, sys
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource
    from estimators.vocab_triton import _kernel, block_and_warps

    block, warps = block_and_warps(131072)
    out = {}
    for dtype in ("bf16", "fp16", "fp32"):
        signature = {"a_ptr": "*" + dtype, "b_ptr": "*" + dtype, "out_ptr": "*fp32", "vocab": "i32",
                     "stride_a": "i32", "stride_b": "i32", "BLOCK": "constexpr"}
        # what the JIT specialises at V = 131072: every pointer and integer argument divisible by 16
        attrs = {(i,): [["tt.divisibility", 16]] for i in range(6)}
        src = ASTSource(fn=_kernel, signature=signature, constexprs={"BLOCK": block}, attrs=attrs)
        kernel = triton.compile(src, target=GPUTarget("cuda", 90, 32),
                                options={"num_warps": warps, "enable_fp_fusion": True})
        ptx = kernel.asm["ptx"]
        out[dtype] = {"cubin": len(kernel.asm["cubin"]), "loads": re.findall(r"ld\\.global[.\\w]*", ptx),
                      "ex2": len(re.findall(r"ex2\\.approx", ptx)), "threads": 32 * warps, "block": block}
    json.dump(out, sys.stdout)
""")


def test_kernel_compiles_for_an_h100_with_vector_loads_and_two_exp2_per_token():
    """Ahead-of-time compilation for sm_90 runs on any machine (Triton ships ptxas): the kernel must build to a
    cubin, read its logits with 128-bit loads, and spend exactly two exp2 per token pair (plus two rescalings
    per block): what a bandwidth-bound kernel needs. Its speed on a real card is the asv benchmark's business."""
    import json

    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    done = subprocess.run([sys.executable, "-c", _COMPILE_FOR_H100], capture_output=True, text=True, env=env,
                          timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    for dtype, got in json.loads(done.stdout).items():
        assert got["cubin"] > 0
        assert got["loads"] and set(got["loads"]) == {"ld.global.v4.b32"}, (dtype, got["loads"])
        per_thread = got["block"] // got["threads"]
        assert got["ex2"] == 2 * per_thread + 2, (dtype, got["ex2"])


def test_the_gpu_table_has_every_method_and_ratio(monkeypatch):
    """vocab_gpu_figures on a small shape (on the CPU under the interpreter where there is no GPU), with a
    stand-in for Liger-Kernel's KL forward, and with one that fails: the table keeps its other rows."""
    from reports import throughput

    def stand_in(log_q, log_p):  # Liger's forward on log-probabilities: Σ_v p_v (log p_v - log q_v), summed
        return (log_p.float().exp() * (log_p.float() - log_q.float())).sum()

    monkeypatch.setattr(throughput, "liger_kl_forward", lambda: stand_in)
    frame = throughput.vocab_gpu_figures(4, 3000, torch.bfloat16, repeat=1, device=DEVICE).set_index("method")
    assert list(frame.index) == ["token_kl (triton)", "token_kl (torch)", "log_softmax + kl_div", "Liger KL forward"]
    assert frame.loc["Liger KL forward", "× Liger"] == 1.0
    assert frame.loc["log_softmax + kl_div", "× log_softmax + kl_div"] == 1.0
    assert (frame["GB/s"] > 0).all() and frame.attrs["shape"] == "[4, 3000] torch.bfloat16"

    def broken(log_q, log_p):
        raise TypeError("kldiv_forward_triton() got an unexpected keyword argument 'reduction'")

    monkeypatch.setattr(throughput, "liger_kl_forward", lambda: broken)
    frame = throughput.vocab_gpu_figures(4, 3000, torch.bfloat16, repeat=1, device=DEVICE)
    assert "Liger KL forward" not in set(frame["method"]) and frame.attrs["Liger"].startswith("failed, left out")
    assert frame["× Liger"].isna().all()
