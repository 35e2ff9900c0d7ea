"""Timings that mean something on a shared machine (reports.throughput): fixed intra-op threads while timing and
restored afterwards, the median of several calls with its spread, and a warning when the spread says the machine
was busy."""
import pandas as pd
import pytest
import torch

from reports import throughput
from reports.throughput import BUSY_SPREAD, TIMING_THREADS, busy_warning, timed


def test_timing_uses_fixed_threads_and_restores_them():
    before = torch.get_num_threads()
    torch.set_num_threads(TIMING_THREADS + 1)
    seen = []
    try:
        timed(lambda: seen.append(torch.get_num_threads()), repeat=3)
        assert seen == [TIMING_THREADS] * 4  # one warm-up call, then three timed
        assert torch.get_num_threads() == TIMING_THREADS + 1
    finally:
        torch.set_num_threads(before)


def test_threads_are_restored_when_the_timed_call_raises():
    before = torch.get_num_threads()
    try:
        timed(lambda: 1 / 0)
    except ZeroDivisionError:
        pass
    assert torch.get_num_threads() == before


def fake_clock(monkeypatch, durations):
    """A perf_counter that only moves when the timed function runs: by the next of ``durations`` (seconds)."""
    now, steps = [0.0], iter(durations)
    monkeypatch.setattr(throughput.time, "perf_counter", lambda: now[0])

    def work():
        now[0] += next(steps)
    return work


def test_steady_calls_are_not_busy_and_erratic_calls_are(monkeypatch):
    steady = timed(fake_clock(monkeypatch, [9e-3, 4.0e-3, 4.1e-3, 3.9e-3, 4.0e-3, 4.2e-3]), repeat=5)
    # the warm-up call (9 ms) is left out
    assert steady.seconds == pytest.approx(4e-3) and steady.spread == pytest.approx(0.025) and not steady.busy
    erratic = timed(fake_clock(monkeypatch, [1e-3, 1e-3, 12e-3, 1e-3, 12e-3, 1e-3]), repeat=5)
    assert erratic.seconds == pytest.approx(1e-3) and erratic.spread == pytest.approx(11) and erratic.busy


def test_busy_warning_names_the_rows_that_spread():
    calm = pd.DataFrame({"estimator": ["k1", "k3"], "ms": [1.0, 1.1], "spread": [0.05, 0.1]})
    assert busy_warning({"estimators": calm}) == ""
    busy = calm.assign(spread=[0.05, BUSY_SPREAD + 0.3])
    warning = busy_warning({"estimators": busy})
    assert "busy" in warning and "estimators: k3 " in warning and "k1" not in warning


def test_tables_carry_the_spread_of_each_row():
    lp = torch.randn(10 ** 4)
    frame = throughput.estimator_throughput([("k1", lambda p, q: q - p)], lp, lp + 0.1)
    assert list(frame.columns) == ["estimator", "samples", "ms", "× floor", "spread"]
    assert (frame["spread"] >= 0).all() and (frame["× floor"] > 0).all()
    vocab = throughput.vocab_throughput(rows=2, vocab=1000)
    assert "spread" in vocab and (vocab["× read floor"] > 0).all()
