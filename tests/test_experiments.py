"""The course notes' experiments (reports.experiments): forward/reverse KL fits, autoregressive hypothesis
spaces, entropy in bits. One run_all per module; every check reads its results."""
from __future__ import annotations

import math

import numpy as np
import pytest

from reference_models import Gaussian, exact_kl
from reports.experiments import (autoregressive_hypothesis_spaces, code_length_table, entropy_table,
                                 fit_gaussian_to_bimodal, plot_bimodal_fits, plot_hypothesis_spaces, run_all)


@pytest.fixture(scope="module")
def results():
    return run_all()


# --- 1. forward vs reverse KL --------------------------------------------------------------------------------

def test_forward_fit_is_moment_matching(results):
    fit, mm = results["bimodal"]["forward"], results["bimodal"]["moment_matching"]
    assert mm["mu"] == pytest.approx(0.0, abs=1e-12) and mm["sigma2"] == pytest.approx(4.25, rel=1e-12)
    assert fit["success"]
    assert abs(fit["mu"]) < 1e-3
    assert fit["sigma2"] == pytest.approx(4.25, rel=1e-3)


def test_reverse_fit_seeks_one_mode(results):
    fit = results["bimodal"]["reverse"]
    assert fit["success"]
    assert abs(abs(fit["mu"]) - 2.0) < 0.05
    assert abs(fit["sigma"] - 0.5) < 0.05
    assert fit["kl"] is fit["kl_qp"]
    assert fit["kl_qp"].value == pytest.approx(math.log(2), abs=0.01)


def test_each_fit_wins_its_own_direction(results):
    fwd, rev = results["bimodal"]["forward"], results["bimodal"]["reverse"]
    assert fwd["kl_pq"].value <= rev["kl_pq"].value
    assert rev["kl_qp"].value <= fwd["kl_qp"].value
    for fit in (fwd, rev):
        for truth in (fit["kl_pq"], fit["kl_qp"]):
            assert truth.method == "quadrature" and truth.finite and truth.error_bound < 1e-8
    table = results["bimodal"]["table"]
    assert list(table["fit"]) == ["forward KL(p‖q): mode covering", "reverse KL(q‖p): mode seeking"]


def test_fit_rejects_a_non_mixture():
    with pytest.raises(ValueError, match="mixture"):
        fit_gaussian_to_bimodal(Gaussian(0.0, 1.0))


# --- 2. autoregressive hypothesis spaces -----------------------------------------------------------------------

def test_reverse_order_single_gaussian_is_moment_matching(results):
    ar = results["ar"]
    assert ar["z1"].shape == ar["z2"].shape == (20000,)
    assert abs(ar["a"] - 0.5) < 0.02
    assert ar["b_exact"] == pytest.approx(math.sqrt(0.26), rel=1e-12)
    assert abs(ar["b"] - ar["b_exact"]) < 0.01
    assert ar["a"] == pytest.approx(float(np.mean(ar["z2"])), rel=1e-12)
    assert ar["b"] == pytest.approx(float(np.std(ar["z2"])), rel=1e-12)


def test_bimodal_marginal_beats_single_gaussian(results):
    ar = results["ar"]
    assert ar["loglik_gap"] > 0.5
    assert ar["loglik_gap"] == pytest.approx(ar["loglik_bimodal"] - ar["loglik_gaussian"])
    # the population gap is KL(p(z2) ‖ N(0.5, 0.26)); the sample gap estimates it
    assert ar["gap_exact"].method == "quadrature"
    assert ar["gap_exact"].value == pytest.approx(exact_kl(ar["marginal"], Gaussian(0.5, math.sqrt(0.26))).value)
    assert abs(ar["loglik_gap"] - ar["gap_exact"].value) < 0.05


def test_ar_same_seed_same_numbers():
    a, b = autoregressive_hypothesis_spaces(n=500, seed=3), autoregressive_hypothesis_spaces(n=500, seed=3)
    c = autoregressive_hypothesis_spaces(n=500, seed=4)
    assert np.array_equal(a["z2"], b["z2"]) and a["loglik_gap"] == b["loglik_gap"]
    assert not np.array_equal(a["z2"], c["z2"])
    with pytest.raises(ValueError, match="n"):
        autoregressive_hypothesis_spaces(n=0)


# --- 3. entropy in bits ------------------------------------------------------------------------------------------

def test_entropy_table_in_bits(results):
    table = results["entropy"]["table"].set_index("quantity")["bits"]
    assert abs(table["entropy H(p)"] - 1.5) < 1e-12
    assert abs(table["cross-entropy H(p, q)"] - 1.75) < 1e-12
    assert abs(table["KL(p‖q)"] - 0.25) < 1e-12
    p, q = np.array([0.5, 0.25, 0.25]), np.array([0.25, 0.5, 0.25])
    assert abs(table["cross-entropy H(p, q)"] - float(-(p * np.log2(q)).sum())) < 1e-12
    assert entropy_table().equals(results["entropy"]["table"])


def test_code_lengths(results):
    codes = results["entropy"]["code_lengths"]
    assert codes.equals(code_length_table())
    assert list(codes["−log₂ p(x) [bits]"]) == [1.0, 2.0, 2.0]
    assert list(codes["−log₂ q(x) [bits]"]) == [2.0, 1.0, 2.0]
    assert list(codes["code for p"]) == ["0", "10", "11"]
    assert list(codes["code for q"]) == ["10", "0", "11"]


# --- figures --------------------------------------------------------------------------------------------------------

def test_both_figures_are_pngs(results, tmp_path):
    for plot, key, name in ((plot_bimodal_fits, "bimodal", "bimodal_fits.png"),
                            (plot_hypothesis_spaces, "ar", "ar_hypothesis_spaces.png")):
        path = plot(results[key], tmp_path / name)
        assert path.name == name and path.is_file() and path.stat().st_size > 0
        assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
