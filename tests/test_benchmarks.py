"""pytest-benchmark microbenchmarks, with each estimator's bias and variance beside its timing.

The normal test run only checks that they execute (``--benchmark-disable`` is in pyproject's addopts).
To measure and save a baseline, then compare a change against it (the check of the README, "Benchmarks over
commits"; tests/test_regression_check.py says how its statistic and threshold were chosen):

    .venv/bin/python -m pytest tests/test_benchmarks.py --benchmark-enable --benchmark-timer=time.process_time \
        --benchmark-autosave
    .venv/bin/python -m pytest tests/test_benchmarks.py --benchmark-enable --benchmark-timer=time.process_time \
        --benchmark-compare --benchmark-compare-fail=min:45%
"""
import pytest
import torch
import torch.nn.functional as F

from estimators import kl
from estimators.vocab import token_kl
from reference_models import get_case
from reports.stats import seeded
from reports.study import StudyConfig, run_study
from reports.throughput import fixed_threads, logit_pair, steady_allocator

CASE = "gauss-shift-1"
ESTIMATORS = {"k1": "k1", "k2": "k2", "k3": "k3", "k1_control_variate": "k1_cv", "verl_low_var_kl": "verl_low_var_kl"}


@pytest.fixture(autouse=True)
def steady_timing(request):
    """Time as the benchmarks do: fixed intra-op threads and, where benchmarks run (the regression check's own
    pytest process), glibc's allocator thresholds. Never in the test suite's process (``--benchmark-disable``):
    fixed thresholds keep every freed block, and the gate tests after it grew the process to 24 GB."""
    if request.config.getoption("benchmark_enable") or not request.config.getoption("benchmark_disable"):
        steady_allocator()
    with fixed_threads():
        yield


@pytest.fixture(scope="module")
def statistics():
    frame = run_study(StudyConfig((CASE,), tuple(ESTIMATORS.values()), (1000,), 100, seed=0), progress=False)
    return frame.set_index("estimator")


@pytest.fixture(scope="module")
def log_probs():
    lp, lq = get_case(CASE).draw(10 ** 6, seeded(0, "benchmark", CASE))
    return lp.float(), lq.float()


@pytest.mark.parametrize("name", ESTIMATORS)
def test_estimator(benchmark, name, log_probs, statistics):
    out = benchmark(getattr(kl, name), *log_probs)
    assert out.shape == log_probs[0].shape and bool(torch.isfinite(out).all())
    row = statistics.loc[ESTIMATORS[name]]
    benchmark.extra_info.update(case=CASE, samples=log_probs[0].numel(), rel_bias=float(row.rel_bias),
                                bias_se=float(row.bias_se), rsd=float(row.rsd), rmse=float(row.rmse))


@pytest.mark.parametrize("vocab", [50257, 200000])
def test_token_kl(benchmark, vocab):
    a, b = logit_pair(64, vocab)
    out = benchmark(token_kl, a, b)
    exact = F.kl_div(F.log_softmax(b.double(), -1), F.log_softmax(a.double(), -1), log_target=True,
                     reduction="none").sum(-1)
    error = float((out.double() - exact).abs().max())
    assert error < 1e-4
    benchmark.extra_info.update(rows=64, vocab=vocab, max_abs_error_vs_float64=error)


def test_study(benchmark):
    config = StudyConfig((CASE,), ("k3",), (1000,), 1000, seed=0)
    frame = benchmark(run_study, config, progress=False)
    row = frame.iloc[0]
    benchmark.extra_info.update(samples=10 ** 6, rel_bias=float(row.rel_bias), rsd=float(row.rsd))
