"""User code cannot fool or wedge the gates (issue 11, item 5): each way a user's estimator misbehaves is
reported as what it is, through the command line as a CI job sees it. Each failed before the statistical core:
sys.exit(0) exited 0 with no output, a hang never returned, a wrong signature was 'caught', a mutating
estimator corrupted the next one's statistics, and the marginal gate crashed with a KeyError."""
import os
import subprocess
import sys
import textwrap
import time
import warnings
from pathlib import Path

import junitparser
import pytest

from estimators import kl
from reports.catalog import EstimatorSpec, get_estimator
from reports.gate import CAUGHT, HOLDS, GateConfig, run_gate
from reports.study import StudyConfig, run_study

ROOT = Path(__file__).resolve().parents[1]

USER = textwrap.dedent('''
    import os
    import sys
    import time

    import torch


    def exits(log_p, log_q):
        sys.exit(0)


    def ends_the_process(log_p, log_q):
        os._exit(0)


    def hangs(log_p, log_q):
        while True:
            time.sleep(0.05)


    def one_argument(log_p):
        return -log_p


    def mutates(log_p, log_q):
        log_q.sub_(log_p)
        return -log_q


    def never_right(log_w):
        return log_w.mean()  # a Python scalar tensor of the wrong shape on every call
''')


@pytest.fixture(scope="module")
def user_module(tmp_path_factory):
    folder = tmp_path_factory.mktemp("user")
    (folder / "user_estimators.py").write_text(USER)
    return folder


def _gate(folder, *args, timeout=300):
    start = time.perf_counter()
    out = subprocess.run([sys.executable, "-m", "reports.cli", "gate", *args], capture_output=True, text=True,
                         cwd=folder, timeout=timeout, env={**os.environ, "PYTHONPATH": str(ROOT)})
    return out, time.perf_counter() - start


SMALL = ("--cases", "gauss-shift-1", "near-identical", "--max-budget", str(2 ** 16))


def test_sys_exit_is_caught_not_a_pass(user_module):
    out, _ = _gate(user_module, "--kl", "user_estimators:exits", *SMALL)
    assert out.returncode == 1, out.stdout + out.stderr
    assert "called sys.exit(0)" in out.stdout and out.stdout.strip().splitlines()[-1].startswith("CAUGHT")


def test_ending_the_process_is_caught_not_a_pass(user_module):
    """os._exit skips every handler: the gate runs in a child process, and a child without a verdict is caught."""
    out, _ = _gate(user_module, "--kl", "user_estimators:ends_the_process", *SMALL, "--junit-xml", "ended.xml")
    assert out.returncode == 1, out.stdout + out.stderr
    assert out.stdout.strip().splitlines()[-1].startswith("CAUGHT: user_estimators:ends_the_process ended the gate's")
    (suite,) = junitparser.JUnitXml.fromfile(str(user_module / "ended.xml"))  # CI sees a failure, not no file
    assert [type(r).__name__ for case in suite for r in case.result] == ["Failure"]


def test_a_hang_is_caught_within_the_timeout(user_module):
    out, seconds = _gate(user_module, "--kl", "user_estimators:hangs", "--timeout", "1", *SMALL)
    assert out.returncode == 1, out.stdout + out.stderr
    assert "did not return within 1 s" in out.stdout
    assert seconds < 60


def test_a_wrong_signature_is_a_usage_error(user_module):
    out, _ = _gate(user_module, "--kl", "user_estimators:one_argument", *SMALL)
    assert out.returncode == 2, out.stdout + out.stderr
    assert "cannot be called as f(log_p, log_q)" in out.stderr and "one_argument" in out.stderr


def test_a_marginal_estimator_that_fails_everything_gets_a_table(user_module):
    out, _ = _gate(user_module, "--marginal", "user_estimators:never_right", "--cases", "lognormal-0.5")
    assert out.returncode == 1, out.stdout + out.stderr
    assert "Traceback" not in out.stderr and "expected per-sample estimates of shape" in out.stdout
    assert out.stdout.strip().splitlines()[-1].startswith("CAUGHT")


def test_nothing_verifiable_never_exits_0(user_module):
    out, _ = _gate(user_module, "--kl", "estimators.kl:k3", "--cases", "gauss-var-wide-q", "--max-budget",
                   str(2 ** 16))
    assert out.returncode == 1, out.stdout + out.stderr
    assert out.stdout.strip().splitlines()[-1].startswith("UNVERIFIED")


def _mutating(log_p, log_q):
    log_q.sub_(log_p)
    return -log_q


def test_a_mutating_estimator_is_caught_and_corrupts_nothing():
    specs = [EstimatorSpec("mutates", _mutating), get_estimator("k1"), EstimatorSpec("user_k1", kl.k1)]
    frame = run_gate(specs, ["gauss-shift-1", "near-identical"], GateConfig(chunk=2 ** 16, max_budget=2 ** 18)).frame
    mutated = frame[frame.estimator == "mutates"]
    assert (mutated.verdict == CAUGHT).all() and mutated.reason.str.contains("modified its input log_q").all()
    assert (frame[frame.estimator != "mutates"].verdict == HOLDS).all(), frame.to_string()


def test_studies_resume_and_never_reuse_a_damaged_or_stale_cell(tmp_path):
    config = StudyConfig(("lognormal-0.5",), ("log_mean_exp",), (4, 16), 200, 0)
    first = run_study(config, progress=False, cache_dir=tmp_path)
    cells = sorted(tmp_path.glob("*.json"))
    assert len(cells) == 2  # the marginal study is cached too
    cells[0].write_text(cells[0].read_text()[:40])  # truncated, as by a killed run
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        again = run_study(config, progress=False, cache_dir=tmp_path)
    assert any(cells[0].name in str(w.message) for w in caught)
    assert again.equals(first)
    other = run_study(StudyConfig(("lognormal-0.5",), ("elbo",), (4, 16), 200, 0), progress=False,
                      cache_dir=tmp_path)
    assert len(list(tmp_path.glob("*.json"))) == 4 and not other["mean"].equals(first["mean"])


def test_a_changed_estimator_never_reuses_its_cells(tmp_path):
    """The same name, different code: the cell key follows the function's code."""
    def run(fn):
        spec = EstimatorSpec("mine", fn)
        from reports import catalog
        catalog.ESTIMATORS["mine"] = spec
        try:
            return run_study(StudyConfig(("gauss-shift-1",), ("mine",), (10,), 50, 0), progress=False,
                             cache_dir=tmp_path)
        finally:
            del catalog.ESTIMATORS["mine"]

    single = run(lambda log_p, log_q: kl.k1(log_p, log_q))
    double = run(lambda log_p, log_q: 2 * kl.k1(log_p, log_q))
    assert double["mean"].iloc[0] == pytest.approx(2 * single["mean"].iloc[0])
