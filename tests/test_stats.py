"""The one test machine (reports/stats.py): moments, thresholds, sizing, findings and the chunk runner."""
import math
from concurrent.futures import FIRST_COMPLETED, ThreadPoolExecutor, wait

import numpy as np
import pytest
import torch
from scipy import stats as sps

from reports import stats
from reports.stats import Chunk, Finding, Moments, Task


def test_moments_merged_in_chunks_equal_the_whole():
    g = torch.Generator().manual_seed(0)
    x, y = 1e8 + torch.randn(10_000, generator=g, dtype=torch.float64), torch.randn(10_000, generator=g)
    whole = Moments.of(x=x, y=y)
    merged = Moments(("x", "y"))
    for a, b in zip(x.split(777), y.split(777)):
        merged.add(Moments.of(x=a, y=b))
    assert merged.n == whole.n == 10_000
    assert merged.mean_of("x") == pytest.approx(float(x.mean()), rel=1e-15)
    # a naive Σx² − n·mean² loses every digit at an offset of 1e8; the pairwise update keeps them
    assert merged.var("x") == pytest.approx(float(x.var()), rel=1e-9)
    # x − mean(x) carries rounding of 1e8·ε ≈ 1e-8 per value: the covariance agrees to that, not better
    assert merged.cov("x", "y") == pytest.approx(float(np.cov(x.numpy(), y.double().numpy())[0, 1]), abs=1e-7)
    assert merged.raw("x", "y") == pytest.approx(float((x * y.double()).sum()), rel=1e-12)
    assert merged.se("y") == pytest.approx(float(y.double().std()) / 100, rel=1e-9)
    with pytest.raises(ValueError, match="cannot merge"):
        merged.add(Moments.of(z=x))


def test_thresholds_hold_the_family_wise_rate():
    z = stats.critical_z(1e-4, 50)
    assert 2 * 50 * sps.norm.sf(z) == pytest.approx(1e-4)
    assert stats.critical_z(1e-4, 10, sides=1, looks=2) == stats.critical_z(1e-4, 10)
    assert stats.z_score(1.0, 1.0 + 1e-12, 0.1, tol=1e-9) == 0.0
    assert stats.z_score(1.0, 0.5, 0.0) == math.inf
    # the sizing rule: N values make SE = sd/√N exactly the detectable effect
    n = stats.required_n(2.0, 0.1, z, stats.power_z(0.9))
    assert stats.detectable(2.0 / math.sqrt(n), z, stats.power_z(0.9)) == pytest.approx(0.1)


def test_required_n_has_the_stated_power():
    """Simulated: tests sized for a 5% shift at power 0.9 (α = 0.01 over 1 test) detect it about 90% of the time."""
    z, zp = stats.critical_z(0.01, 1), stats.power_z(0.9)
    n = math.ceil(stats.required_n(1.0, 0.05, z, zp))
    g = torch.Generator().manual_seed(1)
    means = (0.05 + torch.randn(4000, n, generator=g, dtype=torch.float64)).mean(1)
    power = float((means.abs() * math.sqrt(n) > z).double().mean())
    assert abs(power - 0.9) < 5 * math.sqrt(0.09 / 4000)  # 5 SE of a binomial proportion: false alarm < 1e-6


def test_evaluate_turns_every_failure_into_a_finding():
    x = torch.zeros(4)
    assert torch.equal(stats.evaluate(lambda a, b: a + b + 1, (x, x), ("log_p", "log_q"), (4,)),
                       torch.ones(4, dtype=torch.float64))
    cases = {
        "raised ZeroDivisionError": lambda a, b: 1 / 0,
        "returned (3,), expected per-sample estimates of shape (4,)": lambda a, b: a[:3],
        "returned float": lambda a, b: 0.0,
        "2 non-finite estimates out of 4": lambda a, b: a / torch.tensor([0.0, 0.0, 1.0, 1.0]),
        "modified its input log_q in place": lambda a, b: b.add_(1),
    }
    for message, fn in cases.items():
        with pytest.raises(Finding, match=message.replace("(", r"\(").replace(")", r"\)")):
            stats.evaluate(fn, (x, x), ("log_p", "log_q"), (4,))
    assert not x.any()
    nan = stats.evaluate(lambda a, b: a / a, (x, x), ("log_p", "log_q"), (4,), finite=False)
    assert bool(nan.isnan().all())


def test_positive_int():
    assert stats.positive_int("n", np.int64(3)) == 3
    for bad in (0, True, 2.0, "3"):
        with pytest.raises(ValueError, match="n must be an int"):
            stats.positive_int("n", bad)


def _noisy_sum(chunk: Chunk, scale: float) -> float:
    return scale * float(torch.randn(chunk.size, generator=chunk.generator(), dtype=torch.float64).sum())


class _Adaptive:
    """A job that decides from what it has seen how many chunks it wants: like a gate's pilot."""

    def __init__(self, name: str):
        self.name, self.seen, self.wanted = name, [], 1

    def task(self, index):
        return Task(_noisy_sum, Chunk((0, self.name), index, 100), (1.0,)) if index < self.wanted else None

    def absorb(self, index, result):
        self.seen.append(result)
        if index == 0:
            self.wanted = 2 + int(abs(result)) % 4


class _Threads:
    """An executor that runs 4 tasks at a time on threads, given back as they finish: results must not care."""

    slots = 4

    def __init__(self):
        self.pool, self.pending = ThreadPoolExecutor(4), set()

    def submit(self, task):
        future = self.pool.submit(task)
        self.pending.add(future)
        return future

    def finished(self):
        done, self.pending = wait(self.pending, return_when=FIRST_COMPLETED)
        return [(f, f.result()) for f in done]

    def cancel(self):
        self.pending.clear()


def test_run_jobs_gives_the_same_numbers_on_any_executor():
    local = [_Adaptive(f"job{i}") for i in range(6)]
    other = [_Adaptive(f"job{i}") for i in range(6)]
    stats.run_jobs(local)
    stats.run_jobs(other, _Threads())
    assert [j.seen for j in local] == [j.seen for j in other]
    assert {len(j.seen) for j in local} != {1}  # the pilots really sized the jobs differently


def test_chunk_seed_and_sizes():
    assert Chunk((0, "case", "k1", 10), 3, 5).seed == stats.chunk_seed(0, "case", "k1", 10, 3)
    assert stats.chunk_sizes(10, 4) == [4, 4, 2] and stats.chunk_sizes(8, 4) == [4, 4]
    assert stats.chunk_sizes(3, 0) == [1, 1, 1]
