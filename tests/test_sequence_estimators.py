"""Sequence-level KL estimators (estimators.sequence) against tiny autoregressive pairs known exactly.

A toy model is a lookup table of next-token logits for every prefix (V**T sequences in all), so the sequence KL,
every estimator's exact mean and variance, and the biases under a truncated sampling policy are computed by
enumerating all sequences: these checks are exact (float64 rounding only). The sampled z-tests state their
false-alarm rate, i.e. the probability that a correct implementation fails them with a fresh seed.
"""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch.distributions import Bernoulli, kl_divergence

from estimators.sequence import (bernoulli_rao_blackwell_kl, bernoulli_token_log_probs, categorical_token_log_probs,
                                 rao_blackwell_kl, sequence_k1, sequence_k3, sequence_k3_per_token)

V, T = 3, 4
FROM_LOG_PROBS = [sequence_k1, sequence_k3_per_token, sequence_k3]
DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


# --- toy autoregressive models: next-token logits for every prefix --------------------------------------------

def random_table(seed: int, vocab: int = V, steps: int = T, scale: float = 1.0) -> list[torch.Tensor]:
    """``table[t]`` is ``[vocab**t, vocab]``: the logits of step t for each prefix, read as a base-vocab number."""
    g = torch.Generator().manual_seed(seed)
    return [scale * torch.randn(vocab ** t, vocab, generator=g, dtype=torch.float64) for t in range(steps)]


def step_logits(table: list[torch.Tensor], x: torch.Tensor) -> torch.Tensor:
    """``[N, T, V]``: position t holds the logits that x_t is drawn from, given the prefix x_<t."""
    vocab, prefix, rows = table[0].shape[-1], torch.zeros(x.shape[0], dtype=torch.long), []
    for t, logits in enumerate(table):
        rows.append(logits[prefix])
        prefix = prefix * vocab + x[:, t]
    return torch.stack(rows, dim=1)


def sample(table: list[torch.Tensor], n: int, seed: int) -> torch.Tensor:
    """``[n, T]`` sequences drawn from the table's model."""
    g = torch.Generator().manual_seed(seed)
    vocab, prefix = table[0].shape[-1], torch.zeros(n, dtype=torch.long)
    x = torch.empty(n, len(table), dtype=torch.long)
    for t, logits in enumerate(table):
        x[:, t] = torch.multinomial(torch.softmax(logits[prefix], -1), 1, generator=g).squeeze(1)
        prefix = prefix * vocab + x[:, t]
    return x


def all_sequences(vocab: int = V, steps: int = T) -> torch.Tensor:
    return torch.cartesian_prod(*[torch.arange(vocab)] * steps).reshape(-1, steps)


def seq_log_prob(table: list[torch.Tensor], x: torch.Tensor) -> torch.Tensor:
    """Exact log-probability of each whole sequence (the ground truth, independent of the estimators)."""
    logits = step_logits(table, x)
    return F.log_softmax(logits, -1).gather(-1, x.unsqueeze(-1)).squeeze(-1).sum(-1)


def inputs(table_p, table_q, x):
    """What RLHF code hands the estimators: per-token log-probs ``[N, T]`` and per-position logits ``[N, T, V]``."""
    logits_p, logits_q = step_logits(table_p, x), step_logits(table_q, x)
    return (categorical_token_log_probs(logits_p, x), categorical_token_log_probs(logits_q, x), logits_p, logits_q)


def estimates(table_p, table_q, x) -> dict[str, torch.Tensor]:
    log_p, log_q, logits_p, logits_q = inputs(table_p, table_q, x)
    out = {f.__name__: f(log_p, log_q) for f in FROM_LOG_PROBS}
    out["rao_blackwell_kl"] = rao_blackwell_kl(logits_p, logits_q)
    return out


def exact(table_p, table_q):
    """Over every sequence p can produce: (p(x), sequences, exact sequence KL, {estimator: (mean, variance)})."""
    x = all_sequences(table_p[0].shape[-1], len(table_p))
    log_p = seq_log_prob(table_p, x)
    x, log_p = x[log_p > -math.inf], log_p[log_p > -math.inf]
    w = log_p.exp()
    kl = (w * (log_p - seq_log_prob(table_q, x))).sum().item()
    moments = {}
    for name, values in estimates(table_p, table_q, x).items():
        mean = (w * values).sum().item()
        moments[name] = (mean, (w * (values - mean) ** 2).sum().item())
    return w, x, kl, moments


P, Q = random_table(0), random_table(1)


# --- exact means and variances ---------------------------------------------------------------------------------

def test_every_estimator_is_exactly_unbiased_when_q_support_is_inside_p():
    w, _, kl, moments = exact(P, Q)
    assert w.sum().item() == pytest.approx(1.0, abs=1e-14) and kl > 0.1
    for name, (mean, _) in moments.items():
        assert mean == pytest.approx(kl, rel=1e-12), name


def test_rao_blackwell_and_k3_are_never_negative():
    values = estimates(P, Q, all_sequences())
    assert bool((values.pop("sequence_k1") < 0).any())                # k1 is not
    for name, v in values.items():
        assert bool((v >= 0).all()), name


def test_exact_variances_on_the_toy_case():
    """Exact facts of this case (V=3, T=4, unit-scale random logits), not theorems: RB has the smallest variance."""
    _, _, _, m = exact(P, Q)
    var = {name: v for name, (_, v) in m.items()}
    ratios = {name: var["rao_blackwell_kl"] / v for name, v in var.items() if name != "rao_blackwell_kl"}
    assert ratios["sequence_k1"] == pytest.approx(0.13660, abs=1e-5)
    assert ratios["sequence_k3_per_token"] == pytest.approx(0.12567, abs=1e-5)
    assert ratios["sequence_k3"] == pytest.approx(0.01793, abs=1e-5)


def test_rao_blackwell_variance_can_exceed_k1():
    """Var(k1) - Var(RB) = sum_t E[Var(k1_t | x<t) + 2 Cov(k1_t, V_{t+1} | x<t)] can be negative: here the step-2 KL
    is C - k1_1(x_1), so k1 = log p/q(x) = C for every sequence (variance 0) while RB = KL_1 + C - k1_1 varies."""
    p1, q1, c = torch.tensor([0.5, 0.5], dtype=torch.float64), torch.tensor([0.8, 0.2], dtype=torch.float64), 1.0
    k1_1 = (p1 / q1).log()
    q2_0 = torch.exp(k1_1 - c)                      # q(0 | x_1), and p(0 | x_1) = 1: KL_2(x_1) = c - k1_1(x_1)
    table_p = [p1.log().unsqueeze(0), torch.tensor([[0.0, -math.inf]] * 2, dtype=torch.float64)]
    table_q = [q1.log().unsqueeze(0), torch.stack([q2_0, 1 - q2_0], -1).log()]
    _, _, kl, m = exact(table_p, table_q)
    assert m["sequence_k1"][0] == pytest.approx(c) and m["rao_blackwell_kl"][0] == pytest.approx(kl)
    assert m["sequence_k1"][1] == pytest.approx(0.0, abs=1e-14)
    assert m["rao_blackwell_kl"][1] == pytest.approx(0.25 * (k1_1[0] - k1_1[1]).item() ** 2, rel=1e-12)


def test_truncated_policy_biases_both_k3_forms_by_the_predicted_amounts():
    """p samples top-2 of 3 tokens at every prefix; q is not truncated. m_t(x<t) = q's mass on the dropped token:
    E[k3 per token] = KL - E_p[sum_t m_t], E[k3 of the sequence] = KL + q(supp p) - 1; k1 and RB stay unbiased."""
    table_p = [logits.scatter(-1, logits.argmin(-1, keepdim=True), -math.inf) for logits in P]
    w, x, kl, m = exact(table_p, Q)
    dropped = step_logits(table_p, x) == -math.inf
    mass_off = (torch.softmax(step_logits(Q, x), -1) * dropped).sum((-1, -2))     # sum_t m_t(x<t) per sequence
    bias_per_token = -(w * mass_off).sum().item()
    bias_sequence = seq_log_prob(Q, x).exp().sum().item() - 1                       # q(supp p) - 1
    assert bias_per_token < -0.1 and bias_sequence < -0.1 and abs(bias_per_token - bias_sequence) > 0.1
    assert m["sequence_k1"][0] == pytest.approx(kl, rel=1e-12)
    assert m["rao_blackwell_kl"][0] == pytest.approx(kl, rel=1e-12)
    assert m["sequence_k3_per_token"][0] - kl == pytest.approx(bias_per_token, rel=1e-10)
    assert m["sequence_k3"][0] - kl == pytest.approx(bias_sequence, rel=1e-10)


def test_q_zero_where_p_is_not_gives_infinite_kl():
    table_q = [logits.scatter(-1, logits.argmax(-1, keepdim=True), -math.inf) for logits in Q]
    x = all_sequences()
    log_p, log_q, logits_p, logits_q = inputs(P, table_q, x)
    assert bool(rao_blackwell_kl(logits_p, logits_q).isposinf().all())
    with pytest.raises(ValueError, match="log_q contains .* non-finite"):
        sequence_k1(log_p, log_q)


# --- sampled: the whole pipeline (sampling, gathering log-probs, estimating) -----------------------------------

def test_sampled_means_match_the_exact_kl():
    """Four two-sided z-tests with the exact standard errors, Bonferroni: family false-alarm rate 1e-3 (|z| < 3.66
    each). N is chosen so that a bias of 5% of the KL in any estimator is caught with probability >= 0.99."""
    _, _, kl, m = exact(P, Q)
    z_crit, z_power = 3.6623, 2.3263
    sd_max = max(math.sqrt(v) for _, v in m.values())
    n = math.ceil(((z_crit + z_power) * sd_max / (0.05 * kl)) ** 2)
    assert n < 200_000
    for name, values in estimates(P, Q, sample(P, n, seed=2024)).items():
        se = math.sqrt(m[name][1] / n)
        mean = values.mean().item()
        assert abs(mean - kl) / se < z_crit, name
        assert abs(mean - 1.05 * kl) / se > z_crit, name     # the planted 5% bias would be caught


# --- binary autoregressive models ---------------------------------------------------------------------------------

def test_bernoulli_forms_equal_the_two_class_categorical_ones_and_are_unbiased():
    table_p, table_q = random_table(3, vocab=2, scale=2.0), random_table(4, vocab=2, scale=2.0)
    w, x, kl, m = exact(table_p, table_q)
    logits_p, logits_q = step_logits(table_p, x), step_logits(table_q, x)
    a, b = logits_p[..., 1] - logits_p[..., 0], logits_q[..., 1] - logits_q[..., 0]
    rb = bernoulli_rao_blackwell_kl(a, b)
    torch.testing.assert_close(rb, rao_blackwell_kl(logits_p, logits_q), rtol=1e-12, atol=1e-14)
    assert (w * rb).sum().item() == pytest.approx(kl, rel=1e-12)
    for xs in (x, x.bool(), x.double()):
        torch.testing.assert_close(bernoulli_token_log_probs(a, xs), categorical_token_log_probs(logits_p, x),
                                   rtol=1e-12, atol=1e-14)


def test_bernoulli_kl_matches_torch_and_is_stable_for_large_logits():
    g = torch.Generator().manual_seed(5)
    a, b = 8 * torch.randn(2, 500, generator=g, dtype=torch.float64), 8 * torch.randn(2, 500, generator=g,
                                                                                       dtype=torch.float64)
    want = kl_divergence(Bernoulli(logits=a), Bernoulli(logits=b)).sum(-1)
    torch.testing.assert_close(bernoulli_rao_blackwell_kl(a, b), want, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(bernoulli_rao_blackwell_kl(a.float(), b.float()).double(), want, rtol=1e-5, atol=1e-5)
    a = torch.tensor([500.0, -500.0, 40.0, 40.0, 0.0, 1e-3], dtype=torch.float64).unsqueeze(-1)
    b = torch.tensor([-500.0, 500.0, 40.5, 40.0, 1e-30, 0.0], dtype=torch.float64).unsqueeze(-1)
    # 500, 500, e^-40 (e^-.5 - .5) + O(e^-80), 0, 0, and d^2 / 8 - d^4 / 64 + ... for d = 1e-3 (40 digits: mpmath)
    want = torch.tensor([500.0, 500.0, math.exp(-40) * (math.exp(-0.5) - 0.5), 0.0, 0.0, 1.2499998437500174e-07],
                        dtype=torch.float64)
    for dtype, rtol in ((torch.float64, 1e-9), (torch.float32, 1e-3)):
        got = bernoulli_rao_blackwell_kl(a.to(dtype), b.to(dtype))
        assert bool((got >= 0).all())
        torch.testing.assert_close(got.double(), want, rtol=rtol, atol=0)


def test_token_log_probs_match_log_softmax_and_bernoulli():
    g = torch.Generator().manual_seed(6)
    logits = 5 * torch.randn(2, 7, 11, generator=g, dtype=torch.float64)
    x = torch.randint(0, 11, (2, 7), generator=g)
    want = F.log_softmax(logits, -1).gather(-1, x.unsqueeze(-1)).squeeze(-1)
    torch.testing.assert_close(categorical_token_log_probs(logits, x), want, rtol=1e-12, atol=1e-12)
    half = categorical_token_log_probs(logits.bfloat16(), x)
    assert half.dtype == torch.float32
    torch.testing.assert_close(half.double(), F.log_softmax(logits.bfloat16().double(), -1).gather(
        -1, x.unsqueeze(-1)).squeeze(-1), rtol=1e-5, atol=1e-5)
    a = 30 * torch.randn(3, 9, generator=g, dtype=torch.float64)
    y = torch.randint(0, 2, (3, 9), generator=g)
    torch.testing.assert_close(bernoulli_token_log_probs(a, y), Bernoulli(logits=a).log_prob(y.double()),
                               rtol=1e-10, atol=1e-12)


# --- masks: variable-length sequences with garbage padding ---------------------------------------------------

LENGTHS = [6, 3, 0, 1, 5]


def _padded(seed: int):
    """Log-probs, categorical and Bernoulli logits for len(LENGTHS) sequences, padding filled with NaN and inf."""
    g = torch.Generator().manual_seed(seed)
    b, t = len(LENGTHS), max(LENGTHS)
    mask = torch.arange(t) < torch.tensor(LENGTHS).unsqueeze(1)
    logits = torch.randn(2, b, t, 4, generator=g, dtype=torch.float64)
    x = torch.randint(0, 4, (b, t), generator=g)
    lp, lq = (categorical_token_log_probs(lg, x) for lg in logits)
    bern = torch.randn(2, b, t, generator=g, dtype=torch.float64)
    garbage = torch.tensor([math.nan, math.inf, -math.inf], dtype=torch.float64)[torch.arange(b * t) % 3].view(b, t)
    lp, lq, *bern = (v.where(mask, garbage) for v in (lp, lq, *bern))
    logits = logits.where(mask.unsqueeze(-1), math.nan)
    return mask, (lp, lq), tuple(logits), tuple(bern)


@pytest.mark.parametrize("mask_dtype", [torch.bool, torch.float32, torch.int64])
def test_masked_result_equals_the_estimator_on_the_truncated_sequences(mask_dtype):
    mask, log_probs, logits, bern = _padded(7)
    cases = [(f, log_probs) for f in FROM_LOG_PROBS] + [(rao_blackwell_kl, logits),
                                                        (bernoulli_rao_blackwell_kl, bern)]
    for f, (u, v) in cases:
        got = f(u, v, mask.to(mask_dtype))
        assert got.shape == (len(LENGTHS),) and bool(torch.isfinite(got).all()), f.__name__
        for i, n in enumerate(LENGTHS):
            want = f(u[i:i + 1, :n], v[i:i + 1, :n])[0] if n else 0.0
            assert got[i].item() == pytest.approx(float(want), rel=1e-12, abs=1e-15), (f.__name__, i)


def test_gradients_ignore_padding():
    mask, log_probs, logits, bern = _padded(8)
    for f, pair in [(sequence_k3, log_probs), (sequence_k3_per_token, log_probs), (rao_blackwell_kl, logits),
                    (bernoulli_rao_blackwell_kl, bern)]:
        u, v = (t.clone().requires_grad_() for t in pair)
        f(u, v, mask).sum().backward()
        for grad in (u.grad, v.grad):
            assert bool(torch.isfinite(grad).all()), f.__name__
            assert bool((grad[~mask] == 0).all()), f.__name__


def test_rao_blackwell_gathers_masked_rows_in_blocks(monkeypatch):
    import estimators.sequence as sequence
    mask, _, (a, b), _ = _padded(9)
    want = rao_blackwell_kl(a, b, mask)
    monkeypatch.setattr(sequence, "_GATHER", 8)          # two rows of V=4 per token_kl call
    torch.testing.assert_close(rao_blackwell_kl(a, b, mask), want, rtol=1e-14, atol=0)


# --- dtypes, devices, validation ------------------------------------------------------------------------------

@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_dtype_and_device(dtype, device):
    log_p, log_q, logits_p, logits_q = (v.to(device, dtype) for v in inputs(P, Q, sample(P, 64, seed=1)))
    for f in FROM_LOG_PROBS:
        out = f(log_p, log_q, torch.ones_like(log_p, dtype=torch.bool))
        assert out.dtype == dtype and out.device.type == device and out.shape == (64,)
        torch.testing.assert_close(out.double().cpu(), f(log_p.double(), log_q.double()).cpu(), rtol=1e-5, atol=1e-5)
    out = rao_blackwell_kl(logits_p, logits_q)
    assert out.dtype == dtype and out.device.type == device
    torch.testing.assert_close(rao_blackwell_kl(logits_p, logits_q, torch.ones(64, T, device=device)), out)
    out = bernoulli_rao_blackwell_kl(log_p, log_q)
    assert out.dtype == dtype and out.device.type == device


def test_leading_batch_dimensions():
    log_p, log_q, logits_p, logits_q = inputs(P, Q, sample(P, 12, seed=3))
    for f, (u, v) in [(sequence_k3, (log_p, log_q)), (rao_blackwell_kl, (logits_p, logits_q))]:
        flat = f(u, v)
        torch.testing.assert_close(f(u.view(3, 4, *u.shape[1:]), v.view(3, 4, *v.shape[1:])), flat.view(3, 4))


_LP, _LQ = torch.zeros(2, 3), torch.zeros(2, 3)
_LG = torch.zeros(2, 3, 5)
_NAN = torch.tensor([[0.0, math.nan, 0.0], [0.0, 0.0, 0.0]])


@pytest.mark.parametrize(("call", "match"), [
    (lambda: sequence_k1(_LP, torch.zeros(2, 4)), "log_p and log_q must have the same shape"),
    (lambda: sequence_k1(_LP, _LQ.double()), "log_p and log_q must have the same dtype"),
    (lambda: sequence_k3(_LP.long(), _LQ), "log_p must have a floating-point dtype"),
    (lambda: sequence_k3([0.0], _LQ), "log_p must be a torch.Tensor"),
    (lambda: sequence_k1(torch.tensor(0.0), torch.tensor(0.0)), "log_p must be non-empty with at least 1"),
    (lambda: sequence_k1(torch.zeros(2, 0), torch.zeros(2, 0)), "log_p must be non-empty"),
    (lambda: sequence_k1(_NAN, _LQ), "log_p contains 1 non-finite .NaN. values; they must be finite at unmasked positions"),
    (lambda: sequence_k3_per_token(_LP, _NAN, torch.ones(2, 3)), "log_q contains 1 non-finite"),
    (lambda: sequence_k3_per_token(_LP, _LQ, torch.ones(3, 2)), r"mask must have shape \(2, 3\)"),
    (lambda: sequence_k3(_LP, _LQ, torch.full((2, 3), 0.5)), "mask must be bool or hold only 0 and 1"),
    (lambda: sequence_k3(_LP, _LQ, [[1, 1, 1]] * 2), "mask must be a torch.Tensor"),
    (lambda: rao_blackwell_kl(torch.zeros(5), torch.zeros(5)), "logits_p must be non-empty with at least 2"),
    (lambda: rao_blackwell_kl(_LG, torch.zeros(2, 3, 4)), "logits_p and logits_q must have the same shape"),
    (lambda: rao_blackwell_kl(_LG, _LG, torch.ones(2, 3, 5)), r"mask must have shape \(2, 3\)"),
    (lambda: rao_blackwell_kl(_LG.where(torch.arange(5) != 2, math.nan), _LG), "logits_p contains NaN"),
    (lambda: rao_blackwell_kl(_LG, _LG.where(torch.arange(5) != 2, math.inf), torch.ones(2, 3)),
     r"logits_q contains \+inf"),
    (lambda: bernoulli_rao_blackwell_kl(_LP, _LP.where(_LP != 0, math.inf)), "logits_q contains 6 non-finite"),
    (lambda: bernoulli_rao_blackwell_kl(_LP, _LQ, torch.ones(2, 3, dtype=torch.int32) * 2), "mask must be bool"),
    (lambda: categorical_token_log_probs(_LG, torch.zeros(2, 3)), "x must have an integer dtype"),
    (lambda: categorical_token_log_probs(_LG, torch.full((2, 3), 5)), r"x must hold token ids in \[0, 5\)"),
    (lambda: categorical_token_log_probs(_LG, torch.zeros(2, 4, dtype=torch.long)), r"x must have shape \(2, 3\)"),
    (lambda: categorical_token_log_probs(torch.zeros(5), torch.tensor(0)), r"logits must have shape \[..., T, V\]"),
    (lambda: categorical_token_log_probs(_LG.long(), torch.zeros(2, 3)), "logits must have a floating-point"),
    (lambda: bernoulli_token_log_probs(_LP, torch.full((2, 3), 2)), "x must be bool or hold only 0 and 1"),
    (lambda: bernoulli_token_log_probs(_LP, torch.zeros(3, 2)), r"x must have shape \(2, 3\)"),
])
def test_bad_input_is_a_value_error_naming_the_argument(call, match):
    with pytest.raises(ValueError, match=match):
        call()


def test_padding_is_not_validated_but_real_tokens_are():
    mask = torch.tensor([[True, False, True], [True, True, True]])
    assert torch.isfinite(sequence_k1(_NAN, _LQ, mask)).all()
    with pytest.raises(ValueError, match="log_p contains 1 non-finite"):
        sequence_k1(_NAN, _LQ, torch.ones(2, 3))
