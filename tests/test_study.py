"""Studies: Schulman's table reproduced, reproducibility from the seed, the frame's contract."""
import math

import pandas as pd
import pytest

from reference_models import get_case
from reports.study import COLUMNS, StudyConfig, run_study

# Schulman, "Approximating KL divergence" (2020): relative std of k1 / k2 / k3, and k2's relative bias.
SCHULMAN = {"gauss-shift-0.1": {"k1": 20, "k2": 1.42, "k3": 1.42, "k2_bias": 0.0025},
            "gauss-shift-1": {"k1": 2, "k2": 1.73, "k3": 1.70, "k2_bias": 0.25}}


@pytest.fixture(scope="module")
def schulman_frame():
    # n = 1: each replicate is one sample, so rsd is the per-sample relative std. With 2^22 samples the
    # relative SE of a std is ≤ 0.7% even for k3's heavy (log-normal) tail at μ = 1: 3% is > 4 SE.
    return run_study(StudyConfig(tuple(SCHULMAN), ("k1", "k2", "k3"), (1,), 2 ** 22, seed=0), progress=False)


@pytest.mark.parametrize("case", SCHULMAN)
@pytest.mark.parametrize("estimator", ["k1", "k2", "k3"])
def test_relative_std_matches_schulman(schulman_frame, case, estimator):
    row = schulman_frame.query("case == @case and estimator == @estimator").iloc[0]
    assert row.rsd == pytest.approx(SCHULMAN[case][estimator], rel=0.03)


@pytest.mark.parametrize("case", SCHULMAN)
def test_k2_relative_bias_matches_schulman_and_theory(schulman_frame, case):
    moments = get_case(case).moments
    exact = (moments.mean_log_r2.value / 2 - moments.kl.value) / moments.kl.value  # μ²/4 for a shift μ
    assert exact == pytest.approx(SCHULMAN[case]["k2_bias"], rel=0.03)
    row = schulman_frame.query("case == @case and estimator == 'k2'").iloc[0]
    assert row.expected == pytest.approx(moments.kl.value * (1 + exact))
    # The measured bias agrees with the exact one: a 5-SE bound, false-alarm rate 6e-7 per case.
    assert abs(row.bias - exact * moments.kl.value) <= 5 * row.bias_se


@pytest.mark.parametrize("case", SCHULMAN)
@pytest.mark.parametrize("estimator", ["k1", "k3"])
def test_unbiased_estimators_are_unbiased(schulman_frame, case, estimator):
    row = schulman_frame.query("case == @case and estimator == @estimator").iloc[0]
    assert abs(row.bias) <= 5 * row.bias_se  # false-alarm rate 6e-7 per cell


def test_same_seed_same_numbers_and_frame_contract():
    config = StudyConfig(("gauss-shift-1", "vocab-50k-top-k"), ("k1", "k3", "k1_cv", "reverse_kl"), (10, 100), 50, 7)
    a, b = run_study(config, progress=False), run_study(config, progress=False)
    pd.testing.assert_frame_equal(a, b)
    assert list(a.columns) == COLUMNS
    assert a.nonfinite.sum() == 0 and a["mean"].map(math.isfinite).all()
    assert any("reverse_kl on vocab-50k-top-k" in s for s in a.attrs["skipped"])
    other = run_study(StudyConfig(config.cases, config.estimators, config.ns, config.replicates, seed=8),
                      progress=False)
    assert not other["mean"].equals(a["mean"])


def test_k3_never_negative_and_k1_often_negative():
    frame = run_study(StudyConfig(("gauss-shift-0.1",), ("k1", "k3"), (100,), 20, 0), progress=False)
    k1, k3 = (frame.query(f"estimator == '{e}'").iloc[0] for e in ("k1", "k3"))
    assert k3.frac_negative == 0 and 0.4 < k1.frac_negative < 0.6


def test_study_config_rejects_bad_input():
    with pytest.raises(ValueError, match="replicates"):
        StudyConfig(("gauss-shift-1",), ("k1",), (10,), 1)
    with pytest.raises(ValueError, match="ns"):
        StudyConfig(("gauss-shift-1",), ("k1",), (0,), 10)
    with pytest.raises(ValueError, match="unknown estimator"):
        StudyConfig(("gauss-shift-1",), ("nope",), (10,), 10)
    with pytest.raises(ValueError, match="unknown case"):
        run_study(StudyConfig(("nope",), ("k1",), (10,), 10), progress=False)


def test_resume_reuses_finished_cells_and_gives_the_same_numbers(tmp_path):
    full = StudyConfig(("gauss-shift-1", "vocab-50k"), ("k1", "k3"), (10, 100), 40, seed=3)
    part = StudyConfig(("gauss-shift-1",), ("k1",), (10, 100), 40, seed=3)  # an "interrupted" run
    run_study(part, progress=False, cache_dir=tmp_path)
    assert len(list(tmp_path.glob("*.json"))) == 2
    resumed = run_study(full, progress=False, cache_dir=tmp_path)
    assert len(list(tmp_path.glob("*.json"))) == 8
    pd.testing.assert_frame_equal(resumed, run_study(full, progress=False))
