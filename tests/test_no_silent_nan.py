"""Issue 13's findings as explicit regression cases: each input below gave NaN, a wrong number or an unhelpful
exception on main before the fix. The property-based sweep over the same functions is tests/test_properties.py."""
from __future__ import annotations

import math
from fractions import Fraction

import mpmath as mp
import numpy as np
import pytest
import torch

from estimators import kl, marginal, sequence
from estimators.diagnostics import pareto_khat
import reference_models as rm

mp.mp.dps = 60


def _pair(log_r, dtype):
    log_q = torch.as_tensor(log_r, dtype=dtype)
    return torch.zeros_like(log_q), log_q


# --- 2. reverse_kl and k1_control_variate beyond exp's range ------------------------------------------------

@pytest.mark.parametrize(("dtype", "log_r", "finite"), [
    (torch.float32, 84.0, True), (torch.float32, 88.0, False), (torch.float32, 89.0, False),
    (torch.float32, 100.0, False), (torch.float64, 700.0, True), (torch.float64, 709.0, False),
    (torch.float64, 710.0, False), (torch.float64, 1e300, False)])
def test_reverse_kl_is_exact_or_inf_where_r_log_r_overflows(dtype, log_r, finite):
    """r log r - (r - 1) was inf - inf = NaN once exp(log r) overflowed: now the value, or +inf where the
    value itself is beyond the dtype's range."""
    got = float(kl.reverse_kl(*_pair([log_r], dtype))[0])
    x = mp.mpf(log_r)
    exact = mp.exp(x) * (x - 1) + 1
    if finite:
        assert got == pytest.approx(float(exact), rel=4 * torch.finfo(dtype).eps)
    else:
        assert exact > torch.finfo(dtype).max and got == math.inf


def test_reverse_kl_at_r_zero_is_one():
    """log r = -inf (a log-ratio of finite log-probs that overflows) gives r log r - (r - 1) = 1, not 0·inf."""
    big = torch.finfo(torch.float32).max
    assert float(kl.reverse_kl(torch.tensor([big]), torch.tensor([-big]))[0]) == 1.0


def _loo_mp(row):
    """The leave-one-out control-variate estimates in 60-digit arithmetic, by definition."""
    out = []
    for i, xi in enumerate(row):
        x = [mp.mpf(v) for j, v in enumerate(row) if j != i]
        y = [mp.expm1(v) for v in x]
        mx, my = sum(x) / len(x), sum(y) / len(y)
        var = sum((b - my) ** 2 for b in y)
        lam = sum((a - mx) * (b - my) for a, b in zip(x, y)) / var if var > 0 else 1
        out.append(lam * mp.expm1(mp.mpf(xi)) - mp.mpf(xi))
    return out


@pytest.mark.parametrize("row", [
    [710.0, 0.1, -0.3, 0.5, 1.2],               # one ratio beyond exp's range: the other four were NaN
    [800.0, 400.0, -0.3, 0.5, 1.2],
    [1e300, 0.1, 0.2, 0.3],
    [-1e200, 0.1, 0.2, 0.3],
    [800.0, 800.0, 800.0, 0.5],
], ids=["710", "800-400", "1e300", "-1e200", "three-equal-800"])
def test_k1_control_variate_float64_with_a_huge_ratio_matches_60_digits(row):
    x = torch.tensor([row], dtype=torch.float64)
    got = kl.k1_control_variate(torch.zeros_like(x), x)[0].tolist()
    for g, e in zip(got, _loo_mp(row)):
        if abs(e) > torch.finfo(torch.float64).max:
            assert g == (math.inf if e > 0 else -math.inf)
        else:
            assert g == pytest.approx(float(e), rel=1e-12, abs=1e-300)


def test_k1_control_variate_next_to_a_ratio_beyond_every_exp():
    """Found by the property suite: a bfloat16 log-ratio of 3.4e38 beside one of 700 gave NaN for the 700 (its λ
    times e^700 overflowed before the row's scale e^-3.4e38 brought it back); the others' λ is 0 there."""
    log_p = torch.tensor([[0.0, 0.0, -712.0, 0.0, 0.0]], dtype=torch.bfloat16)
    log_q = torch.tensor([[0.0, 0.0, -12.0, 0.0, 3.3895e38]], dtype=torch.bfloat16)
    got = kl.k1_control_variate(log_p, log_q)[0].tolist()
    assert got[:4] == [0.0, 0.0, -700.0, 0.0] and got[4] == math.inf


def test_k1_control_variate_rejects_a_log_ratio_beyond_float64():
    big = torch.tensor([torch.finfo(torch.float64).max, 0.0, 0.0], dtype=torch.float64)
    with pytest.raises(ValueError, match="log_p and log_q"):
        kl.k1_control_variate(-big, big)


# --- 3. sequence_k3 in low precision and near the float32 limit ---------------------------------------------

def test_sequence_k3_near_float32_limit_is_inf_not_nan():
    """log R = 6e38 overflowed float32 to inf, and expm1(inf) - inf was NaN; the true value is beyond range."""
    log_p = torch.full((1, 2), -3e38)
    assert float(sequence.sequence_k3(log_p, torch.zeros(1, 2))[0]) == math.inf
    assert float(sequence.sequence_k1(log_p, torch.zeros(1, 2))[0]) == -math.inf  # -6e38: beyond float32


def test_sequence_k1_sum_is_exact_where_partial_sums_overflow_float32():
    """[3e38, 3e38, -3e38] sums to 3e38, within range, though a float32 running sum overflows."""
    log_q = torch.tensor([[3e38, 3e38, -3e38]])
    assert float(sequence.sequence_k1(torch.zeros(1, 3), log_q)[0]) == pytest.approx(-3e38, rel=1e-7)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("log_r", [0.37, 6.0, 12.0, 40.0])
def test_sequence_k3_half_precision_is_float32_accurate(dtype, log_r):
    """Half inputs are summed and exponentiated in float64 and returned in float32: float16 no longer overflows
    at log R ≈ 11, and bfloat16 no longer loses all digits (99.5% error before)."""
    log_q = torch.tensor([[log_r / 2, log_r / 2]], dtype=dtype)
    got = sequence.sequence_k3(torch.zeros_like(log_q), log_q)
    lr = float(log_q.double().sum())
    assert got.dtype == torch.float32
    assert float(got[0]) == pytest.approx(math.expm1(lr) - lr, rel=2e-7)


# --- 5. crashes and silent broadcasts -------------------------------------------------------------------------

def test_rao_blackwell_kl_with_an_all_zero_mask_is_zero():
    """A fully padded batch: every other sequence estimator returns 0; this one raised 'not enough values'."""
    logits = torch.randn(2, 3, 5, generator=torch.Generator().manual_seed(0))
    got = sequence.rao_blackwell_kl(logits, logits.flip(-1), torch.zeros(2, 3, dtype=torch.bool))
    assert got.tolist() == [0.0, 0.0]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("masked", [False, True])
def test_rao_blackwell_kl_with_finfo_min_masked_logits_equals_minus_inf_masks(dtype, masked):
    """Path 1 through rao_blackwell_kl: logits masked with finfo.min (as Hugging Face does) gave NaN for every row,
    solely because token_kl, which it sums, did; -inf masks were right."""
    logits = torch.randn(2, 3, 5, generator=torch.Generator().manual_seed(0)).to(dtype)
    a, b = logits.clone(), logits.flip(-1).clone()
    a[..., 0] = b[..., 0] = torch.finfo(dtype).min
    mask = torch.ones(2, 3, dtype=torch.bool) if masked else None
    expected = sequence.rao_blackwell_kl(a.masked_fill(a == a[0, 0, 0], -math.inf),
                                         b.masked_fill(b == b[0, 0, 0], -math.inf), mask)
    torch.testing.assert_close(sequence.rao_blackwell_kl(a, b, mask), expected)


@pytest.mark.parametrize("order", [1, 2])
def test_jackknife_on_an_empty_batch_is_empty(order):
    out = marginal.jackknife_log_mean_exp(torch.zeros(0, 5), order=order)
    assert out.shape == (0,) and out.dtype == torch.float32


def test_marginal_ratio_rejects_a_log_marginal_that_enlarges_the_batch():
    """log_marginal [4, 1] against log_w [4, K] silently broadcast to a [4, 4] result."""
    with pytest.raises(ValueError, match="log_marginal"):
        marginal.marginal_ratio(torch.zeros(4, 8), torch.zeros(4, 1))
    assert marginal.marginal_ratio(torch.zeros(4, 8), torch.zeros(4)).shape == (4,)


@pytest.mark.parametrize(("kwargs", "name"), [
    (dict(mu=1.0, mu2=math.inf, K=3), "mu2"), (dict(mu=1.0, mu2=math.nan, K=3), "mu2"),
    (dict(mu=math.inf, mu2=1.0, K=3), "mu"), (dict(mu=math.nan, mu2=1.0, K=3), "mu"),
    (dict(mu=1.0, mu2=1.0, K=3, mu3=math.inf), "mu3"), (dict(mu=1.0, mu2=1.0, K=3, mu3=math.nan), "mu3"),
    (dict(mu=1.0, mu2=1.0, K=True), "K"), (dict(mu="1", mu2=1.0, K=3), "mu"),
], ids=["mu2-inf", "mu2-nan", "mu-inf", "mu-nan", "mu3-inf", "mu3-nan", "K-bool", "mu-str"])
def test_delta_method_bias_rejects_non_finite_moments_naming_them(kwargs, name):
    """These returned -0.0, -inf or NaN."""
    with pytest.raises(ValueError, match=rf"^{name} must"):
        marginal.delta_method_bias(**kwargs)


def test_delta_method_bias_is_exact_for_tiny_mu_and_accepts_numpy_and_tensor_k():
    """mu = 1e-200 divided by zero (mu**2 underflowed); np.int64 and 0-d tensor K were rejected."""
    assert marginal.delta_method_bias(1e-200, 1.0, 3) == -math.inf  # -1/(6e-400): beyond the float range
    assert marginal.delta_method_bias(1e-200, 1e-320, 3) == float(-Fraction(1e-320) / (6 * Fraction(1e-200) ** 2))
    expected = marginal.delta_method_bias(2.0, 3.0, 7, 1.5)
    for k in (np.int64(7), torch.tensor(7)):
        assert marginal.delta_method_bias(2.0, 3.0, k, 1.5) == expected


def test_lognormal_moments_beyond_float_range_are_inf():
    """lognormal_moments(30) raised OverflowError; e^{900} is beyond float64, so the moments are +inf."""
    assert marginal.lognormal_moments(30) == (1.0, math.inf, math.inf)
    assert marginal.lognormal_bias(30, 10, order=1) == -math.inf
    assert marginal.lognormal_bias(30, 10, order=2) == math.inf


def test_effective_sample_size_gradient_on_an_all_minus_inf_row_is_zero():
    log_w = torch.tensor([[-math.inf] * 4, [0.0, 1.0, -math.inf, 2.0]], requires_grad=True)
    ess = marginal.effective_sample_size(log_w)
    ess.sum().backward()
    assert ess[0] == 0 and bool(torch.isfinite(log_w.grad).all()) and log_w.grad[0].abs().sum() == 0


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
def test_effective_sample_size_and_elbo_where_2_log_w_or_the_sum_overflows(dtype):
    """ESS formed 2·lse(log w), which overflows for log w above half the dtype's max (NaN = inf - inf); ELBO's
    float32 sum of log-weights near the max overflowed though their mean is in range."""
    big = torch.finfo(dtype).max
    log_w = torch.tensor([[big * 0.9, big * 0.9], [big * 0.9, 0.0]], dtype=dtype)
    assert marginal.effective_sample_size(log_w).tolist() == [2.0, 1.0]
    assert float(marginal.elbo(log_w[:1])[0]) == float(log_w[0, 0])


def test_elbo_of_float64_log_weights_near_the_max():
    """Found by tests/test_properties.py: the float64 sum overflowed (mean [0, max, max] = inf, not 1.2e308), and
    with a -inf beside it gave inf - inf = NaN."""
    big = torch.finfo(torch.float64).max
    log_w = torch.tensor([[0.0, big, big], [big, big, -math.inf]], dtype=torch.float64)
    assert marginal.elbo(log_w).tolist() == [pytest.approx(big / 3 * 2, rel=1e-15), -math.inf]


def test_marginal_ratio_takes_log_marginal_in_float64():
    """Found by tests/test_properties.py: a float16 log_w rounded log_marginal = 1e30 to inf and rejected it."""
    assert marginal.marginal_ratio(torch.zeros(2, 3, dtype=torch.float16), 1e30).tolist() == [0.0, 0.0]


def test_jackknife_counts_subnormal_weights_as_zero():
    """Found by tests/test_properties.py: a weight e^-744 (a float64 subnormal, 1 significant bit) counted as
    non-zero, and the K²-sized coefficients multiplied its rounding error; it is now zero, as documented."""
    log_w = torch.tensor([[0.0, -744.0, -math.inf]], dtype=torch.float64)
    assert float(marginal.jackknife_log_mean_exp(log_w)[0]) == float(marginal.log_mean_exp(log_w)[0])


def test_bernoulli_estimators_are_float64_accurate_beyond_softplus_threshold():
    """Found by tests/test_properties.py: F.softplus returns x itself above 20, 2e-9 off in float64."""
    a = torch.tensor([[-21.0]], dtype=torch.float64)
    exact = -float(mp.log1p(mp.exp(21)))
    assert float(sequence.bernoulli_token_log_probs(a, torch.ones(1, 1))[0, 0]) == pytest.approx(exact, rel=1e-15)
    a, b = mp.mpf(25), mp.mpf(23)

    def log_sig(x):
        return -mp.log1p(mp.exp(-x))
    exact = mp.exp(log_sig(a)) * (log_sig(a) - log_sig(b)) + mp.exp(log_sig(-a)) * (log_sig(-a) - log_sig(-b))
    got = sequence.bernoulli_rao_blackwell_kl(torch.tensor([[25.0]], dtype=torch.float64),
                                             torch.tensor([[23.0]], dtype=torch.float64))
    assert float(got[0]) == pytest.approx(float(exact), rel=1e-13)


@pytest.mark.parametrize("n", [20, 30, 49])
def test_pareto_khat_below_50_samples_fits_a_tail(n):
    """M = min(n/5, 3√n) < 10 for every n < 50, so any accepted sample below 50 gave -inf."""
    torch.manual_seed(n)
    x = torch.distributions.Pareto(1.0, 2.0).sample((n,))
    assert math.isfinite(pareto_khat(x))


# --- 6. reference-model constructors and log_prob -----------------------------------------------------------

def test_mixture_weights_whose_sum_overflows_are_normalized():
    """[1e308, 1e308] summed to inf and became [0, 0]; the weights are divided by the largest first."""
    m = rm.GaussianMixture([1e308, 1e308], [0.0, 1.0], scales=[1.0, 1.0])
    assert m.weights.tolist() == [0.5, 0.5]
    assert rm.GaussianMixture([2.0, 6.0], [0.0, 1.0], scales=[1.0, 1.0]).weights.tolist() == [0.25, 0.75]


@pytest.mark.parametrize("scale", [1e-200, 1e-160, 1e160])
def test_gaussian_scale_whose_square_is_not_representable_is_rejected(scale):
    """scale 1e-200 was accepted, and exact_kl then died in a Cholesky traceback (its variance is 0)."""
    with pytest.raises(ValueError, match="^scale must be positive"):
        rm.Gaussian(0.0, scale)
    with pytest.raises(ValueError, match="^scales must be positive"):
        rm.GaussianMixture([1.0, 1.0], [0.0, 1.0], scales=[1.0, scale])


def test_gaussian_scale_just_inside_the_range_has_an_exact_kl():
    p, q = rm.Gaussian(0.0, 1e-150), rm.Gaussian(0.0, 2e-150)
    assert rm.exact_kl(p, q).value == pytest.approx(math.log(2) + 1 / 8 - 0.5, rel=1e-12)


@pytest.mark.parametrize(("make", "name"), [
    (lambda: rm.Gaussian("a", 1.0), "loc"),
    (lambda: rm.Gaussian([1.0, 2.0], scale=[1.0, "b"]), "scale"),
    (lambda: rm.Gaussian(0.0, 1.0, dtype=torch.int64), "dtype"),
    (lambda: rm.Uniform(0.0, 1.0, dtype=torch.bool), "dtype"),
    (lambda: rm.Categorical([0.0, 1.0], dtype=torch.int32), "dtype"),
    (lambda: rm.GaussianMixture([1.0, 1.0], [0.0, 1.0], scales=[1.0, 1.0], dtype=torch.complex64), "dtype"),
    (lambda: rm.Gaussian(torch.tensor(1 + 2j), 1.0), "loc"),
], ids=["loc-str", "scale-str", "gaussian-int64", "uniform-bool", "categorical-int32", "mixture-complex",
        "loc-complex"])
def test_constructors_reject_non_real_parameters_and_non_float_dtypes(make, name):
    with pytest.raises(ValueError, match=f"^{name} must"):
        make()


@pytest.mark.parametrize("model", [
    rm.Gaussian(0.0, 1.0), rm.Gaussian([0.0, 0.0], covariance=[[1.0, 0.5], [0.5, 1.0]]),
    rm.GaussianMixture([1.0, 2.0], [0.0, 1.0], scales=[1.0, 0.5]), rm.Uniform(0.0, 1.0)],
    ids=["gaussian", "gaussian-2d", "mixture", "uniform"])
def test_log_prob_of_nan_names_x_and_of_inf_is_minus_inf(model):
    """NaN x gave NaN (Gaussian, mixture) or -inf (Uniform); ±inf x gave NaN for a full-covariance Gaussian."""
    x = model.sample(3, torch.Generator().manual_seed(0))
    bad, far = x.clone(), x.clone()
    bad.view(-1)[-1] = math.nan
    with pytest.raises(ValueError, match="^x contains 1 NaN"):
        model.log_prob(bad)
    far.view(3, -1)[1, 0] = math.inf
    got = model.log_prob(far)
    assert got[1] == -math.inf and bool(torch.isfinite(got[[0, 2]]).all())
    torch.testing.assert_close(got[[0, 2]], model.log_prob(x)[[0, 2]])


def test_log_prob_of_no_samples_is_empty():
    """A 2-D Gaussian's log_prob(zeros(0, 2)) ended in a RuntimeError traceback."""
    for model in (rm.Gaussian([0.0, 0.0], covariance=torch.eye(2)), rm.Gaussian([0.0, 0.0], scale=[1.0, 1.0])):
        out = model.log_prob(torch.zeros(0, 2, dtype=torch.float64))
        assert out.shape == (0,) and out.dtype == torch.float64


@pytest.mark.parametrize(("kwargs", "name"), [
    (dict(vocab_size=-1), "vocab_size"), (dict(vocab_size=0), "vocab_size"), (dict(vocab_size=2.5), "vocab_size"),
    (dict(vocab_size=5, exponent=math.nan), "exponent"), (dict(vocab_size=5, noise=-1.0), "noise"),
    (dict(vocab_size=5, generator=0), "generator")])
def test_zipf_logits_rejects_bad_arguments_by_name(kwargs, name):
    """zipf_logits(-1) ended in a RuntimeError traceback."""
    with pytest.raises(ValueError, match=f"^{name} must"):
        rm.zipf_logits(**kwargs)


def test_mixture_weights_below_float_eps_are_kept():
    """Found by tests/test_properties.py: torch's Categorical(probs=...) clamps probabilities to [eps, 1 - eps], so a
    weight of 1e-300 counted as 2.2e-16 and a point where only that component has mass was 196 nats too likely."""
    m = rm.GaussianMixture([1.0, 1e-300], [0.0, 100.0], scales=[1.0, 1.0])
    x = torch.tensor([100.0], dtype=torch.float64)
    exact = float(mp.log(mp.mpf(1e-300) * mp.npdf(100, 100, 1) + mp.npdf(100, 0, 1)))
    assert float(m.log_prob(x)[0]) == pytest.approx(exact, rel=1e-14)
    assert exact < -600


def test_uniform_width_and_zipf_logits_that_overflow_are_rejected():
    """Found by tests/test_properties.py: U(-1e308, 1e308) has width inf (log_prob -inf, samples inf or NaN), and
    zipf_logits with a huge exponent or noise gave NaN logits."""
    with pytest.raises(ValueError, match="^high - low must be finite"):
        rm.Uniform(-1e308, 1e308)
    with pytest.raises(ValueError, match="exponent"):
        rm.zipf_logits(9, exponent=-1e308, noise=1e308, generator=torch.Generator().manual_seed(0))
    u = rm.Uniform(-5e-324, 0.0)  # a sample can round to high: the support is closed
    assert bool(torch.isfinite(u.log_prob(u.sample(50, torch.Generator().manual_seed(0)))).all())


@pytest.mark.filterwarnings("error::RuntimeWarning")
@pytest.mark.parametrize("largest", [1.5e308, 1e-310])
def test_pareto_khat_is_scale_free_without_overflow(largest):
    """Found by tests/test_properties.py: exceedances near 1e308 (or subnormal ones) overflowed numpy's products
    inside the fit."""
    torch.manual_seed(0)
    x = torch.distributions.Pareto(1.0, 2.0).sample((200,)).double()
    assert pareto_khat(x / x.max() * largest) == pytest.approx(pareto_khat(x), abs=1e-12)
