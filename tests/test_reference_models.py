"""Tests of the ground truth: reference models, exact KL and ratio moments, and the named cases.

Every statistical assertion uses a fixed seed and states its false-alarm probability, i.e. the
probability that a *correct* implementation would fail it with a fresh seed. Monte Carlo z-tests use
the *exact* variance from the case's moments where it is known, so a heavy tail cannot shrink the SE.
"""
from __future__ import annotations

import math

import pytest
import torch
from scipy import integrate, stats
from torch.distributions import kl_divergence

import reference_models as rm
from reference_models import (Categorical, Gaussian, GaussianMixture, Uniform, case_names, exact_kl, get_case,
                              ratio_moments, top_k_logits)

Z = 5.0  # two-sided |z| > 5 under a normal law: probability 5.7e-7
KL = case_names(kind="kl")


def _random_spd(d: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    a = torch.randn(d, d, generator=g, dtype=torch.float64)
    return a @ a.T / d + 0.3 * torch.eye(d, dtype=torch.float64)


# --- exact_kl: uniform pairs ------------------------------------------------------------------------

def test_uniform_pair_closed_form():
    truth = exact_kl(Uniform(0, 1), Uniform(0, 2))
    assert truth.value == math.log(2)
    assert truth.method == "closed form"
    assert truth.finite


def test_uniform_pair_support_mismatch_is_infinite():
    truth = exact_kl(Uniform(0, 2), Uniform(0, 1))
    assert truth.value == math.inf
    assert truth.method == "infinite"
    assert not truth.finite
    assert "support" in truth.note


# --- exact_kl: Gaussian closed form against torch ---------------------------------------------------

def test_gaussian_1d_closed_form_matches_torch():
    p, q = Gaussian(0.3, 1.5), Gaussian(-0.2, 0.7)
    truth = exact_kl(p, q)
    assert truth.method == "closed form"
    assert truth.value == pytest.approx(float(kl_divergence(p.dist, q.dist)), rel=1e-12)
    assert exact_kl(q, p).value == pytest.approx(float(kl_divergence(q.dist, p.dist)), rel=1e-12)


def test_gaussian_diagonal_closed_form_matches_torch():
    p = Gaussian([0.1, -0.4, 2.0, 0.0], scale=[1.0, 0.5, 2.0, 1.3])
    q = Gaussian([0.0, 0.3, 1.0, -1.0], scale=[0.8, 0.9, 1.5, 1.0])
    assert p.event_shape == torch.Size([4])
    assert exact_kl(p, q).value == pytest.approx(float(kl_divergence(p.dist, q.dist)), rel=1e-12)
    assert exact_kl(q, p).value == pytest.approx(float(kl_divergence(q.dist, p.dist)), rel=1e-12)


def test_gaussian_full_covariance_closed_form_matches_torch():
    g = torch.Generator().manual_seed(5)
    p = Gaussian(torch.randn(5, generator=g, dtype=torch.float64), covariance=_random_spd(5, 1))
    q = Gaussian(torch.randn(5, generator=g, dtype=torch.float64), covariance=_random_spd(5, 2))
    for a, b in ((p, q), (q, p)):
        truth = exact_kl(a, b)
        assert truth.method == "closed form"
        assert truth.value == pytest.approx(float(kl_divergence(a.dist, b.dist)), rel=1e-10)
    # a Gaussian against itself
    assert exact_kl(p, p).value == pytest.approx(0.0, abs=1e-12)


# --- 1-D quadrature against the closed form ---------------------------------------------------------

def test_quadrature_matches_closed_form_for_one_component_mixture():
    mix = GaussianMixture([1.0], [0.3], scales=[1.2])
    same = Gaussian(0.3, 1.2)
    q = Gaussian(0.5, 1.0)
    quad = ratio_moments(mix, q).as_dict()
    closed = ratio_moments(same, q).as_dict()
    for name in ("kl", "reverse_kl", "mean_log_r2", "mean_r", "mean_r2"):
        assert quad[name].method == "quadrature", name
        assert closed[name].method == "closed form", name
        assert quad[name].value == pytest.approx(closed[name].value, abs=1e-8), name
        assert 0 <= quad[name].error_bound < 1e-6, name
        assert "error" in quad[name].describe()
    # the other direction: the mixture as q
    quad_q = ratio_moments(q, mix).as_dict()
    closed_q = ratio_moments(q, same).as_dict()
    for name in ("kl", "reverse_kl", "mean_log_r2", "mean_r", "mean_r2"):
        assert quad_q[name].value == pytest.approx(closed_q[name].value, abs=1e-8), name


def test_quadrature_reports_divergent_ratio_variance():
    # q's tail scale 1.5 ≥ √2 × p's 1.0: E_p[r²] = ∞, as in the closed form
    mix = GaussianMixture([1.0], [0.0], scales=[1.0])
    q = Gaussian(0.0, 1.5)
    assert ratio_moments(mix, q).mean_r2.method == "infinite"
    assert ratio_moments(Gaussian(0.0, 1.0), q).mean_r2.method == "infinite"


# --- Schulman's Gaussian shift ------------------------------------------------------------------------

@pytest.mark.parametrize("mu", [0.1, 0.5, 1.0, 2.0])
def test_gaussian_shift_moments(mu):
    m = ratio_moments(Gaussian(0.0, 1.0), Gaussian(mu, 1.0))
    assert m.kl.value == pytest.approx(mu ** 2 / 2, rel=1e-12)
    assert m.reverse_kl.value == pytest.approx(mu ** 2 / 2, rel=1e-12)
    assert m.mean_log_r2.value / 2 - m.kl.value == pytest.approx(mu ** 4 / 8, rel=1e-9)  # k2's exact bias
    assert m.mean_r.value == 1.0
    assert m.mean_r2.value == pytest.approx(math.exp(mu ** 2), rel=1e-12)


# --- categorical enumeration ----------------------------------------------------------------------------

def _logit_pair(vocab: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return (2 * torch.randn(vocab, generator=g, dtype=torch.float64),
            2 * torch.randn(vocab, generator=g, dtype=torch.float64))


def test_categorical_enumeration_matches_torch():
    lp, lq = _logit_pair(1000, 9)
    p, q = Categorical(lp), Categorical(lq)
    truth = exact_kl(p, q)
    assert truth.method == "enumeration"
    assert truth.value == pytest.approx(float(kl_divergence(p.dist, q.dist)), rel=1e-12)
    m = ratio_moments(p, q)
    assert m.reverse_kl.value == pytest.approx(float(kl_divergence(q.dist, p.dist)), rel=1e-12)
    assert m.mean_r.value == pytest.approx(1.0, abs=1e-12)
    assert m.mean_r2.value == pytest.approx(float((q.dist.probs ** 2 / p.dist.probs).sum()), rel=1e-12)


def test_top_k_truncated_p_against_untruncated_q():
    lp, lq = _logit_pair(1000, 10)
    p, q = Categorical(top_k_logits(lp, 50)), Categorical(lq)
    top = torch.topk(lp, 50).indices
    assert int(torch.isfinite(p.logits).sum()) == 50
    m = ratio_moments(p, q)
    assert m.mean_r.value == pytest.approx(float(q.dist.probs[top].sum()), rel=1e-12)
    assert m.mean_r.value < 1
    assert m.kl.finite
    assert m.kl.value == pytest.approx(float(kl_divergence(p.dist, q.dist)), rel=1e-12)
    assert m.reverse_kl.value == math.inf
    assert m.reverse_kl.method == "infinite"


# --- ratio moments against Monte Carlo ------------------------------------------------------------------

def _mc_sample(case, seed: int):
    n = 2 ** 14 if case.p.event_shape.numel() >= 100 else 2 ** 18
    g = torch.Generator().manual_seed(seed)
    x = case.p.sample(n, generator=g)
    return case.q.log_prob(x) - case.p.log_prob(x)


# Family false-alarm rate: one z-test per case for the KL (all 13 cases have a finite E_p[(log r)²])
# plus one per case for E_p[r] (8 cases have E_p[r²] < ∞ and the support condition): 21 tests at
# |z| > 5, Bonferroni ≈ 21 × 5.7e-7 ≈ 1.2e-5. The variances are the exact ones from the moments.
@pytest.mark.parametrize("name", KL)
def test_kl_matches_monte_carlo(name):
    case = get_case(name)
    m = case.moments
    if not m.mean_log_r2.finite:
        pytest.skip("E_p[(log r)²] = ∞: a z-test of -log r means nothing")
    log_r = _mc_sample(case, seed=1000 + KL.index(name))
    assert bool(torch.isfinite(log_r).all())
    var = max(m.mean_log_r2.value - m.kl.value ** 2, 0.0)
    se = math.sqrt(var / log_r.numel())
    # uniform-support has a constant log r (variance 0): allow float64 summation error only
    assert abs(float((-log_r).mean()) - m.kl.value) <= Z * se + 1e-9 * max(1.0, abs(m.kl.value))


@pytest.mark.parametrize("name", KL)
def test_mean_r_matches_monte_carlo(name):
    case = get_case(name)
    m = case.moments
    if not (m.mean_r2.finite and case.support_ok):
        pytest.skip("E_p[r²] = ∞ or q's support is not inside p's")
    log_r = _mc_sample(case, seed=2000 + KL.index(name))
    se = math.sqrt((m.mean_r2.value - m.mean_r.value ** 2) / log_r.numel())
    assert abs(float(torch.exp(log_r).mean()) - 1.0) <= Z * se


def test_mc_family_size_is_as_stated():
    kl_tests = sum(get_case(n).moments.mean_log_r2.finite for n in KL)
    r_tests = sum(get_case(n).moments.mean_r2.finite and get_case(n).support_ok for n in KL)
    assert (kl_tests, r_tests) == (13, 8)


# --- models: sampling and normalization -----------------------------------------------------------------

MODELS = {
    "gauss-1d": lambda: Gaussian(0.5, 2.0),
    "gauss-diag": lambda: Gaussian([0.0, 1.0, -1.0], scale=[1.0, 0.5, 2.0]),
    "gauss-full": lambda: Gaussian([0.0, 1.0, -1.0], covariance=_random_spd(3, 3)),
    "mixture-1d": lambda: GaussianMixture([0.3, 0.7], [-1.0, 2.0], scales=[0.5, 1.5]),
    "mixture-2d": lambda: GaussianMixture([1.0, 2.0], [[0.0, 0.0], [3.0, -1.0]],
                                          covariances=torch.stack([_random_spd(2, 4), _random_spd(2, 5)])),
    "uniform": lambda: Uniform(-1.0, 3.0),
    "categorical": lambda: Categorical(_logit_pair(100, 6)[0]),
    "categorical-top-k": lambda: Categorical(top_k_logits(_logit_pair(100, 6)[0], 10)),
}


@pytest.mark.parametrize("name", list(MODELS))
def test_sample_reproducible_and_shaped(name):
    model = MODELS[name]()
    a = model.sample(257, generator=torch.Generator().manual_seed(42))
    b = model.sample(257, generator=torch.Generator().manual_seed(42))
    c = model.sample(257, generator=torch.Generator().manual_seed(43))
    assert a.shape == torch.Size([257, *model.event_shape])
    assert torch.equal(a, b)
    assert not torch.equal(a, c)
    lp = model.log_prob(a)
    assert lp.shape == torch.Size([257])
    assert bool(torch.isfinite(lp).all())  # samples lie in the support


@pytest.mark.parametrize("model, support", [
    (Gaussian(0.5, 2.0), (-math.inf, math.inf)),
    (GaussianMixture([0.3, 0.7], [-1.0, 2.0], scales=[0.5, 1.5]), (-math.inf, math.inf)),
    (Uniform(-1.0, 3.0), (-1.0, 3.0)),
], ids=["gaussian", "mixture", "uniform"])
def test_log_prob_integrates_to_one(model, support):
    def density(x: float) -> float:
        return math.exp(float(model.log_prob(torch.tensor([x], dtype=torch.float64))))

    value, err = integrate.quad(density, *support, limit=200)
    assert value == pytest.approx(1.0, abs=1e-8)
    assert err < 1e-8


def test_uniform_log_prob_is_minus_inf_outside_support():
    u = Uniform(-1.0, 3.0)
    lp = u.log_prob(torch.tensor([-1.5, 0.0, 3.5], dtype=torch.float64))
    assert lp[0] == -math.inf and lp[2] == -math.inf
    assert lp[1].item() == pytest.approx(-math.log(4.0))


@pytest.mark.parametrize("truncate", [None, 7])
def test_categorical_mass_sums_to_one(truncate):
    logits = _logit_pair(1000, 8)[0]
    cat = Categorical(logits if truncate is None else top_k_logits(logits, truncate))
    total = torch.exp(cat.log_prob(torch.arange(cat.vocab_size))).sum()
    assert float(total) == pytest.approx(1.0, abs=1e-12)


def test_categorical_samples_stay_in_top_k_support():
    cat = Categorical(top_k_logits(_logit_pair(1000, 8)[0], 7))
    x = cat.sample(2 ** 16, generator=torch.Generator().manual_seed(1))
    assert bool(torch.isfinite(cat.log_prob(x)).all())
    assert x.unique().numel() <= 7


def test_mixture_1d_sample_mean_matches_exact():
    w, mu, s = [0.3, 0.7], [-1.0, 2.0], [0.5, 1.5]
    mix = GaussianMixture(w, mu, scales=s)
    mean = sum(wi * mi for wi, mi in zip(w, mu))
    var = sum(wi * (si ** 2 + mi ** 2) for wi, mi, si in zip(w, mu, s)) - mean ** 2
    x = mix.sample(2 ** 16, generator=torch.Generator().manual_seed(17))
    # z-test with the exact variance, all moments finite: false alarm 5.7e-7
    assert abs(float(x.mean()) - mean) < Z * math.sqrt(var / x.numel())
    # the weights too: P(x > 0.5) ≈ 0.3·Φ(-3) + 0.7·Φ(1): binomial z-test, false alarm 5.7e-7
    p_hi = 0.3 * stats.norm.sf(1.5 / 0.5) + 0.7 * stats.norm.sf(-1.5 / 1.5)
    frac = float((x > 0.5).double().mean())
    assert abs(frac - p_hi) < Z * math.sqrt(p_hi * (1 - p_hi) / x.numel())


def test_full_covariance_gaussian_sample_mean_and_covariance():
    loc = torch.tensor([0.0, 1.0, -1.0], dtype=torch.float64)
    cov = _random_spd(3, 3)
    model = Gaussian(loc, covariance=cov)
    mu, sigma = model.mean_and_covariance()
    torch.testing.assert_close(sigma, cov, rtol=1e-12, atol=1e-12)
    x = model.sample(2 ** 16, generator=torch.Generator().manual_seed(18))
    # three coordinate z-tests with the exact variances: false alarm ≈ 3 × 5.7e-7
    se = torch.sqrt(torch.diagonal(cov) / x.shape[0])
    assert bool(((x.mean(0) - loc).abs() < Z * se).all())
    # sample covariance: SE of an entry is ≈ sqrt((Σii Σjj + Σij²)/n) (Gaussian data); six entries at
    # 5 SE, false alarm ≈ 6 × 5.7e-7
    emp = torch.cov(x.T)
    se_cov = torch.sqrt((torch.outer(torch.diagonal(cov), torch.diagonal(cov)) + cov ** 2) / x.shape[0])
    assert bool(((emp - cov).abs() < Z * se_cov).all())


# --- case facts -----------------------------------------------------------------------------------------

def test_heavy_ratio_clamp_probability():
    case = get_case("heavy-ratio")
    sp, sq = float(case.p.scale_tril), float(case.q.scale_tril)
    assert float(case.p.loc) == 0.0 and float(case.q.loc) == 0.0
    # log r(x) = log(σp/σq) - x²/2 (1/σq² - 1/σp²) ≤ log(σp/σq) < 20, so |log r| > 20 iff log r < -20
    assert math.log(sp / sq) < 20
    x2 = 2 * (20 + math.log(sp / sq)) / (1 / sq ** 2 - 1 / sp ** 2)
    prob = 2 * stats.norm.sf(math.sqrt(x2) / sp)
    assert prob > 0.01
    assert prob == pytest.approx(0.04, abs=0.005)  # the description's "≈ 4%"
    log_r = _mc_sample(case, seed=77)
    frac = float((log_r.abs() > 20).double().mean())
    # binomial z-test with n = 2^18 (SE ≈ 3.9e-4): false alarm 5.7e-7
    assert abs(frac - prob) < Z * math.sqrt(prob * (1 - prob) / log_r.numel())
    assert frac > 0.01


def test_gauss_100d_log_densities_are_very_negative():
    case = get_case("gauss-100d-fullcov")
    x = case.p.sample(2 ** 12, generator=torch.Generator().manual_seed(100))
    assert x.shape == (2 ** 12, 100)
    # deterministic: a Gaussian's log-density peaks at its mean, log p(μ) = -½(d log 2π + log|Σ|) < -100
    for model in (case.p, case.q):
        mu, _ = model.mean_and_covariance()
        assert float(model.log_prob(mu[None])) < -100
        assert bool((model.log_prob(x) < -100).all())


RELEASED = {
    "kl": ["gauss-shift-0.1", "gauss-shift-1", "near-identical", "gauss-var-wide-q", "gauss-var-narrow-q",
           "gauss-100d-fullcov", "bimodal-vs-gauss", "gauss-vs-bimodal", "uniform-support", "vocab-50k", "vocab-200k",
           "vocab-50k-top-k", "heavy-ratio"],
    "sequence": ["seq-bn-vs-fvsbn", "seq-bn-vs-made", "seq-nade-vs-fvsbn-digits", "seq-nade-digits-steps",
                 "seq-hmm-vs-transformer", "seq-transformer-steps", "seq-transformer-temperature", "seq-transformer-eos",
                 "seq-transformer-top-k"],
    "marginal": ["lognormal-0.5", "lognormal-1", "lognormal-2", "lognormal-3", "lg-posterior-1.2", "lg-prior",
                 "mixture-prior", "bayesnet-prior"],
}


def test_registry_holds_every_released_name_in_order_after_import():
    """Released names come first, in their order (a test may register more after them)."""
    def released(names):
        return [n for n in names if n in sum(RELEASED.values(), [])]

    assert case_names()[:30] == RELEASED["kl"] + RELEASED["sequence"] + RELEASED["marginal"]
    for kind, names in RELEASED.items():
        assert case_names(kind=kind)[:len(names)] == names
    assert released(case_names(kind=("kl", "sequence"))) == RELEASED["kl"] + RELEASED["sequence"]
    assert released(case_names(kind=("kl", "sequence"), tag="gate")) == RELEASED["kl"] + RELEASED["sequence"]
    assert released(case_names(kind="marginal", tag="gate")) == ["lognormal-0.5", "lognormal-1"]
    assert released(case_names(kind="marginal", tag="report")) == ["lognormal-0.5", "lognormal-1", "lg-posterior-1.2",
                                                                   "mixture-prior", "bayesnet-prior"]


def test_registry_rejects_unknown_names_kinds_and_duplicates():
    with pytest.raises(ValueError, match="unknown case 'nope'; known: gauss-shift-0.1, "):
        get_case("nope")
    with pytest.raises(ValueError, match="unknown case 'gauss-shift-1' of kind marginal; known: lognormal-0.5,"):
        get_case("gauss-shift-1", kind="marginal")
    with pytest.raises(ValueError, match="unknown kind 'nope'"):
        case_names(kind="nope")
    with pytest.raises(ValueError, match="already registered"):
        rm.register_case("gauss-shift-1", lambda: None, kind="kl", description="a second meaning")
    with pytest.raises(ValueError, match="already registered"):  # the decorator form
        rm.register_case("gauss-shift-1", kind="kl", description="a second meaning")(lambda: None)
    with pytest.raises(ValueError, match="kind must be one of"):
        rm.register_case("a-new-case", lambda: None, kind="nope", description="never registered")
    assert "a-new-case" not in case_names()


@pytest.mark.parametrize("name", KL + ["lognormal-1", "mixture-prior"])
def test_cases_follow_the_protocol_and_are_cached(name):
    case = get_case(name)
    assert get_case(name) is case
    assert (case.name, case.kind) == (name, "kl" if name in KL else "marginal")
    assert isinstance(case.description, str) and isinstance(case.tags, tuple)
    assert isinstance(case.truth, rm.Truth) and case.event_numel >= 1
    if case.kind == "kl":
        assert case.truth is case.moments.kl
    sample = case.draw(8, torch.Generator(device=getattr(case, "device", "cpu")).manual_seed(0), torch.float32)
    for t in (sample if case.kind == "kl" else (sample,)):
        assert t.shape == (8,) and t.dtype == torch.float32


def test_kl_draw_is_the_pair_of_log_densities_at_samples_of_p():
    case = get_case("gauss-shift-1")
    sample = case.draw(5, torch.Generator().manual_seed(3))
    x = case.p.sample(5, generator=torch.Generator().manual_seed(3))
    assert isinstance(sample, rm.PairSample)
    assert torch.equal(sample.log_p, case.p.log_prob(x)) and torch.equal(sample.log_q, case.q.log_prob(x))


def test_support_breaking_cases():
    uni = get_case("uniform-support")
    assert "support" in uni.breaks
    assert uni.moments.mean_r.value - 1 == pytest.approx(-0.5, abs=1e-15)  # k3's exact bias
    assert uni.truth.value == pytest.approx(math.log(2))
    top = get_case("vocab-50k-top-k")
    assert "support" in top.breaks
    assert top.moments.mean_r.value < 1
    for name in ("gauss-shift-1", "vocab-50k", "heavy-ratio"):
        assert "support" not in get_case(name).breaks


def test_ratio_variance_breaking_cases():
    wide, narrow = get_case("gauss-var-wide-q"), get_case("gauss-var-narrow-q")
    assert "ratio_variance" in wide.breaks
    assert not wide.ratio_variance_finite
    assert "ratio_variance" not in narrow.breaks
    assert narrow.ratio_variance_finite
    # N(0,2²) ‖ N(0,1): E_p[r²] = σp²/(σq √(2σp² - σq²)) ... closed form: 4/√7
    assert narrow.moments.mean_r2.value == pytest.approx(4 / math.sqrt(7), rel=1e-12)


# --- bad input ------------------------------------------------------------------------------------------

BAD_MODELS = {
    "gaussian-both-scale-and-covariance": (lambda: Gaussian([0.0, 0.0], scale=[1.0, 1.0], covariance=torch.eye(2)),
                                           "exactly one of scale or covariance"),
    "gaussian-neither-scale-nor-covariance": (lambda: Gaussian(0.0), "exactly one of scale or covariance"),
    "gaussian-non-pd-covariance": (lambda: Gaussian([0.0, 0.0], covariance=[[1.0, 2.0], [2.0, 1.0]]),
                                   "positive definite"),
    "gaussian-negative-scale": (lambda: Gaussian(0.0, -1.0), "scale must be positive"),
    "gaussian-zero-scale-in-vector": (lambda: Gaussian([0.0, 0.0], scale=[1.0, 0.0]), "scale must be positive"),
    "gaussian-nan-loc": (lambda: Gaussian(math.nan, 1.0), "loc must be finite"),
    "uniform-low-equals-high": (lambda: Uniform(1.0, 1.0), "low < high"),
    "uniform-low-above-high": (lambda: Uniform(2.0, 1.0), "low < high"),
    "categorical-nan-logits": (lambda: Categorical([0.0, math.nan, 1.0]), "NaN"),
    "categorical-all-minus-inf": (lambda: Categorical([-math.inf, -math.inf]), "positive probability"),
    "mixture-negative-weight": (lambda: GaussianMixture([1.0, -0.5], [0.0, 1.0], scales=[1.0, 1.0]),
                                "weights must be a positive vector"),
}


@pytest.mark.parametrize("name", list(BAD_MODELS))
def test_bad_model_parameters(name):
    make, match = BAD_MODELS[name]
    with pytest.raises(ValueError, match=match):
        make()




# --- the exact methods: dispatch on the pair's types ------------------------------------------------------

def test_truth_dispatch_follows_both_mros_and_falls_back_to_quadrature():
    class Shifted(Gaussian):  # a subclass still gets the Gaussian closed form
        pass

    assert exact_kl(Shifted(0.0, 1.0), Gaussian(1.0, 1.0)).method == "closed form"
    mixed = exact_kl(Gaussian(0.0, 1.0), GaussianMixture([0.5, 0.5], [-1.0, 1.0], scales=[1.0, 1.0]))
    assert mixed.method == "quadrature"  # no method for the pair: the 1-D fallback
    with pytest.raises(ValueError, match="no exact method for the pair Categorical ‖ Uniform"):
        exact_kl(Categorical([0.0, 1.0]), Uniform(0.0, 1.0))
    with pytest.raises(ValueError, match="different vocabulary sizes: 2 and 3"):
        exact_kl(Categorical([0.0, 1.0]), Categorical([0.0, 1.0, 2.0]))
    with pytest.raises(ValueError, match="already registered"):
        rm.register_truth(Gaussian, Gaussian)(lambda p, q: {})
