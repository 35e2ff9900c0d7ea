"""Property-based sweep (issue 13): every public function of estimators/ and every reference-model constructor and
sampler, on inputs hypothesis builds from the documented domain (every float dtype, finfo.min/max, subnormals,
huge and tiny magnitudes, empty and all-masked batches, strided views, and some NaN/inf/wrong-type inputs).

Each call has one of three outcomes, and the test fails on anything else:

- a finite result that agrees with a reference computed in 60-digit mpmath from the same (rounded) inputs, within
  the tolerance stated beside it: a few working-precision ulps of the value's condition (|x f'(x)|) and of the
  magnitudes the formula adds, plus one rounding to the returned dtype;
- ``±inf`` where that tolerance interval around the reference reaches beyond the returned dtype's range (so
  ``±inf`` exactly where the whole interval lies beyond it);
- a ValueError whose message names one of the function's arguments.

Never NaN, never another exception type. Deterministic (``derandomize=True``, no example database), 300 examples
per test (``ESTBENCH_HYPOTHESIS_EXAMPLES`` sets another count). Left out, as documented elsewhere: finfo.min and
huge logits in ``rao_blackwell_kl`` (token_kl's, issue 12) and non-finite logits in
``categorical_token_log_probs`` (passed through to positions a mask must exclude). The regression cases for the
issue's findings, and for what this sweep found, are in tests/test_no_silent_nan.py.
"""
from __future__ import annotations

import math
import os
import re
from fractions import Fraction

import mpmath as mp
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import reference_models as rm
from estimators import diagnostics, kl, marginal, sequence

mp.mp.dps = 60
EXAMPLES = int(os.environ.get("ESTBENCH_HYPOTHESIS_EXAMPLES", 300))
SETTINGS = settings(max_examples=EXAMPLES, derandomize=True, database=None, deadline=None,
                    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
DTYPES = [torch.float16, torch.bfloat16, torch.float32, torch.float64]


# --- inputs --------------------------------------------------------------------------------------------------

def specials(dtype: torch.dtype) -> list[float]:
    """The edges of ``dtype``: its extremes, smallest normal and subnormal, and magnitudes around them."""
    f = torch.finfo(dtype)
    edge = [f.max, f.max / 2, f.tiny, f.smallest_normal * f.eps, 1e4, 1e30, 5e9, 88.0, 89.0, 710.0, 1e-30, 0.0]
    return [float(torch.tensor(v, dtype=torch.float64).clamp(-f.max, f.max).to(dtype)) * s
            for v in edge for s in (1, -1)]


def scalars(dtype: torch.dtype, low: float = -40.0, high: float = 5.0) -> st.SearchStrategy[float]:
    """Typical values in [low, high] (log-probs by default), the dtype's edges, or anything finite in it."""
    f = torch.finfo(dtype)
    return st.one_of(st.floats(low, high), st.sampled_from(specials(dtype)),
                     st.floats(-f.max, f.max, allow_nan=False, allow_infinity=False))


@st.composite
def tensors(draw, dtype, shape, elements=None, strided=True):
    """A tensor of ``shape`` in ``dtype`` (each value rounded into its range), sometimes a strided view."""
    size = math.prod(shape)
    values = draw(st.lists(scalars(dtype) if elements is None else elements, min_size=size, max_size=size))
    f = torch.finfo(dtype)
    t = torch.tensor(values, dtype=torch.float64)
    t = t.where(t.isinf(), t.clamp(-f.max, f.max)).to(dtype).reshape(shape)  # finite values stay finite
    if strided and draw(st.booleans()):
        t = torch.stack([t, torch.full_like(t, math.nan)], -1)[..., 0]  # a view whose neighbours are NaN
    return t


def poison(draw, t: torch.Tensor) -> torch.Tensor:
    """Now and then one NaN or ±inf in ``t`` (a copy): the call must then be a ValueError naming it."""
    if t.numel() == 0 or draw(st.integers(0, 9)) > 0:
        return t
    t = t.clone()
    t.view(-1)[draw(st.integers(0, t.numel() - 1))] = draw(st.sampled_from([math.nan, math.inf, -math.inf]))
    return t


# --- outcomes ------------------------------------------------------------------------------------------------

class Rejected(Exception):
    """The call raised a ValueError naming an argument."""


def call(fn, names, *args, **kwargs):
    """``fn(*args, **kwargs)``; a ValueError must name one of ``names`` (then Rejected is raised); NaN never."""
    try:
        out = fn(*args, **kwargs)
    except ValueError as err:
        assert any(re.search(rf"\b{re.escape(n)}\b", str(err)) for n in names), f"{err!r} names none of {names}"
        raise Rejected from err
    values = out if isinstance(out, (tuple, list)) else [out]
    for v in values:
        if isinstance(v, torch.Tensor):
            assert not bool(torch.isnan(v).any()), f"NaN from {fn.__name__}: {v}"
        elif isinstance(v, float):
            assert not math.isnan(v), f"NaN from {fn.__name__}"
    return out


def rejected(fn, names, *args, **kwargs) -> bool:
    try:
        call(fn, names, *args, **kwargs)
    except Rejected:
        return True
    return False


def agree(got: float, ref, dtype: torch.dtype, tol) -> None:
    """``got`` (rounded to ``dtype``) lies within ``tol`` + one rounding (and 4 subnormal steps) of the mpmath
    ``ref``; ±inf counts as lying there where that interval reaches beyond the dtype's range (so it must be ±inf
    where the whole interval does)."""
    f = torch.finfo(dtype)
    ref = mp.mpf(ref)
    bound = mp.mpf(tol) + f.eps * abs(ref) + 4 * f.smallest_normal * f.eps  # a few subnormal steps
    if got == math.inf:
        assert ref + bound >= f.max, (got, ref, bound)
    elif got == -math.inf:
        assert ref - bound <= -f.max, (got, ref, bound)
    else:
        assert math.isfinite(got) and not mp.isinf(ref), (got, ref)
        assert abs(mp.mpf(got) - ref) <= bound, (got, float(ref), float(bound))


def work_eps(dtype: torch.dtype) -> float:
    """The unit roundoff of the working precision: float32 for half inputs."""
    return torch.finfo(torch.promote_types(dtype, torch.float32)).eps


def mp_list(t: torch.Tensor) -> list:
    return [mp.mpf(v) for v in t.double().reshape(-1).tolist()]


def lse(values) -> mp.mpf:
    finite = [v for v in values if not mp.isinf(v)]
    if not finite:
        return mp.mpf("-inf")
    top = max(finite)
    return top + mp.log(mp.fsum(mp.exp(v - top) for v in finite))


# --- per-sample KL estimators --------------------------------------------------------------------------------

def _clamp(v, lo, hi):
    return min(max(v, mp.mpf(lo)), mp.mpf(hi))


#: f(x), |x f'(x)| (input rounding) and the magnitudes the formula adds (evaluation), with x = log r.
PER_SAMPLE = {
    kl.log_ratio: (lambda x: x, lambda x: abs(x), lambda x: abs(x)),
    kl.k1: (lambda x: -x, lambda x: abs(x), lambda x: abs(x)),
    kl.k2: (lambda x: x * x / 2, lambda x: x * x, lambda x: x * x),
    kl.k3: (lambda x: mp.expm1(x) - x, lambda x: abs(x * mp.expm1(x)), lambda x: abs(mp.expm1(x)) + abs(x)),
    kl.reverse_kl: (lambda x: x * mp.exp(x) - mp.expm1(x), lambda x: abs(x * x * mp.exp(x)),
                    lambda x: abs(x * mp.exp(x)) + abs(mp.expm1(x)) + 1),
    kl.verl_low_var_kl: (lambda x: _clamp(mp.exp(_clamp(x, -20, 20)) - _clamp(x, -20, 20) - 1, -10, 10),
                         lambda x: abs(x * mp.expm1(_clamp(x, -20, 20))),
                         lambda x: mp.exp(_clamp(x, -20, 20)) + abs(_clamp(x, -20, 20)) + 1),
    kl.openrlhf_k3: (lambda x: _clamp(mp.expm1(x) - x, -10, 10), lambda x: abs(x * mp.expm1(x)),
                     lambda x: abs(mp.expm1(x)) + abs(x)),
}


@st.composite
def log_prob_pairs(draw, max_size=6):
    dtype = draw(st.sampled_from(DTYPES))
    shape = draw(st.sampled_from([(), (1,), (max_size,), (2, 3), (0,)]))
    log_p, log_q = draw(tensors(dtype, shape)), draw(tensors(dtype, shape))
    return dtype, poison(draw, log_p), poison(draw, log_q)


@pytest.mark.parametrize("fn", list(PER_SAMPLE), ids=lambda f: f.__name__)
@SETTINGS
@given(case=log_prob_pairs())
def test_per_sample_estimators(fn, case):
    """Same shape and dtype as the input; each estimate within 8 working ulps of its condition and of the terms
    its formula adds, plus one rounding to the input dtype."""
    dtype, log_p, log_q = case
    value, cond, scale = PER_SAMPLE[fn]
    try:
        out = call(fn, ["log_p", "log_q"], log_p, log_q)
    except Rejected:
        assert log_p.numel() == 0 or not bool(torch.isfinite(log_p).all() and torch.isfinite(log_q).all())
        return
    assert out.shape == log_p.shape and out.dtype == dtype
    eps = work_eps(dtype)
    for got, p, q in zip(out.double().reshape(-1).tolist(), mp_list(log_p), mp_list(log_q)):
        x = q - p
        agree(got, value(x), dtype, 8 * eps * (cond(x) + scale(x)))


@SETTINGS
@given(dtype=st.sampled_from(DTYPES[2:]), data=st.data())
def test_k3_of_log_ratio(dtype, data):
    """expm1(x) - x within 8 ulps of |x expm1(x)| + |expm1(x)| + |x|, and +inf (never inf - inf) at x = ±inf."""
    x = data.draw(tensors(dtype, (4,), elements=st.one_of(scalars(dtype), st.sampled_from([math.inf, -math.inf]))))
    out = call(kl.k3_of_log_ratio, ["lr"], x)
    for got, v in zip(out.double().tolist(), mp_list(x)):
        if mp.isinf(v):
            assert got == math.inf
        else:
            agree(got, mp.expm1(v) - v, dtype, 8 * work_eps(dtype) * (abs(v * mp.expm1(v)) + abs(mp.expm1(v)) + abs(v)))


def _loo(row):
    out = []
    for i, xi in enumerate(row):
        x = [v for j, v in enumerate(row) if j != i]
        y = [mp.expm1(v) for v in x]
        mx, my = mp.fsum(x) / len(x), mp.fsum(y) / len(y)
        var = mp.fsum((b - my) ** 2 for b in y)
        cov = mp.fsum((a - mx) * (b - my) for a, b in zip(x, y))
        relative = var / mp.fsum(b * b for b in y) if var else 0
        lam = cov / var if relative > 64 * 2.0 ** -52 else 1  # the documented degenerate case: λ = 1
        out.append(lam * mp.expm1(xi) - xi)
    return out


@SETTINGS
@given(case=log_prob_pairs(max_size=5))
def test_k1_control_variate(case):
    """Within (|estimate| + |log r| + 1)(1e-6 + expm1(2δ)) of the 60-digit leave-one-out estimate, δ = 4 working
    ulps of the row's largest |log r| (the rounding of log q - log p, which λ y turns into a factor e^{±δ};
    float64 sums of centred products: accurate, not to the ulp), or ±inf beyond the dtype's range; a log-ratio
    that overflows float64 is a ValueError naming log_p and log_q."""
    dtype, log_p, log_q = case
    try:
        out = call(kl.k1_control_variate, ["log_p", "log_q"], log_p, log_q)
    except Rejected:
        return
    assert out.shape == log_p.shape and out.dtype == dtype
    n = log_p.shape[-1] if log_p.dim() else 1
    x = [q - p for q, p in zip(mp_list(log_q), mp_list(log_p))]
    rows = [x[i:i + n] for i in range(0, len(x), n)]
    for g_row, row in zip(out.double().reshape(-1, n).tolist(), rows):
        refs = [mp.expm1(v) - v for v in row] if len(row) < 3 else _loo(row)
        spread = mp.expm1(8 * work_eps(dtype) * max(abs(v) for v in row))
        for g, r, v in zip(g_row, refs, row):
            agree(g, r, dtype, (abs(r) + abs(v) + 1) * (1e-6 + spread))


# --- sequence estimators -------------------------------------------------------------------------------------

@st.composite
def masks(draw, shape):
    kind = draw(st.sampled_from(["none", "random", "zeros", "ones", "float"]))
    if kind == "none":
        return None
    if kind in ("zeros", "ones"):
        return torch.full(shape, kind == "ones", dtype=torch.bool)
    bits = torch.tensor(draw(st.lists(st.booleans(), min_size=math.prod(shape), max_size=math.prod(shape))))
    bits = bits.reshape(shape)
    return bits.float() if kind == "float" else bits


def masked_junk(draw, t, mask):
    """Padded positions may hold anything, NaN and inf included."""
    if mask is None:
        return t
    junk = torch.tensor(draw(st.sampled_from([math.nan, math.inf, -math.inf, 1e30])), dtype=t.dtype)
    return t.where(mask.bool(), junk)


@st.composite
def sequence_pairs(draw):
    dtype = draw(st.sampled_from(DTYPES))
    shape = (draw(st.integers(1, 3)), draw(st.integers(1, 4)))
    mask = draw(masks(shape))
    log_p, log_q = (masked_junk(draw, draw(tensors(dtype, shape)), mask) for _ in range(2))
    return dtype, log_p, log_q, mask


def kept(shape, mask) -> torch.Tensor:
    """The mask as bools of ``shape`` (all True without one)."""
    return torch.ones(shape, dtype=torch.bool) if mask is None else mask.bool()


def call_masked(fn, names, x, y, mask, event_dims=1):
    """``fn(x, y, mask)`` through :func:`call`, None where rejected; one result per row (``x`` less its last
    ``event_dims`` dimensions), float64 for float64 inputs and float32 otherwise."""
    try:
        out = call(fn, names, x, y, mask)
    except Rejected:
        return None
    assert out.shape == x.shape[:-event_dims] and out.dtype == torch.promote_types(x.dtype, torch.float32)
    return out


SEQUENCE = {
    sequence.sequence_k1: lambda xs: (-mp.fsum(xs), mp.fsum(abs(x) for x in xs)),
    sequence.sequence_k3_per_token: lambda xs: (mp.fsum(mp.expm1(x) - x for x in xs),
                                                mp.fsum(abs(x * mp.expm1(x)) + abs(mp.expm1(x)) + abs(x) for x in xs)),
    sequence.sequence_k3: lambda xs: (mp.expm1(mp.fsum(xs)) - mp.fsum(xs),
                                      (abs(mp.expm1(mp.fsum(xs))) + 1) * mp.fsum(abs(x) for x in xs)
                                      + abs(mp.expm1(mp.fsum(xs)))),
}


@pytest.mark.parametrize("fn", list(SEQUENCE), ids=lambda f: f.__name__)
@SETTINGS
@given(case=sequence_pairs())
def test_sequence_estimators(fn, case):
    """One estimate per row, float64 for float64 inputs and float32 otherwise, within 8·T float64 ulps of the
    terms summed (and, for sequence_k3, of log R's condition) plus one rounding."""
    dtype, log_p, log_q, mask = case
    keep = kept(log_p.shape, mask)
    out = call_masked(fn, ["log_p", "log_q", "mask"], log_p, log_q, mask)
    if out is None:
        assert not bool(torch.isfinite(log_p[keep]).all() and torch.isfinite(log_q[keep]).all())
        return
    out_dtype = out.dtype
    for b, got in enumerate(out.double().tolist()):
        xs = [q - p for q, p, k in zip(mp_list(log_q[b]), mp_list(log_p[b]), keep[b].tolist()) if k]
        ref, scale = SEQUENCE[fn](xs)
        agree(got, ref, out_dtype, 8 * log_p.shape[-1] * 2.0 ** -52 * scale)


def log_sigmoid(x):
    return -mp.log1p(mp.exp(-x))


def bern_kl(a, b):
    return (mp.exp(log_sigmoid(a)) * (log_sigmoid(a) - log_sigmoid(b))
            + mp.exp(log_sigmoid(-a)) * (log_sigmoid(-a) - log_sigmoid(-b)))


@SETTINGS
@given(case=sequence_pairs())
def test_bernoulli_rao_blackwell_kl(case):
    """Within 16 working ulps of Σ(|a| + |b| + 1) (the softplus terms it subtracts) plus one rounding."""
    dtype, a, b, mask = case
    out = call_masked(sequence.bernoulli_rao_blackwell_kl, ["logits_p", "logits_q", "mask"], a, b, mask)
    keep = kept(a.shape, mask)
    for r, got in enumerate([] if out is None else out.double().tolist()):
        pairs = [(x, y) for x, y, k in zip(mp_list(a[r]), mp_list(b[r]), keep[r].tolist()) if k]
        ref = mp.fsum(bern_kl(x, y) for x, y in pairs)
        agree(got, ref, out.dtype, 16 * work_eps(dtype) * mp.fsum(abs(x) + abs(y) + 1 for x, y in pairs))


@st.composite
def logit_cases(draw):
    dtype = draw(st.sampled_from(DTYPES))
    b, t, v = draw(st.integers(1, 2)), draw(st.integers(1, 3)), draw(st.integers(1, 4))
    element = st.one_of(st.floats(-30, 30), st.just(-math.inf))
    a, c = (draw(tensors(dtype, (b, t, v), elements=element, strided=False)) for _ in range(2))
    return dtype, a, c, draw(masks((b, t)))


def cat_kl(a, b):
    la, lb = lse(a), lse(b)
    total = mp.mpf(0)
    for x, y in zip(a, b):
        if mp.isinf(x):
            continue
        if mp.isinf(y):
            return mp.inf
        total += mp.exp(x - la) * ((x - la) - (y - lb))
    return total


@SETTINGS
@given(case=logit_cases())
def test_rao_blackwell_kl(case):
    """Logits in [-30, 30] or -inf (finfo.min masks and huge logits are token_kl's, issue 12); within 1e-5
    (float32) or 1e-12 (float64) of Σ_t (KL_t + 1), or +inf where q is 0 at a token p can draw."""
    dtype, a, b, mask = case
    out = call_masked(sequence.rao_blackwell_kl, ["logits_p", "logits_q", "mask"], a, b, mask, event_dims=2)
    keep = kept(a.shape[:-1], mask)
    rel = 1e-12 if dtype == torch.float64 else 1e-5
    for r, got in enumerate([] if out is None else out.double().tolist()):
        steps = [cat_kl(mp_list(a[r, s]), mp_list(b[r, s])) for s in range(a.shape[1]) if keep[r, s]]
        ref = mp.fsum(steps) if all(not mp.isinf(s) for s in steps) else mp.inf
        agree(got, ref, out.dtype, rel * (mp.fsum(s for s in steps if not mp.isinf(s)) + len(steps)))


@SETTINGS
@given(dtype=st.sampled_from(DTYPES), data=st.data())
def test_token_log_probs(dtype, data):
    """Categorical: logit[x] - logsumexp within 8 working ulps of max|logit| + log V; Bernoulli: -softplus(∓a)
    within 8 working ulps of |a| + 1; float32 for half logits. Tokens out of range are ValueErrors naming x."""
    t, v = data.draw(st.integers(1, 3)), data.draw(st.integers(1, 4))
    logits = data.draw(tensors(dtype, (2, t, v)))
    x = torch.tensor(data.draw(st.lists(st.integers(-1, v), min_size=2 * t, max_size=2 * t))).reshape(2, t)
    out_dtype = torch.promote_types(dtype, torch.float32)
    try:
        out = call(sequence.categorical_token_log_probs, ["logits", "x"], logits, x)
        for (i, j), got in zip([(i, j) for i in range(2) for j in range(t)], out.double().reshape(-1).tolist()):
            row = mp_list(logits[i, j])
            agree(got, row[int(x[i, j])] - lse(row), out_dtype,
                  8 * work_eps(dtype) * (max(abs(r) for r in row) + math.log(v) + 1))
    except Rejected:
        assert bool(((x < 0) | (x >= v)).any())
    bits = x.clamp(0, 1)
    out = call(sequence.bernoulli_token_log_probs, ["logits", "x"], logits[..., 0], bits)
    for a, bit, got in zip(mp_list(logits[..., 0]), bits.reshape(-1).tolist(), out.double().reshape(-1).tolist()):
        ref = log_sigmoid(a if bit else -a)
        agree(got, ref, out_dtype, 8 * work_eps(dtype) * (abs(a) + 1))


# --- marginal-likelihood estimators --------------------------------------------------------------------------

@st.composite
def log_weights(draw, min_k=1, max_k=5):
    dtype = draw(st.sampled_from(DTYPES))
    shape = (draw(st.integers(0, 2)), draw(st.integers(min_k, max_k)))
    element = st.one_of(scalars(dtype), st.just(-math.inf))
    return dtype, draw(tensors(dtype, shape, elements=element))


def lme_tol(row, dtype):
    finite = [abs(v) for v in row if not mp.isinf(v)]
    return 8 * work_eps(dtype) * (max(finite, default=0) + math.log(len(row)) + 1)


@SETTINGS
@given(case=log_weights(), poisoned=st.booleans(), data=st.data())
def test_log_mean_exp_iwae_elbo(case, poisoned, data):
    """log_mean_exp (= iwae) within 8 working ulps of max|log w| + log K, ELBO (a float64 mean) within 8 float64
    ulps of max|log w|, both plus one rounding to log_w's dtype; -inf for rows of only -inf (ELBO: any -inf)."""
    dtype, log_w = case
    log_w = poison(data.draw, log_w) if poisoned else log_w
    try:
        outs = [call(f, ["log_w"], log_w) for f in (marginal.log_mean_exp, marginal.iwae, marginal.elbo)]
    except Rejected:
        assert bool((torch.isnan(log_w) | (log_w == math.inf)).any())
        return
    for r, row in enumerate(log_w):
        w = mp_list(row)
        agree(float(outs[0][r]), lse(w) - mp.log(len(w)), dtype, lme_tol(w, dtype))
        assert float(outs[1][r]) == float(outs[0][r])
        mean = mp.fsum(w) / len(w) if all(not mp.isinf(v) for v in w) else mp.mpf("-inf")
        agree(float(outs[2][r]), mean, dtype, 8 * 2.0 ** -52 * max(abs(v) for v in w if not mp.isinf(v)) if
              not mp.isinf(mean) else 0)


@SETTINGS
@given(case=log_weights(), data=st.data())
def test_effective_sample_size_and_marginal_ratio(case, data):
    """ESS within 16 working ulps relative (× log K + 1), in [1, K] or 0 for a dead row; the ratio exp(lme - log p)
    within the log-mean-exp tolerance in relative terms, +inf beyond range; a log_marginal that enlarges the
    batch is a ValueError naming it."""
    dtype, log_w = case
    ess = call(marginal.effective_sample_size, ["log_w"], log_w)
    log_marginal = data.draw(st.one_of(st.floats(-1e4, 1e4), st.sampled_from([0.0, 1e30, -1e30])))
    try:
        ratio = call(marginal.marginal_ratio, ["log_w", "log_marginal"], log_w, log_marginal)
    except Rejected:
        assert False, "a finite scalar log_marginal always broadcasts"
    for r, row in enumerate(log_w):
        w = mp_list(row)
        top = lse(w)
        if mp.isinf(top):
            assert float(ess[r]) == 0.0
        else:
            e = [mp.exp(v - max(w)) for v in w]  # shifted: 60 digits cannot hold 1e308 + log 2
            ref = mp.fsum(e) ** 2 / mp.fsum(v * v for v in e)
            agree(float(ess[r]), ref, dtype, 16 * work_eps(dtype) * (math.log(len(w)) + 1) * ref)
        lme = lse(w) - mp.log(len(w))
        ref = mp.exp(lme - log_marginal) if not mp.isinf(lme) else mp.mpf(0)
        agree(float(ratio[r]), ref, dtype, 2 * (lme_tol(w, dtype) + abs(log_marginal) * work_eps(dtype)) * ref)
    with pytest.raises(ValueError, match="log_marginal"):
        marginal.marginal_ratio(log_w, torch.zeros(log_w.shape[0] + 2, 1))


@SETTINGS
@given(dtype=st.sampled_from(DTYPES), data=st.data())
def test_log_weights(dtype, data):
    """log p(x, z) - log q(z|x) rounded once to the dtype (±inf beyond its range); log_joint may be -inf."""
    shape = (data.draw(st.integers(0, 3)),)
    joint = poison(data.draw, data.draw(tensors(dtype, shape, elements=st.one_of(scalars(dtype), st.just(-math.inf)))))
    proposal = poison(data.draw, data.draw(tensors(dtype, shape)))
    try:
        out = call(marginal.log_weights, ["log_joint", "log_proposal"], joint, proposal)
    except Rejected:
        return
    for got, j, q in zip(out.double().tolist(), mp_list(joint), mp_list(proposal)):
        agree(got, j - q, dtype, 0)


def jackknife_ref(w, order):
    """By definition, over every leave-one-out (and leave-two-out) subset, in 60 digits; weights the function
    counts as zero (below float64's smallest normal × the largest) are zero here too."""
    top = max(w)
    w = [v if not mp.isinf(v) and mp.exp(v - top) >= mp.mpf(2.0 ** -1022) else mp.mpf("-inf") for v in w]
    k, positive = len(w), sum(not mp.isinf(v) for v in w)

    def lme(vs):
        return lse(vs) - mp.log(len(vs))
    if positive <= order:
        return lme(w)
    loo = mp.fsum(lme(w[:i] + w[i + 1:]) for i in range(k)) / k
    if order == 1:
        return k * lme(w) - (k - 1) * loo
    pairs = [(i, j) for i in range(k) for j in range(i + 1, k)]
    lto = mp.fsum(lme([v for m, v in enumerate(w) if m not in p]) for p in pairs) / len(pairs)
    return mp.mpf(k * k) / 2 * lme(w) - (k - 1) ** 2 * loo + mp.mpf((k - 2) ** 2) / 2 * lto


@pytest.mark.parametrize("order", [1, 2])
@SETTINGS
@given(case=log_weights(min_k=1, max_k=6))
def test_jackknife_log_mean_exp(order, case):
    """Within 64·K² float64 ulps of max|log w| + 1 (the K²-sized coefficients multiply the rounding) of the
    definition, plus one rounding; K ≤ order is a ValueError naming log_w."""
    dtype, log_w = case
    try:
        out = call(marginal.jackknife_log_mean_exp, ["log_w"], log_w, order=order)
    except Rejected:
        assert log_w.shape[-1] <= order
        return
    assert out.shape == log_w.shape[:-1] and out.dtype == dtype
    k = log_w.shape[-1]
    for r, row in enumerate(log_w):
        w = mp_list(row)
        finite = [abs(v) for v in w if not mp.isinf(v)]
        agree(float(out[r]), jackknife_ref(w, order), dtype, 64 * k * k * 2.0 ** -52 * (max(finite, default=0) + 1))


def exact(v) -> mp.mpf:
    """A float or int exactly, in mpmath."""
    q = Fraction(v)
    return mp.mpf(q.numerator) / q.denominator


def numbers(dtype=torch.float64):
    return st.one_of(scalars(dtype, -10, 10), st.sampled_from([math.nan, math.inf, -math.inf, "1", None, True]),
                     st.integers(-3, 10 ** 30))


@SETTINGS
@given(mu=numbers(), mu2=numbers(), k=st.one_of(st.integers(-2, 10 ** 6), st.sampled_from([2.5, True, "3"])),
       mu3=st.one_of(st.none(), numbers()))
def test_delta_method_bias(mu, mu2, k, mu3):
    """Exact to the last float (a 60-digit reference), ±inf beyond the float range, or a ValueError naming the bad
    moment or K."""
    try:
        got = call(marginal.delta_method_bias, ["mu", "mu2", "K", "mu3"], mu, mu2, k, mu3)
    except Rejected:
        return
    m, m2, kk = exact(mu), exact(mu2), int(k)
    ref = -m2 / (2 * kk * m ** 2)
    if mu3 is not None:
        ref += (exact(mu3) / (3 * m ** 3) - 3 * m2 ** 2 / (4 * m ** 4)) / kk ** 2
    agree(got, ref, torch.float64, 0)


@SETTINGS
@given(s=numbers(), k=st.integers(1, 10 ** 6), order=st.sampled_from([1, 2, 3]))
def test_lognormal_moments_and_bias(s, k, order):
    """Moments within 4 ulps × (1 + s²) (s² rounds before expm1) of the 60-digit values, +inf beyond range; the
    bias likewise, ±inf by the dominant term's sign where e^{s²} itself is beyond range."""
    try:
        got = call(marginal.lognormal_moments, ["s"], s)
    except Rejected:
        return
    e = mp.expm1(mp.mpf(float(s)) ** 2)
    tol = 8 * 2.0 ** -52 * (1 + mp.mpf(float(s)) ** 2)
    for g, ref in zip(got, (1, e, e * e * (e + 3))):
        agree(g, ref, torch.float64, tol * abs(ref))
    try:
        bias = call(marginal.lognormal_bias, ["s", "K", "order"], s, k, order)
    except Rejected:
        assert order == 3
        return
    ref = -e / (2 * k) + (e * e * (4 * e + 3) / (12 * k * k) if order == 2 else 0)
    agree(bias, ref, torch.float64, 3 * tol * (abs(e / (2 * k)) + abs(e ** 3 / k ** 2)))


@SETTINGS
@given(dtype=st.sampled_from(DTYPES), n=st.integers(0, 80), tail=st.sampled_from(["right", "both", "left"]),
       data=st.data())
def test_pareto_khat_and_weight_khat(dtype, n, tail, data):
    """A finite k̂, or -inf for a degenerate tail (ties), or a ValueError naming x, tail or log_w."""
    x = poison(data.draw, data.draw(tensors(dtype, (n,))))
    try:
        k = call(diagnostics.pareto_khat, ["x", "tail"], x, tail=tail)
        assert math.isfinite(k) or k == -math.inf
    except Rejected:
        assert n < 20 or tail == "left" or not bool(torch.isfinite(x).all())
    try:
        k = call(marginal.weight_khat, ["log_w"], x)
        assert math.isfinite(k) or k == -math.inf
    except Rejected:
        assert n < 20 or not bool((x < math.inf).all()) or bool((x == -math.inf).all())


# --- reference models ----------------------------------------------------------------------------------------

def params(dtype=torch.float64):
    return st.one_of(scalars(dtype, -1e3, 1e3), st.sampled_from([math.nan, math.inf, "a", 1e-200, 1e200, 0.0]))


def normal_logpdf(x, loc, scale):
    return -((x - loc) / scale) ** 2 / 2 - mp.log(scale) - mp.log(2 * mp.pi) / 2


def check_samples(model, n, logpdf, tol):
    """n samples (a ValueError naming n for n < 1) whose log_prob agrees with ``logpdf`` within ``tol(x)``."""
    try:
        x = call(model.sample, ["n"], n, torch.Generator().manual_seed(0))
    except Rejected:
        assert n < 1
        return
    lp = call(model.log_prob, ["x"], x)
    assert x.shape[0] == n and lp.shape == (n,)
    for xi, got in zip(x.tolist(), lp.tolist()):
        agree(got, logpdf(mp.mpf(xi)), torch.float64, tol(mp.mpf(xi)))


SAMPLE_SIZES = st.integers(-1, 20)


def _gaussian_reference(m, s):
    return (lambda x: normal_logpdf(x, m, s),
            lambda x: 8 * 2.0 ** -52 * (((x - m) / s) ** 2 + abs(mp.log(s)) + 2))


def _uniform_reference(lo, hi):
    return (lambda x: -mp.log(hi - lo) if lo <= x <= hi else mp.mpf("-inf"),
            lambda x: 4 * 2.0 ** -52 * (abs(mp.log(hi - lo)) + 1))


#: Two-parameter models: the class, its arguments' names, and (log-density, tolerance) from their values.
TWO_PARAMETERS = {"gaussian": (rm.Gaussian, ["loc", "scale"], _gaussian_reference),
                  "uniform": (rm.Uniform, ["low", "high"], _uniform_reference)}


@pytest.mark.parametrize("name", list(TWO_PARAMETERS))
@SETTINGS
@given(first=params(), second=params(), n=SAMPLE_SIZES)
def test_gaussian_and_uniform(name, first, second, n):
    """A model or a ValueError naming a parameter; its samples' log_prob within the stated tolerance of mpmath's
    (a scale below sqrt(float64's max) keeps loc + scale·N(0, 1) finite even at loc = ±max)."""
    cls, names, reference = TWO_PARAMETERS[name]
    try:
        model = call(cls, names, first, second)
    except Rejected:
        return
    check_samples(model, n, *reference(mp.mpf(float(first)), mp.mpf(float(second))))


@SETTINGS
@given(weights=st.lists(st.one_of(st.floats(1e-300, 1e308), params()), min_size=1, max_size=3), data=st.data())
def test_gaussian_mixture(weights, data):
    k = len(weights)
    locs = data.draw(st.lists(params(), min_size=k, max_size=k))
    scales = data.draw(st.lists(params(), min_size=k, max_size=k))
    try:
        m = call(rm.GaussianMixture, ["weights", "locs", "scales"], weights, locs, scales=scales)
    except Rejected:
        return
    w = [mp.mpf(v) for v in m.weights.tolist()]
    mu, sd = [mp.mpf(float(v)) for v in locs], [mp.mpf(float(v)) for v in scales]

    def logpdf(x):
        return lse([mp.log(wi) + normal_logpdf(x, a, b) if wi > 0 else mp.mpf("-inf") for wi, a, b in zip(w, mu, sd)])
    check_samples(m, data.draw(SAMPLE_SIZES), logpdf,
                  lambda x: 16 * 2.0 ** -52 * (max(((x - a) / b) ** 2 + abs(mp.log(b)) for a, b in zip(mu, sd)) + 4))


@SETTINGS
@given(logits=st.lists(st.one_of(params(), st.just(-math.inf)), min_size=0, max_size=5), n=SAMPLE_SIZES,
       k=st.integers(-1, 6))
def test_categorical_and_top_k(logits, n, k):
    try:
        c = call(rm.Categorical, ["logits"], logits)
    except Rejected:
        return
    raw = mp_list(torch.tensor([float(v) for v in logits], dtype=torch.float64))
    total = lse(raw)
    check_samples(c, n, lambda x: raw[int(x)] - total,
                  lambda x: 8 * 2.0 ** -52 * (max(abs(v) for v in raw if not mp.isinf(v)) + 2))
    try:
        top = call(rm.top_k_logits, ["logits", "k"], c.logits, k)
    except Rejected:
        assert not 1 <= k <= len(logits)
        return
    assert int(torch.isfinite(top).sum()) >= min(k, int(torch.isfinite(c.logits).sum()))


@SETTINGS
@given(vocab=st.one_of(st.integers(-2, 50), st.sampled_from([2.5, True])), exponent=params(),
       noise=params(), seed=st.integers(0, 2 ** 32))
def test_zipf_logits(vocab, exponent, noise, seed):
    try:
        out = call(rm.zipf_logits, ["vocab_size", "exponent", "noise"], vocab, exponent, noise,
                   torch.Generator().manual_seed(seed))
    except Rejected:
        return
    assert out.shape == (vocab,) and bool(torch.isfinite(out).all())


@SETTINGS
@given(sizes=st.lists(st.one_of(st.integers(-1, 4), st.sampled_from([2.5, True])), min_size=3, max_size=3),
       n=SAMPLE_SIZES, seed=st.integers(0, 100))
def test_models_with_integer_sizes(sizes, n, seed):
    """HMM, Bayesian network, pPCA and the binary autoregressive models: sizes that are not positive ints are
    ValueErrors naming them; otherwise samples whose log-probabilities are finite and ≤ 0 (discrete models; up to
    rounding where a sequence is certain)."""
    a, b, c = sizes
    builders = [
        (lambda: rm.HiddenMarkovModel.random(a, b, c, seed), ["num_states", "vocab_size", "length"], True),
        (lambda: rm.DiscreteBayesNet.markov_chain(a, b, c, seed), ["length", "card", "order"], True),
        (lambda: rm.FVSBN(a), ["dim"], True),
        (lambda: rm.NADE(a, b), ["dim", "hidden"], True),
    ]
    for build, names, discrete in builders:
        try:
            model = call(build, names)
        except Rejected:
            continue
        try:
            x = call(model.sample, ["n"], n, torch.Generator().manual_seed(seed))
        except Rejected:
            assert n < 1
            continue
        lp = call(model.log_prob, ["x"], x)
        assert lp.shape == (n,) and bool(torch.isfinite(lp).all()) and (not discrete or bool((lp <= 1e-12).all()))
    try:
        pca = call(rm.LinearGaussian.random, ["d", "k", "sigma"], a, b, 0.5, seed)
    except Rejected:
        return
    try:
        x, z = call(pca.sample, ["n"], n, torch.Generator().manual_seed(seed))
    except Rejected:
        assert n < 1
        return
    assert bool(torch.isfinite(call(pca.log_marginal, ["x"], x)).all())
