"""Exact per-token KL over a vocabulary (estimators.vocab.token_kl) against torch's float64 reference."""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from estimators.vocab import token_kl


def reference_kl(logits_p: torch.Tensor, logits_q: torch.Tensor) -> torch.Tensor:
    """KL(p||q) in float64 through torch.nn.functional.kl_div (which takes its arguments as (log q, log p))."""
    lp = F.log_softmax(logits_p.double(), dim=-1)
    lq = F.log_softmax(logits_q.double(), dim=-1)
    return F.kl_div(lq, lp, log_target=True, reduction="none").sum(-1)


def zipf_logits(rows: int, vocab: int, generator: torch.Generator) -> torch.Tensor:
    """Zipf-like next-token logits: -1.1 log(rank) over a random permutation of the vocabulary, plus noise."""
    log_rank = torch.log(torch.arange(1, vocab + 1, dtype=torch.float64))
    perms = torch.stack([torch.randperm(vocab, generator=generator) for _ in range(rows)])
    noise = 0.1 * torch.randn(rows, vocab, generator=generator, dtype=torch.float64)
    return -1.1 * log_rank[perms] + noise


@pytest.mark.parametrize(
    ("shape", "chunk_size"),
    [
        ((7,), 3),            # chunk does not divide V
        ((4, 50), 7),
        ((2, 3, 101), 16),
        ((5, 33), 1000),      # chunk larger than V
        ((3, 5), 1),          # one token at a time
        ((6, 1000), 8192),    # default-sized chunk
        ((1,), 1),            # a single-token vocabulary: KL is 0
    ],
)
def test_matches_torch_kl_div_float64(shape, chunk_size):
    g = torch.Generator().manual_seed(1234 + sum(shape) + chunk_size)
    logits_p = 3 * torch.randn(shape, generator=g, dtype=torch.float64)
    logits_q = 3 * torch.randn(shape, generator=g, dtype=torch.float64)
    got = token_kl(logits_p, logits_q, chunk_size=chunk_size)
    assert got.shape == shape[:-1]
    assert got.dtype == torch.float64
    torch.testing.assert_close(got, reference_kl(logits_p, logits_q), rtol=1e-12, atol=1e-12)


def test_float32_matches_reference_and_returns_float32():
    g = torch.Generator().manual_seed(7)
    logits_p = 2 * torch.randn(8, 3000, generator=g)
    logits_q = 2 * torch.randn(8, 3000, generator=g)
    got = token_kl(logits_p, logits_q, chunk_size=999)
    assert got.dtype == torch.float32
    torch.testing.assert_close(got.double(), reference_kl(logits_p, logits_q), rtol=1e-5, atol=1e-6)


def test_chunk_size_does_not_change_result():
    g = torch.Generator().manual_seed(8)
    logits_p = torch.randn(3, 257, generator=g, dtype=torch.float64)
    logits_q = torch.randn(3, 257, generator=g, dtype=torch.float64)
    results = [token_kl(logits_p, logits_q, chunk_size=c) for c in (1, 2, 64, 256, 257, 10_000)]
    for r in results[1:]:
        torch.testing.assert_close(r, results[0], rtol=1e-12, atol=1e-14)


def test_large_vocabulary_zipf():
    vocab = 200_000
    g = torch.Generator().manual_seed(2024)
    logits_p = zipf_logits(4, vocab, g)
    # rows 0-1: q ranks the vocabulary differently (KL ~ 7); rows 2-3: q is p plus small noise (KL ~ 0.004)
    logits_q = torch.cat([zipf_logits(2, vocab, g),
                          logits_p[2:] + 0.1 * torch.randn(2, vocab, generator=g, dtype=torch.float64)])
    expected = reference_kl(logits_p, logits_q)
    assert torch.all(expected[:2] > 1) and torch.all(expected[2:] < 0.01)
    # float64 logits: float64 accumulation, far inside 1e-5 relative
    torch.testing.assert_close(token_kl(logits_p, logits_q), expected, rtol=1e-10, atol=0)
    # float32 logits, compared with the float64 KL of those same float32 logits
    logits_p32, logits_q32 = logits_p.float(), logits_q.float()
    expected32 = reference_kl(logits_p32, logits_q32)
    got = token_kl(logits_p32, logits_q32)
    assert got.dtype == torch.float32
    torch.testing.assert_close(got[:2].double(), expected32[:2], rtol=1e-5, atol=0)
    # float32 log-probabilities of magnitude ~13 carry an absolute error of ~1 ulp (1e-6) each, so a small KL is
    # only good to an absolute ~1e-7..1e-6 (observed: ~3e-7), not to 1e-5 relative
    torch.testing.assert_close(got[2:].double(), expected32[2:], rtol=0, atol=2e-6)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_inputs_give_float32(dtype):
    g = torch.Generator().manual_seed(11)
    logits_p = (2 * torch.randn(4, 5000, generator=g)).to(dtype)
    logits_q = (2 * torch.randn(4, 5000, generator=g)).to(dtype)
    got = token_kl(logits_p, logits_q, chunk_size=1024)
    assert got.dtype == torch.float32
    # the reference sees the same (rounded) half-precision logits, so only accumulation error remains
    torch.testing.assert_close(got.double(), reference_kl(logits_p, logits_q), rtol=1e-2, atol=0)


def test_kl_of_a_distribution_with_itself_is_zero_and_kl_is_nonnegative():
    g = torch.Generator().manual_seed(3)
    logits = 4 * torch.randn(16, 777, generator=g)
    same = token_kl(logits, logits, chunk_size=100)
    assert torch.all(same.abs() <= 1e-6)
    # shifting logits by a constant leaves the distribution unchanged
    assert torch.all(token_kl(logits, logits + 5.0, chunk_size=100) <= 1e-5)
    other = token_kl(logits, 4 * torch.randn(16, 777, generator=g), chunk_size=100)
    assert torch.all(other >= 0)
    assert torch.all(torch.isfinite(other))


def test_top_k_truncated_p_is_finite_and_matches_enumeration():
    g = torch.Generator().manual_seed(5)
    vocab, k = 300, 20
    logits_p = torch.randn(4, vocab, generator=g, dtype=torch.float64)
    logits_q = torch.randn(4, vocab, generator=g, dtype=torch.float64)
    kth = logits_p.topk(k, dim=-1).values[..., -1:]
    truncated = logits_p.masked_fill(logits_p < kth, -math.inf)
    got = token_kl(truncated, logits_q, chunk_size=64)
    assert torch.all(torch.isfinite(got))
    # enumeration over the k kept tokens only
    expected = torch.empty(4, dtype=torch.float64)
    for row in range(4):
        keep = truncated[row] > -math.inf
        assert int(keep.sum()) == k
        lp = truncated[row][keep] - torch.logsumexp(truncated[row][keep], 0)
        lq = (logits_q[row] - torch.logsumexp(logits_q[row], 0))[keep]
        expected[row] = (lp.exp() * (lp - lq)).sum()
    torch.testing.assert_close(got, expected, rtol=1e-12, atol=1e-12)
    # float32 too (the masked terms must not become NaN)
    got32 = token_kl(truncated.float(), logits_q.float(), chunk_size=64)
    torch.testing.assert_close(got32.double(), expected, rtol=1e-5, atol=1e-6)


def test_masked_in_both_is_zero_contribution():
    logits_p = torch.tensor([[0.0, -math.inf, 1.0, -math.inf]])
    logits_q = torch.tensor([[0.0, -math.inf, 1.0, 2.0]])
    # p lives on {0, 2}; q puts extra mass on token 3, so KL = -log(q(0) + q(2)) renormalisation
    expected = -torch.log(torch.tensor([(1 + math.e) / (1 + math.e + math.e ** 2)]))
    torch.testing.assert_close(token_kl(logits_p, logits_q, chunk_size=3), expected)
    torch.testing.assert_close(token_kl(logits_p, logits_p, chunk_size=3), torch.zeros(1))


def test_support_mismatch_gives_inf():
    logits_p = torch.tensor([[0.0, 1.0, 2.0], [0.0, 1.0, 2.0], [0.0, -math.inf, 2.0]])
    logits_q = torch.tensor([[0.0, -math.inf, 2.0], [0.0, 1.0, 2.0], [0.0, 1.0, 2.0]])
    got = token_kl(logits_p, logits_q, chunk_size=2)
    assert got[0] == math.inf          # p(1) > 0 = q(1)
    assert got[1] == 0                 # identical
    assert torch.isfinite(got[2]) and got[2] > 0
    # p's mass on the token q excludes underflows to 0 in exp, yet the result is still +inf
    tiny = torch.tensor([[0.0, -200.0]])
    assert token_kl(tiny, torch.tensor([[0.0, -math.inf]]))[0] == math.inf


def _good(shape=(2, 5)):
    return torch.zeros(shape)


@pytest.mark.parametrize(
    ("logits_p", "logits_q", "kwargs", "match"),
    [
        ([0.0, 1.0], _good((2,)), {}, "logits_p must be a torch.Tensor"),
        (_good(), None, {}, "logits_q must be a torch.Tensor"),
        (torch.zeros(2, 5, dtype=torch.int64), _good(), {}, "logits_p must have a floating-point dtype"),
        (_good(), torch.zeros(2, 5, dtype=torch.bool), {}, "logits_q must have a floating-point dtype"),
        (torch.tensor(0.0), torch.tensor(0.0), {}, "logits_p must have at least one dimension"),
        (torch.zeros(2, 0), torch.zeros(2, 0), {}, "logits_p has an empty vocabulary"),
        (_good((2, 5)), _good((2, 6)), {}, "logits_p and logits_q must have the same shape"),
        (_good(), _good().double(), {}, "logits_p and logits_q must have the same dtype"),
        (_good(), _good(), {"chunk_size": 0}, "chunk_size must be a positive integer"),
        (_good(), _good(), {"chunk_size": 2.5}, "chunk_size must be a positive integer"),
        (_good(), _good(), {"chunk_size": True}, "chunk_size must be a positive integer"),
        (_good().index_fill(1, torch.tensor([3]), math.nan), _good(), {"chunk_size": 2}, "logits_p contains NaN"),
        (_good(), _good().index_fill(1, torch.tensor([4]), math.nan), {"chunk_size": 2}, "logits_q contains NaN"),
        (_good().index_fill(1, torch.tensor([0]), math.inf), _good(), {}, r"logits_p contains \+inf"),
        (_good(), _good().index_fill(1, torch.tensor([2]), math.inf), {}, r"logits_q contains \+inf"),
        (_good().index_fill(0, torch.tensor([1]), -math.inf), _good(), {"chunk_size": 2},
         "logits_p has a row whose logits are all -inf"),
        (_good(), torch.full((2, 5), -math.inf), {}, "logits_q has a row whose logits are all -inf"),
    ],
)
def test_bad_input_raises_value_error_naming_the_argument(logits_p, logits_q, kwargs, match):
    with pytest.raises(ValueError, match=match):
        token_kl(logits_p, logits_q, **kwargs)
