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
        (_good(), _good(), {"chunk_size": 0}, "chunk_size must be an int"),
        (_good(), _good(), {"chunk_size": 2.5}, "chunk_size must be an int"),
        (_good(), _good(), {"chunk_size": True}, "chunk_size must be an int"),
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


# --- the one-pass algorithm: its fast path (fixed references), its careful path (running maxima, -inf masking),
# --- row blocks, views, and the gradient


def masked_reference_kl(logits_p: torch.Tensor, logits_q: torch.Tensor) -> torch.Tensor:
    """reference_kl in float64 with the -inf semantics of token_kl: p_v = 0 terms are 0, q_v = 0 < p_v gives +inf."""
    lp = F.log_softmax(logits_p.double(), dim=-1)
    lq = F.log_softmax(logits_q.double(), dim=-1)
    return torch.where(lp == -math.inf, 0.0, lp.exp() * (lp - lq)).sum(-1)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_logits_far_above_the_first_chunk_fall_back_to_running_maxima(dtype):
    # the fast path's references are the first chunk's maxima: a later logit far above them overflows exp
    # (by > 88 in float32, > 709 in float64), so those rows are redone with running maxima; row 0 rises slowly,
    # row 1 jumps, row 2 falls
    g = torch.Generator().manual_seed(21)
    logits_p = torch.randn(3, 1000, generator=g, dtype=torch.float64)
    logits_q = torch.randn(3, 1000, generator=g, dtype=torch.float64)
    logits_p[0] += torch.linspace(0, 300, 1000, dtype=torch.float64)
    logits_q[0] += torch.linspace(0, 250, 1000, dtype=torch.float64)
    logits_p[1, 700:] += 1000
    logits_q[1, 900:] += 800
    logits_p[2, 100:] -= 200
    logits_p, logits_q = logits_p.to(dtype), logits_q.to(dtype)
    got = token_kl(logits_p, logits_q, chunk_size=64)
    tol = 1e-12 if dtype == torch.float64 else 1e-5
    torch.testing.assert_close(got.double(), reference_kl(logits_p, logits_q), rtol=tol, atol=tol)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16])
def test_row_blocks_mixing_fast_and_masked_rows(monkeypatch, dtype):
    # small tiles: 10 rows in blocks of 2; -inf logits in some blocks only (first chunk, last chunk, all but one
    # token, both masked alike), a row whose first chunk is all -inf, and a support mismatch
    import estimators.vocab as vocab
    monkeypatch.setattr(vocab, "_TILE", 64)
    g = torch.Generator().manual_seed(22)
    logits_p = 3 * torch.randn(10, 100, generator=g, dtype=torch.float64)
    logits_q = 3 * torch.randn(10, 100, generator=g, dtype=torch.float64)
    logits_p[2, :5] = -math.inf                  # p_v = 0 in the first chunk
    logits_q[3, 90:] = -math.inf                 # q_v = 0 < p_v in the last chunk: +inf
    logits_p[4, :99] = -math.inf                 # p is a point mass on the last token
    logits_p[5, 40:] = logits_q[5, 40:] = -math.inf
    logits_p[6, :32] = logits_q[6, :32] = -math.inf   # the whole first chunk is -inf in both
    logits_p[7, 10] = logits_q[7, 10] = -math.inf
    logits_p, logits_q = logits_p.to(dtype), logits_q.to(dtype)
    got = token_kl(logits_p, logits_q, chunk_size=32)
    expected = masked_reference_kl(logits_p, logits_q)
    assert got[3] == math.inf and torch.isfinite(got[torch.arange(10) != 3]).all()
    tol = 1e-12 if dtype == torch.float64 else 1e-5
    torch.testing.assert_close(got.double(), expected, rtol=tol, atol=tol)
    # the same rows, one block at a time or all at once, and through the default tile: same numbers
    monkeypatch.setattr(vocab, "_TILE", 1 << 19)
    torch.testing.assert_close(token_kl(logits_p, logits_q, chunk_size=32), got, rtol=tol, atol=tol)


def test_errors_name_logits_p_first_across_row_blocks(monkeypatch):
    # as when everything was validated up front: logits_p's problems are reported before logits_q's,
    # even when logits_q's lie in an earlier block of rows
    import estimators.vocab as vocab
    monkeypatch.setattr(vocab, "_TILE", 8)
    logits_p, logits_q = torch.zeros(6, 8), torch.zeros(6, 8)
    logits_q[0, 3] = math.nan
    logits_p[5] = -math.inf
    with pytest.raises(ValueError, match="logits_p has a row whose logits are all -inf"):
        token_kl(logits_p, logits_q, chunk_size=4)
    logits_p[5] = 0.0
    with pytest.raises(ValueError, match="logits_q contains NaN"):
        token_kl(logits_p, logits_q, chunk_size=4)


def test_views_are_not_copied_and_give_the_same_result():
    g = torch.Generator().manual_seed(23)
    base_p = torch.randn(4, 3, 500, generator=g)
    base_q = torch.randn(4, 3, 500, generator=g)
    expected = token_kl(base_p.transpose(0, 1).contiguous(), base_q.transpose(0, 1).contiguous(), chunk_size=128)
    # leading dimensions that cannot be flattened into a view, and a vocabulary with stride 2
    got = token_kl(base_p.transpose(0, 1), base_q.transpose(0, 1), chunk_size=128)
    torch.testing.assert_close(got, expected, rtol=0, atol=0)
    wide_p = torch.stack([base_p, base_p], dim=-1).flatten(-2)[..., ::2]
    wide_q = torch.stack([base_q, base_q], dim=-1).flatten(-2)[..., ::2]
    torch.testing.assert_close(token_kl(wide_p, wide_q, chunk_size=128), token_kl(base_p, base_q, chunk_size=128))


def test_small_kl_with_large_logits_keeps_absolute_accuracy():
    # KL ~ 1e-3 between logits of magnitude ~40 that differ by a large constant: E_p[a - b] and lse(a) - lse(b)
    # are ~30 each, but the shifted sums keep the float32 result within ~1e-6 of the float64 KL of the same logits
    g = torch.Generator().manual_seed(24)
    logits_p = (zipf_logits(4, 50_000, g) - 30).float()
    logits_q = (logits_p.double() + 0.05 * torch.randn(4, 50_000, generator=g, dtype=torch.float64) + 30).float()
    expected = reference_kl(logits_p, logits_q)
    assert torch.all(expected < 3e-3)
    torch.testing.assert_close(token_kl(logits_p, logits_q).double(), expected, rtol=0, atol=1e-6)
    torch.testing.assert_close(token_kl(logits_p.bfloat16(), logits_q.bfloat16()).double(),
                               reference_kl(logits_p.bfloat16(), logits_q.bfloat16()), rtol=0, atol=1e-6)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16])
def test_gradient_matches_autograd_of_the_reference(dtype):
    g = torch.Generator().manual_seed(25)
    logits_p = 2 * torch.randn(3, 2, 300, generator=g, dtype=torch.float64)
    logits_q = 2 * torch.randn(3, 2, 300, generator=g, dtype=torch.float64)
    logits_p[0, 1, :250] = -math.inf             # top-k-like truncation: no gradient on the masked tokens
    weights = torch.randn(3, 2, generator=g, dtype=torch.float64)
    a = logits_p.to(dtype).requires_grad_()
    b = logits_q.to(dtype).requires_grad_()
    (token_kl(a, b, chunk_size=64) * weights.to(a.dtype if dtype == torch.float64 else torch.float32)).sum().backward()
    # the float64 reference, with -inf as -1e4 (p_v = exp(-1e4) is exactly 0) so that its autograd has no NaN
    a64 = a.detach().double().nan_to_num(neginf=-1e4).requires_grad_()
    b64 = b.detach().double().requires_grad_()
    (reference_kl(a64, b64) * weights).sum().backward()
    assert a.grad.dtype == dtype and b.grad.dtype == dtype
    assert torch.all(a.grad[0, 1, :250] == 0)
    tol = {torch.float64: 1e-10, torch.float32: 1e-5, torch.bfloat16: 2e-2}[dtype]
    torch.testing.assert_close(a.grad.double(), a64.grad, rtol=tol, atol=tol)
    torch.testing.assert_close(b.grad.double(), b64.grad, rtol=tol, atol=tol)
    if dtype == torch.float64:
        assert torch.autograd.gradcheck(lambda x, y: token_kl(x, y, chunk_size=7),
                                        (logits_p[1:, :, :20].clone().requires_grad_(),
                                         logits_q[1:, :, :20].clone().requires_grad_()))


# --- issue 13: finfo.min masks, huge logits and zero rows (each NaN or a crash before)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("where", ["both", "p", "first-chunk"])
def test_finfo_min_masks_give_the_kl_of_the_unmasked_tokens(dtype, where):
    """Hugging Face masks logits with finfo(dtype).min: a token of probability e^-3.4e38 = 0, as with -inf."""
    g = torch.Generator().manual_seed(31)
    a = 2 * torch.randn(3, 1000, generator=g)
    b = a + 0.5 * torch.randn(3, 1000, generator=g)
    masked = slice(0, 300) if where == "first-chunk" else slice(400, 700)
    a, b = a.to(dtype), b.to(dtype)
    a[:, masked] = torch.finfo(dtype).min
    if where != "p":
        b[:, masked] = torch.finfo(dtype).min
    expected = masked_reference_kl(a, b)
    assert torch.isfinite(expected).all() and (expected > 0.01).all()
    got = token_kl(a, b, chunk_size=256)
    torch.testing.assert_close(got.double(), expected, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("offset", [5e9, 1e10, 1e30])
def test_huge_logits_are_shifted_before_they_are_scaled(offset):
    """At 5e9 and beyond every float32 logit of a row rounds to a few values: the KL of those values, not NaN."""
    g = torch.Generator().manual_seed(32)
    a = offset + offset * 1e-6 * torch.randn(2, 700, generator=g)
    b = a + offset * 1e-7 * torch.randn(2, 700, generator=g)
    a, b = a.float(), b.float()
    got = token_kl(a, b, chunk_size=256)
    torch.testing.assert_close(got.double(), reference_kl(a, b), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(token_kl(a + offset, b + offset), torch.zeros(2))   # one value per row: KL 0


@pytest.mark.parametrize("shape", [(0, 5), (2, 0, 5)])
def test_zero_rows_give_an_empty_result(shape):
    import estimators.vocab as vocab
    got = token_kl(torch.zeros(shape), torch.zeros(shape))
    assert got.shape == shape[:-1] and got.dtype == torch.float32
    for path in ("chunks", "rows"):                                # and an empty gradient
        a = torch.zeros(shape, requires_grad=True)
        vocab._compute(path, a, torch.zeros(shape), 5, grad=True).sum().backward()
        assert a.grad.shape == shape


# --- the torch path on a GPU ("rows": blocks of whole rows through log_softmax), run here on the CPU


def test_the_torch_path_is_rows_on_a_gpu_and_chunks_on_the_cpu():
    import estimators.vocab as vocab
    assert vocab._torch_path(torch.zeros(1)) == "chunks"
    assert vocab._torch_path(torch.zeros(1, device="meta")) == "rows"
    assert vocab._path(torch.zeros(2, 3), torch.zeros(2, 3), "torch") == "chunks"


def _masked_rows(dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """Ten rows of 100 logits, each masked in its own way (see the comments)."""
    g = torch.Generator().manual_seed(41)
    logits_p = 3 * torch.randn(10, 100, generator=g, dtype=torch.float64)
    logits_q = 3 * torch.randn(10, 100, generator=g, dtype=torch.float64)
    logits_p[1, :5] = -math.inf                  # p_v = 0
    logits_q[2, 90:] = -math.inf                 # q_v = 0 < p_v: +inf
    logits_p[3, :99] = -math.inf                 # p is a point mass on the last token
    logits_p[4, 40:] = logits_q[4, 40:] = -math.inf
    logits_p[5, 10] = -200.0                     # p_v = e^-200 underflows in float32, and q_v = 0: still +inf
    logits_q[5, 10] = -math.inf
    logits_p[6, 20:60] = logits_q[6, 20:60] = -1e30
    logits_p, logits_q = logits_p.to(dtype), logits_q.to(dtype)
    if dtype != torch.float64:
        logits_p[7, 50:] = logits_q[7, 50:] = torch.finfo(dtype).min
        logits_p[8, :30] = torch.finfo(dtype).min
    return logits_p, logits_q


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16], ids=str)
def test_rows_path_matches_float64_with_every_mask(monkeypatch, dtype):
    import estimators.vocab as vocab
    monkeypatch.setattr(vocab, "_ROW_TILE", 300)                   # blocks of 3 rows: finite and masked blocks
    logits_p, logits_q = _masked_rows(dtype)
    got = vocab._compute("rows", logits_p.view(2, 5, 100), logits_q.view(2, 5, 100), 100, grad=False).view(10)
    expected = masked_reference_kl(logits_p, logits_q)
    inf = torch.tensor([row in (2, 5) for row in range(10)])
    assert got.dtype == (torch.float64 if dtype == torch.float64 else torch.float32)
    assert (got[inf] == math.inf).all() and torch.isfinite(got[~inf]).all()
    tol = 1e-12 if dtype == torch.float64 else 1e-5
    torch.testing.assert_close(got[~inf].double(), expected[~inf], rtol=tol, atol=tol)
    torch.testing.assert_close(got, token_kl(logits_p, logits_q, backend="torch"), rtol=tol, atol=tol)


@pytest.mark.parametrize(("row", "value", "match"), [(0, math.nan, "logits_p contains NaN"),
                                                     (0, math.inf, r"logits_p contains \+inf"),
                                                     (None, -math.inf, "logits_p has a row whose logits are all -inf")])
def test_rows_path_raises_the_same_errors(row, value, match):
    import estimators.vocab as vocab
    logits_p, logits_q = torch.zeros(3, 8), torch.zeros(3, 8)
    logits_p[1, row] = value
    logits_q[1, 5] = -math.inf                   # a support mismatch in the same row must not hide the error
    with pytest.raises(ValueError, match=match):
        vocab._compute("rows", logits_p, logits_q, 8, grad=False)
    assert vocab._compute("rows", torch.zeros(0, 8), torch.zeros(0, 8), 8, grad=False).shape == (0,)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16], ids=str)
def test_rows_path_gradient_matches_the_chunk_path(monkeypatch, dtype):
    import estimators.vocab as vocab
    monkeypatch.setattr(vocab, "_ROW_TILE", 300)
    logits_p, logits_q = _masked_rows(dtype)
    finite = [0, 1, 3, 4, 6, 7, 8, 9]                              # +inf rows have no gradient
    weights = torch.randn(len(finite), generator=torch.Generator().manual_seed(42), dtype=vocab._acc(dtype))
    grads = []
    for path in ("rows", "chunks"):
        a = logits_p[finite].clone().requires_grad_()
        b = logits_q[finite].clone().requires_grad_()
        (vocab._compute(path, a, b, 32, grad=True) * weights).sum().backward()
        grads.append((a.grad, b.grad))
        assert a.grad.dtype == dtype and (a.grad[1, :5] == 0).all() and (a.grad[2, :99] == 0).all()
    tol = {torch.float64: 1e-12, torch.float32: 1e-6, torch.bfloat16: 1e-2}[dtype]
    torch.testing.assert_close(grads[0], grads[1], rtol=tol, atol=tol)
    if dtype == torch.float64:
        assert torch.autograd.gradcheck(lambda x, y: vocab._compute("rows", x, y, 7, grad=True),
                                        (logits_p[:1, :20].clone().requires_grad_(),
                                         logits_q[:1, :20].clone().requires_grad_()))


@pytest.mark.parametrize("path", ["chunks", "rows"])
def test_gradient_at_large_logits_keeps_the_references_apart(path):
    """log p = (a - r) - log s with the reference r a logit: at float32 logits of 1e5, a - lse(a) rounded lse to
    the logits' ulp (0.008), a 2e-3 relative error in the gradient."""
    import estimators.vocab as vocab
    g = torch.Generator().manual_seed(43)
    a = (1e5 + 3 * torch.randn(3, 3000, generator=g, dtype=torch.float64)).float()
    b = (a.double() + 0.5 * torch.randn(3, 3000, generator=g, dtype=torch.float64)).float()
    a64, b64 = a.double().requires_grad_(), b.double().requires_grad_()
    reference_kl(a64, b64).sum().backward()
    a, b = a.requires_grad_(), b.requires_grad_()
    vocab._compute(path, a, b, 1024, grad=True).sum().backward()
    for got, expected in ((a.grad, a64.grad), (b.grad, b64.grad)):
        torch.testing.assert_close(got.double(), expected, rtol=0, atol=1e-5 * expected.abs().max())
