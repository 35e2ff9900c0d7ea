"""The marginal-likelihood gate, measured both ways: planted bugs are caught, correct estimators hold.

False alarms: a gate run's family-wise rate is α = 1e-4 (Bonferroni over its z-tests and their two looks,
see reports.marginal_gate). The 20-seed test runs 20 independent gate runs, so a correct implementation
fails it with probability ≤ 20 × 1e-4 = 0.2%; the full run adds 1e-4. Seeds are fixed: outcomes reproduce.
"""
import subprocess
import sys
from pathlib import Path

import pytest

from reports.cli import main
from reports.marginal_bugs import PLANTED
from reports.catalog import EstimatorSpec, get_estimator
from reports.marginal_gate import CAUGHT, HOLDS, UNVERIFIABLE, MarginalGateConfig, run_marginal_gate

ROOT = Path(__file__).resolve().parents[1]
CORRECT = [get_estimator(n) for n in ("log_mean_exp", "jackknife1", "jackknife2")]
STATISTICAL = ["log_k_plus_one", "off_by_constant", "delta_correction_wrong_sign"]  # pass the range check


@pytest.fixture(scope="module")
def full_gate():
    """One default run: the correct estimators and every planted bug share the draws."""
    return run_marginal_gate(CORRECT + [EstimatorSpec(f.__name__, f, form="log_weights") for f in PLANTED])


def test_correct_estimators_hold(full_gate):
    for entry in CORRECT:
        assert full_gate.holds(entry.name), full_gate.caught(entry.name).to_string()
    f = full_gate.frame
    assert (f[f.estimator == "log_mean_exp"].verdict == HOLDS).all()


def test_every_planted_bug_is_caught(full_gate):
    missed = [f.__name__ for f in PLANTED if full_gate.holds(f.__name__)]
    assert len(PLANTED) >= 12 and not missed, missed


def test_bugs_are_caught_for_the_right_reason(full_gate):
    f = full_gate.frame.set_index(["estimator", "check"])
    assert "non-finite" in f.loc[("naive_log_mean_exp", "range"), "reason"]
    assert f.loc[("float16_cast", "range"), "verdict"] == CAUGHT
    assert "expected per-sample estimates of shape (6,)" in f.loc[("per_sample_output", "range"), "reason"]
    for name in STATISTICAL:
        assert f.loc[(name, "range"), "verdict"] == HOLDS
        assert (f.loc[name].drop("range").verdict == CAUGHT).any(), name
    assert (f.loc[("log_k_plus_one", "below"), "verdict"] == CAUGHT).all()  # at every K
    assert (f.loc[("off_by_constant", "above")].verdict == CAUGHT).any()


def test_cells_are_sized_for_power(full_gate):
    """Each held bias check detects an excess of half log_mean_exp's |bias| with probability 0.9, unless
    its replicates hit the cap."""
    f = full_gate.frame
    config = full_gate.config
    held = f[f.estimator.isin([e.name for e in CORRECT]) & f.check.isin(["below", "above"]) & (f.verdict == HOLDS)]
    assert len(held) >= 50
    short = held[(held.detectable > config.excess * held.baseline.abs()) & (held.n < config.max_replicates)]
    assert short.empty, short.to_string()


def test_heavy_weights_are_unverifiable_not_failed():
    result = run_marginal_gate(CORRECT[:1], ["lognormal-3"], MarginalGateConfig(Ks=(1024,), range_k=1000))
    rows = result.frame[result.frame.check != "range"]
    assert result.holds() and (rows.verdict == UNVERIFIABLE).any(), rows.to_string()


@pytest.mark.parametrize("seed", range(1, 21))
def test_no_false_alarm(seed):
    """The false-alarm rate does not depend on the number of replicates: these runs use the pilot only (and
    a small range check, which is deterministic)."""
    config = MarginalGateConfig(seed=seed, Ks=(4, 64, 1024), chunk=500, max_replicates=500, range_k=1000)
    result = run_marginal_gate(CORRECT, config=config)
    assert result.holds(), result.caught().to_string()


def test_gate_rejects_bad_configuration():
    with pytest.raises(ValueError, match="alpha"):
        MarginalGateConfig(alpha=0.0)
    with pytest.raises(ValueError, match="Ks"):
        MarginalGateConfig(Ks=(2,))
    with pytest.raises(ValueError, match="range_k"):
        MarginalGateConfig(range_k=2)
    with pytest.raises(ValueError, match="max_replicates"):
        MarginalGateConfig(chunk=1000, max_replicates=10)
    with pytest.raises(ValueError, match="specs"):
        run_marginal_gate([])


def _estbench(*args):
    return subprocess.run([sys.executable, "-m", "reports.cli", *args], capture_output=True, text=True, cwd=ROOT,
                          timeout=600)


def test_cli_marginal_gate_exit_codes(capfd):  # fd-level: the gate reports from its child process
    ok = _estbench("gate", "--marginal", "estimators.marginal:log_mean_exp")
    assert ok.returncode == 0, ok.stdout + ok.stderr
    assert "HOLDS" in ok.stdout and "false-alarm rate" in ok.stdout
    bug = _estbench("gate", "--marginal", "reports.marginal_bugs:missing_log_k")
    assert bug.returncode == 1, bug.stdout + bug.stderr
    assert "caught" in bug.stdout and "CAUGHT" in bug.stdout
    assert main(["gate", "--marginal", "estimators.marginal:log_mean_exp", "--cases", "nope"]) == 2
    assert "unknown marginal case" in capfd.readouterr().err
