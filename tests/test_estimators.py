"""Unit and statistical tests of the per-sample KL estimators (estimators.kl) and the Pareto k̂ diagnostic.

Every statistical assertion uses a fixed seed and states its false-alarm probability, i.e. the
probability that a *correct* implementation would fail it with a fresh seed.
"""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from estimators import kl
from estimators.diagnostics import pareto_khat

LOG2 = math.log(2.0)

ESTIMATORS = [kl.k1, kl.k2, kl.k3, kl.reverse_kl, kl.verl_low_var_kl, kl.openrlhf_k3, kl.k1_control_variate]
ALL_FUNCTIONS = [kl.log_ratio, *ESTIMATORS]


def _ids(fns):
    return [f.__name__ for f in fns]


def _pair(log_r, dtype=torch.float64):
    """(log_p, log_q) with log_p = 0, so that log r = log_q exactly."""
    log_q = torch.as_tensor(log_r, dtype=dtype)
    return torch.zeros_like(log_q), log_q


# --- hand-computed values --------------------------------------------------------------------------

# log_p = 0, log_q = log 2 (r = 2) and log_q = -log 2 (r = 1/2).
HAND_VALUES = {
    kl.k1: (-LOG2, LOG2),
    kl.k2: (LOG2 ** 2 / 2, LOG2 ** 2 / 2),
    kl.k3: (1 - LOG2, -0.5 + LOG2),
    kl.reverse_kl: (2 * LOG2 - 1, 0.5 - 0.5 * LOG2),  # r log r - (r - 1)
    kl.verl_low_var_kl: (1 - LOG2, -0.5 + LOG2),  # no clamp is active here
    kl.openrlhf_k3: (1 - LOG2, -0.5 + LOG2),
    kl.k1_control_variate: (1 - LOG2, -0.5 + LOG2),  # one sample: falls back to k3
}


@pytest.mark.parametrize("fn", list(HAND_VALUES), ids=_ids(HAND_VALUES))
def test_hand_computed_values(fn):
    at_two, at_half = HAND_VALUES[fn]
    for log_r, expected in ((LOG2, at_two), (-LOG2, at_half)):
        log_p, log_q = _pair([log_r])
        got = fn(log_p, log_q)
        assert got.item() == pytest.approx(expected, rel=1e-14, abs=1e-15)


def test_k1_of_general_inputs_is_log_p_minus_log_q():
    log_p = torch.tensor([-1.5, -0.25, -7.0], dtype=torch.float64)
    log_q = torch.tensor([-2.0, -0.75, -3.0], dtype=torch.float64)
    torch.testing.assert_close(kl.k1(log_p, log_q), log_p - log_q, rtol=0, atol=0)
    torch.testing.assert_close(kl.log_ratio(log_p, log_q), log_q - log_p, rtol=0, atol=0)
    torch.testing.assert_close(kl.k2(log_p, log_q), (log_q - log_p) ** 2 / 2, rtol=1e-15, atol=0)


def test_k1_control_variate_hand_computed_three_samples():
    # log r = [0, log 2, log 3], so r - 1 = [0, 1, 2]. Leave-one-out regression slopes by hand:
    # without sample 0: λ = log(3/2); without 1: λ = log(3)/2; without 2: λ = log 2.
    log_p, log_q = _pair([0.0, LOG2, math.log(3.0)])
    expected = [0.0, math.log(3.0) / 2 * 1 - LOG2, LOG2 * 2 - math.log(3.0)]
    got = kl.k1_control_variate(log_p, log_q)
    np.testing.assert_allclose(got.numpy(), expected, rtol=1e-13, atol=1e-15)


# --- shapes and dtypes -----------------------------------------------------------------------------

@pytest.mark.parametrize("shape", [(7,), (3, 5), (2, 3, 4)], ids=str)
@pytest.mark.parametrize("fn", ESTIMATORS, ids=_ids(ESTIMATORS))
def test_output_shape_equals_input_shape(fn, shape):
    g = torch.Generator().manual_seed(11)
    log_p = -torch.rand(shape, generator=g, dtype=torch.float64) * 3
    log_q = -torch.rand(shape, generator=g, dtype=torch.float64) * 3
    out = fn(log_p, log_q)
    assert out.shape == torch.Size(shape)
    assert bool(torch.isfinite(out).all())


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32, torch.float64], ids=str)
@pytest.mark.parametrize("fn", ESTIMATORS, ids=_ids(ESTIMATORS))
def test_dtype_preserved(fn, dtype):
    g = torch.Generator().manual_seed(12)
    log_p = (-torch.rand(3, 5, generator=g, dtype=torch.float64) * 3).to(dtype)
    log_q = (-torch.rand(3, 5, generator=g, dtype=torch.float64) * 3).to(dtype)
    out = fn(log_p, log_q)
    assert out.dtype == dtype
    assert out.shape == log_p.shape
    assert bool(torch.isfinite(out).all())
    # and the low-precision result agrees with the float64 one computed from the same rounded inputs
    ref = fn(log_p.double(), log_q.double())
    tol = {torch.float16: 2e-2, torch.bfloat16: 5e-2, torch.float32: 1e-5, torch.float64: 1e-13}[dtype]
    torch.testing.assert_close(out.double(), ref, rtol=tol, atol=tol)


# --- non-negativity and accuracy -------------------------------------------------------------------

_LOGP = st.floats(min_value=-30.0, max_value=30.0, allow_nan=False, allow_infinity=False)


@settings(max_examples=300, deadline=None, derandomize=True, database=None)
@given(st.lists(st.tuples(_LOGP, _LOGP), min_size=1, max_size=32))
def test_k3_and_reverse_kl_never_negative(pairs):
    log_p = torch.tensor([a for a, _ in pairs], dtype=torch.float64)
    log_q = torch.tensor([b for _, b in pairs], dtype=torch.float64)
    assert bool((kl.k3(log_p, log_q) >= 0).all())
    assert bool((kl.reverse_kl(log_p, log_q) >= 0).all())


def test_k3_and_reverse_kl_never_negative_near_zero_log_ratio():
    # where rounding could bite: |log r| from 1e-20 to 60, both signs (a deterministic sweep)
    mag = torch.logspace(-20, math.log10(60.0), 20001, dtype=torch.float64)
    log_r = torch.cat([mag, -mag, torch.zeros(1, dtype=torch.float64)])
    log_p, log_q = _pair(log_r)
    assert bool((kl.k3(log_p, log_q) >= 0).all())
    assert bool((kl.reverse_kl(log_p, log_q) >= 0).all())


@pytest.mark.parametrize("log_r", [1e-8, -1e-8, 1e-5, -3e-7])
def test_k3_accurate_when_p_close_to_q(log_r):
    # k3 = expm1(x) - x = x²/2 + x³/6 + x⁴/24 + ...; with exp(x) - 1 instead of expm1 the
    # relative error at x = 1e-8 would be ~1e-16 / 5e-17 = O(1).
    log_p, log_q = _pair([log_r])
    exact = log_r ** 2 / 2 + log_r ** 3 / 6 + log_r ** 4 / 24
    got = kl.k3(log_p, log_q).item()
    assert abs(got - exact) / exact < 1e-6
    # reverse KL: r log r - (r - 1) = x²/2 + x³/3 + x⁴/8 + ...; computed as e^x·x - expm1(x) it loses
    # ≈ 2ε/|x| ≤ 5e-8 relative to cancellation, well inside 1e-5.
    rev = kl.reverse_kl(log_p, log_q).item()
    exact_rev = log_r ** 2 / 2 + log_r ** 3 / 3 + log_r ** 4 / 8
    assert rev == pytest.approx(exact_rev, rel=1e-5)


def test_k3_at_1e_minus_8_is_5e_minus_17():
    log_p, log_q = _pair([1e-8])
    assert kl.k3(log_p, log_q).item() == pytest.approx(5e-17, rel=1e-6)


# --- production clamps -----------------------------------------------------------------------------

def test_verl_clamps_log_ratio_and_result():
    # log r = ±30 is clamped to ±20 before exp; exp(20) - 21 ≈ 4.85e8 and exp(-20) + 19 ≈ 19 are then
    # clamped to 10. Unclamped k3 is 29 and 1.07e13.
    log_p, log_q = _pair([-30.0, 30.0, -20.0, 5.0, -5.0])
    got = kl.verl_low_var_kl(log_p, log_q)
    expected = [10.0, 10.0, 10.0, 10.0, math.exp(-5.0) + 5.0 - 1.0]
    np.testing.assert_allclose(got.numpy(), expected, rtol=1e-14)
    assert kl.k3(log_p, log_q)[0].item() == pytest.approx(29.0, rel=1e-12)


def test_verl_clamps_log_ratio_before_exp(monkeypatch):
    # The result clamp hides the log-ratio clamp in the output (both saturate at 10), so spy on the
    # argument that reaches torch.expm1 (its k3 is expm1(lr) - lr): it must lie in [-20, 20].
    seen = []
    real_expm1 = torch.expm1

    def spy(t, *args, **kwargs):
        seen.append(t.detach().clone())
        return real_expm1(t, *args, **kwargs)

    monkeypatch.setattr(torch, "expm1", spy)
    log_p, log_q = _pair([-30.0, 30.0, -60.0, 60.0, 2.0])
    got = kl.verl_low_var_kl(log_p, log_q)
    monkeypatch.undo()
    assert seen, "verl_low_var_kl no longer calls torch.expm1"
    args = torch.cat([a.reshape(-1) for a in seen])
    assert args.tolist() == [-20.0, 20.0, -20.0, 20.0, 2.0]
    np.testing.assert_allclose(got.numpy(), [10.0, 10.0, 10.0, 10.0, math.exp(2.0) - 3.0], rtol=1e-14)
    # no overflow to inf/NaN in any float dtype: the clamps give exactly 10
    for dtype in (torch.float16, torch.bfloat16, torch.float32, torch.float64):
        out = kl.verl_low_var_kl(*_pair([-30.0, 30.0, 60.0, -60.0], dtype=dtype))
        assert out.tolist() == [10.0, 10.0, 10.0, 10.0], dtype


def test_openrlhf_clamps_result_only():
    log_p, log_q = _pair([-30.0, 30.0, -8.0, 2.0, -12.0])
    got = kl.openrlhf_k3(log_p, log_q)
    expected = [10.0, 10.0, math.expm1(-8.0) + 8.0, math.expm1(2.0) - 2.0, 10.0]
    np.testing.assert_allclose(got.numpy(), expected, rtol=1e-14)
    # k3 itself is not clamped
    np.testing.assert_allclose(kl.k3(log_p, log_q)[:2].numpy(), [math.expm1(-30.0) + 30.0, math.expm1(30.0) - 30.0],
                               rtol=1e-14)


def test_clamped_estimators_never_exceed_ten():
    g = torch.Generator().manual_seed(5)
    log_p = torch.zeros(1000, dtype=torch.float64)
    log_q = 40 * torch.rand(1000, generator=g, dtype=torch.float64) - 20
    for fn in (kl.verl_low_var_kl, kl.openrlhf_k3):
        out = fn(log_p, log_q)
        assert bool((out <= 10).all()) and bool((out >= 0).all())
        mask = kl.k3(log_p, log_q) <= 10
        torch.testing.assert_close(out[mask], kl.k3(log_p, log_q)[mask], rtol=1e-12, atol=1e-12)


# --- k1 with a leave-one-out control variate --------------------------------------------------------

def _brute_force_loo(log_r: np.ndarray) -> np.ndarray:
    """-log r_i + λ_{-i} (r_i - 1) with λ_{-i} = Σ(x-x̄)(y-ȳ) / Σ(y-ȳ)² over the other samples of the row."""
    out = np.empty_like(log_r)
    for row in range(log_r.shape[0]):
        for i in range(log_r.shape[1]):
            x = np.delete(log_r[row], i)
            y = np.expm1(x)
            cov = np.sum((x - x.mean()) * (y - y.mean()))
            var = np.sum((y - y.mean()) ** 2)
            lam = cov / var if var > 0 else 1.0
            out[row, i] = lam * np.expm1(log_r[row, i]) - log_r[row, i]
    return out


def test_k1_control_variate_matches_brute_force_leave_one_out():
    g = torch.Generator().manual_seed(7)
    log_p = -torch.rand(2, 6, generator=g, dtype=torch.float64) * 2
    log_q = -torch.rand(2, 6, generator=g, dtype=torch.float64) * 2
    got = kl.k1_control_variate(log_p, log_q)
    expected = _brute_force_loo((log_q - log_p).numpy())
    np.testing.assert_allclose(got.numpy(), expected, rtol=1e-10, atol=1e-12)


def test_k1_control_variate_falls_back_to_k3_where_the_other_ratios_are_all_equal():
    """Row 0: every r equal (λ = 1 for all). Row 1: all but the last equal, so only the last sample's
    others are degenerate; the brute-force λ of the others is a finite regression slope."""
    log_r = torch.tensor([[0.3] * 5, [0.3] * 4 + [2.0]], dtype=torch.float64)
    got = kl.k1_control_variate(torch.zeros_like(log_r), log_r)
    k3 = kl.k3(torch.zeros_like(log_r), log_r)
    torch.testing.assert_close(got[0], k3[0], rtol=1e-15, atol=0)
    assert float(got[1, -1]) == pytest.approx(float(k3[1, -1]), rel=1e-15)
    np.testing.assert_allclose(got[1, :-1].numpy(), _brute_force_loo(log_r.numpy())[1, :-1], rtol=1e-9)
    assert bool(torch.isfinite(got).all())


@pytest.mark.parametrize("scale", [1e-6, 1.0, 30.0])
def test_k1_control_variate_is_accurate_at_every_scale(scale):
    """Against the brute force over 200 samples: log-ratios of 1e-6 (p ≈ q: centring avoids the cancellation
    of raw sums) up to 30 (r ≈ 1e13, one sample dominating the sums)."""
    g = torch.Generator().manual_seed(3)
    log_r = scale * torch.randn(3, 200, generator=g, dtype=torch.float64)
    got = kl.k1_control_variate(torch.zeros_like(log_r), log_r)
    expected = _brute_force_loo(log_r.numpy())
    np.testing.assert_allclose(got.numpy(), expected, rtol=1e-7, atol=1e-7 * np.abs(expected).max())


def test_k1_control_variate_where_one_ratio_dominates_its_row():
    """One log-ratio of 60 beside one of 30 (y_max² · eps ≫ the others' Σy²), and one of -700 (r ≈ 0, x
    dominant): subtracting the dominant sample from the row's sums would leave rounding noise; the leave-one-out
    λ must still match the brute force, entry by entry."""
    g = torch.Generator().manual_seed(4)
    log_r = torch.randn(2, 50, generator=g, dtype=torch.float64)
    log_r[0, 7], log_r[0, 20], log_r[1, 3] = 60.0, 30.0, -700.0
    got = kl.k1_control_variate(torch.zeros_like(log_r), log_r).numpy()
    expected = _brute_force_loo(log_r.numpy())
    np.testing.assert_allclose(got, expected, rtol=1e-9, atol=1e-9)


_OK = torch.zeros(4)


@pytest.mark.parametrize(("log_p", "log_q", "match"), [
    (torch.tensor([0.0, math.nan, 0.0, 0.0]), _OK, r"log_p contains 1 non-finite \(NaN\)"),
    (_OK, torch.tensor([0.0, math.inf, -math.inf, 0.0]), r"log_q contains 2 non-finite \(infinite\)"),
    (_OK, torch.tensor([0.0, -math.inf, 0.0, 0.0]), r"log_q contains 1 non-finite \(infinite\)"),
    (_OK, torch.zeros(5), "same shape"),
    (_OK, torch.zeros(4, dtype=torch.float64), "same dtype"),
    (torch.zeros(0), torch.zeros(0), "log_p is empty"),
    ([0.0], _OK, "log_p must be a torch.Tensor"),
    (_OK, torch.zeros(4, dtype=torch.int64), "log_q must have a floating-point dtype"),
], ids=["nan", "+inf-and--inf", "-inf", "shape", "dtype", "empty", "list", "int"])
@pytest.mark.parametrize("fn", ESTIMATORS, ids=_ids(ESTIMATORS))
def test_bad_log_probs_raise_naming_the_argument(fn, log_p, log_q, match):
    with pytest.raises(ValueError, match=match):
        fn(log_p, log_q)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_finite_inputs_whose_sum_overflows_are_accepted(dtype):
    """The finiteness check reads a sum first; a sum that overflows on finite inputs must not be an error."""
    big = torch.full((8,), torch.finfo(dtype).max / 2, dtype=dtype)
    assert not bool(torch.isfinite(big.sum()))
    out = kl.k1(-big, -big)
    assert bool((out == 0).all())


@pytest.mark.parametrize(("make", "kwargs", "match"), [
    (lambda: torch.randn(19), {}, "20"),
    (lambda: torch.tensor([1.0] * 30 + [math.nan]), {}, "non-finite"),
    (lambda: torch.tensor([1.0] * 30 + [math.inf]), {}, "non-finite"),
    (lambda: torch.tensor([1.0] * 30 + [-math.inf]), {}, "non-finite"),
    (lambda: torch.randn(100), {"tail": "x"}, "tail"),
    (lambda: [1.0] * 100, {}, "x must be a torch.Tensor"),
], ids=["fewer-than-20", "nan", "+inf", "-inf", "tail-x", "list"])
def test_pareto_khat_bad_input(make, kwargs, match):
    with pytest.raises(ValueError, match=match):
        pareto_khat(make(), **kwargs)
