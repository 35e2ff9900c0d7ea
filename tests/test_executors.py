"""Executors never change a number: a study and a gate give frames equal bit for bit to a local run (on one
torch thread, as every Ray worker runs a chunk) with any number of chunks in flight, in any completion order,
on Ray on one machine (2 CPUs) and on a simulated two-node cluster; a worker that dies is retried; a user's
estimator that only the current directory holds runs on the workers; an interrupted distributed study resumes
from its cached cells; no Ray, or no cluster at the address, is a usage error (exit 2)."""
import itertools
import os
import pickle
import random
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
import pytest
import torch

from reports import study
from reports.catalog import EstimatorSpec, get_estimator
from reports.cli import GATE_STATUS, main
from reports.executors import RayExecutor, _ship_by_value, make_executor
from reports.gate import CAUGHT, GateConfig, run_gate
from reports.marginal_gate import MarginalGateConfig, run_marginal_gate
from reports.planted_bugs import k3_missing_minus_one
from reports.stats import Chunk, LocalExecutor, Task
from reports.study import StudyConfig, run_study

ROOT = Path(__file__).resolve().parents[1]
CASES = ("gauss-shift-1", "vocab-50k", "seq-bn-vs-fvsbn")
STUDY = StudyConfig(CASES, ("k1", "k3"), (10, 100), 200, seed=3)
MARGINAL_STUDY = StudyConfig(("lognormal-1",), ("log_mean_exp", "jackknife1"), (4, 64), 400, seed=3)
GATE = GateConfig(seed=5, chunk=2 ** 12, max_budget=2 ** 15)
MARGINAL_GATE = MarginalGateConfig(seed=5, Ks=(4, 16), chunk=100, max_replicates=800, range_k=1000)
USER_MODULE = """
import torch

def k3(log_p, log_q):
    log_r = log_q - log_p
    return torch.expm1(log_r) - log_r
"""


def raises_now_and_then(log_p, log_q):
    """2·k1, but raises on about one chunk in four (decided by the draws, so on the same chunks everywhere)."""
    if int(log_p.double().sum().abs() * 1e3) % 4 == 0:
        raise RuntimeError("boom")
    return 2 * (log_p - log_q)


# The cell that closes mid-run comes first, so that a result handed to the wrong cells cannot go unnoticed.
SPECS = [EstimatorSpec("raises", raises_now_and_then), get_estimator("k3"), get_estimator("k1"),
         EstimatorSpec("biased", k3_missing_minus_one)]


@pytest.fixture(autouse=True)
def _small_chunks_one_thread(monkeypatch):
    """Study cells of several chunks (the chunk size is fixed in the driver and travels with each chunk); local
    chunks on one thread, as on a Ray worker."""
    monkeypatch.setattr(study, "CHUNK_ELEMENTS", 2 ** 12)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _runs(executor) -> list[pd.DataFrame]:
    """The frames of two studies and two gates."""
    return [run_study(STUDY, progress=False, executor=executor),
            run_study(MARGINAL_STUDY, progress=False, executor=executor),
            run_gate(SPECS, list(CASES), GATE, executor=executor).frame,
            run_marginal_gate([get_estimator("jackknife1")], ["lognormal-1"], MARGINAL_GATE, executor=executor).frame]


@pytest.fixture(scope="module")
def local_runs():
    threads = torch.get_num_threads()
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(study, "CHUNK_ELEMENTS", 2 ** 12)
        torch.set_num_threads(1)
        try:
            return _runs(LocalExecutor())
        finally:
            torch.set_num_threads(threads)


def _assert_identical(frames, expected):
    for got, want in zip(frames, expected, strict=True):
        pd.testing.assert_frame_equal(got, want, check_exact=True)


class _Shuffled:
    """Runs tasks in this process with ``slots`` in flight, finishing a random handful of them at a time."""

    def __init__(self, slots: int, seed: int):
        self.slots, self.rng, self.pending, self.handles = slots, random.Random(seed), {}, itertools.count()

    def submit(self, task):
        handle = next(self.handles)
        self.pending[handle] = task
        return handle

    def finished(self):
        done = self.rng.sample(sorted(self.pending), self.rng.randint(1, len(self.pending)))
        return [(h, self.pending.pop(h)()) for h in done]

    def cancel(self):
        self.pending.clear()


def test_local_runs_are_what_they_should_be(local_runs):
    """The fixed runs exercise what identity must survive: cells of several chunks, a gate cell closed by an
    exception after its pilot (later chunks were already planned), a caught bias, gate plans of several chunks."""
    kl, _, gate, _ = local_runs
    assert kl.replicates.min() == 200 and len(kl) == 12
    raises = gate[gate.estimator == "raises"]
    assert (raises.verdict == CAUGHT).all() and raises.reason.str.contains("boom").all()
    assert (raises.n > 0).any()  # closed after its pilot on at least one case
    assert (gate[gate.estimator == "biased"].verdict == CAUGHT).any()
    assert gate.n.max() > 4 * GATE.chunk


@pytest.mark.parametrize("slots, seed", [(1, 0), (3, 1), (64, 2)])
def test_any_width_and_completion_order_gives_the_same_frames(local_runs, slots, seed):
    _assert_identical(_runs(_Shuffled(slots, seed)), local_runs)


def test_a_users_module_is_shipped_by_value(tmp_path, monkeypatch):
    """A task pickled once the user's module is gone (as on a worker that cannot import it) still runs."""
    from ray import cloudpickle

    (tmp_path / "user_kl_shipped.py").write_text(USER_MODULE)
    monkeypatch.syspath_prepend(str(tmp_path))
    import user_kl_shipped

    task = Task(_user_call, Chunk((0,), 0, 4), (EstimatorSpec("user", user_kl_shipped.k3),))
    _ship_by_value(task)
    blob = cloudpickle.dumps(task)
    sys.path.remove(str(tmp_path))
    monkeypatch.delitem(sys.modules, "user_kl_shipped")
    assert pickle.loads(blob)() == 0.0


def _user_call(chunk: Chunk, spec: EstimatorSpec) -> float:
    return float(spec.fn(torch.zeros(chunk.size), torch.zeros(chunk.size)).sum())


# --- on Ray ------------------------------------------------------------------------------------------------------

@pytest.fixture(scope="module", params=["one machine", "two nodes"])
def on_ray(request):
    """(executor, address): a local Ray runtime with 2 CPUs, or a simulated cluster of two 1-CPU nodes."""
    ray = pytest.importorskip("ray")
    if request.param == "one machine":
        executor = make_executor("ray", num_cpus=2)
        yield executor, ray.get_runtime_context().gcs_address
        executor.close()
        return
    from ray.cluster_utils import Cluster

    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 1})
    cluster.add_node(num_cpus=1)
    cluster.wait_for_nodes()
    yield make_executor("ray", cluster.address), cluster.address
    ray.shutdown()
    cluster.shutdown()


def test_ray_gives_the_same_frames(on_ray, local_runs):
    executor, _ = on_ray
    assert executor.slots == 4
    _assert_identical(_runs(executor), local_runs)


def _dies_once(chunk: Chunk, marker: str, task: Task):
    """``task``, but the first attempt at a chunk 1 ends its worker process."""
    if chunk.index == 1 and not os.path.exists(marker):
        Path(marker).touch()
        os._exit(1)
    return task()


class _Wrapped:
    """Another executor's tasks, each run through ``fn(chunk, *args, task)``; after ``stop_after`` results, a
    KeyboardInterrupt. Counts the tasks submitted."""

    def __init__(self, inner, fn=None, args=(), stop_after=None):
        self.inner, self.fn, self.args, self.stop_after, self.slots = inner, fn, args, stop_after, inner.slots
        self.submitted = self.results = 0

    def submit(self, task):
        self.submitted += 1
        return self.inner.submit(Task(self.fn, task.chunk, (*self.args, task)) if self.fn else task)

    def finished(self):
        if self.stop_after is not None and self.results >= self.stop_after:
            raise KeyboardInterrupt
        done = self.inner.finished()
        self.results += len(done)
        return done

    def cancel(self):
        self.inner.cancel()


def test_a_dead_worker_is_retried(on_ray, local_runs, tmp_path, request):
    executor, _ = on_ray
    if request.node.callspec.params["on_ray"] != "one machine":
        pytest.skip("once is enough")
    marker = tmp_path / "died"
    frame = run_study(STUDY, progress=False, executor=_Wrapped(executor, _dies_once, (str(marker),)))
    assert marker.exists()  # a worker did die
    pd.testing.assert_frame_equal(frame, local_runs[0], check_exact=True)


def test_without_retries_the_dead_worker_fails_the_run(on_ray, tmp_path, request):
    """The fault injection is real: with no retry the same death ends the run with an error."""
    import ray

    if request.node.callspec.params["on_ray"] != "one machine":
        pytest.skip("once is enough")
    with pytest.raises(ray.exceptions.WorkerCrashedError):
        run_study(STUDY, progress=False, executor=_Wrapped(RayExecutor(retries=0), _dies_once,
                                                           (str(tmp_path / "died"),)))


def test_an_interrupted_ray_study_resumes_from_its_cells(on_ray, local_runs, tmp_path, request):
    executor, _ = on_ray
    if request.node.callspec.params["on_ray"] != "one machine":
        pytest.skip("once is enough")
    with pytest.raises(KeyboardInterrupt):
        run_study(STUDY, progress=False, cache_dir=tmp_path, executor=_Wrapped(executor, stop_after=20))
    resumed, everything = _Wrapped(executor), _Wrapped(LocalExecutor())
    frame = run_study(STUDY, progress=False, cache_dir=tmp_path, executor=resumed)
    run_study(STUDY, progress=False, executor=everything)
    assert 0 < resumed.submitted < everything.submitted  # the cells finished before the interruption are reused
    pd.testing.assert_frame_equal(frame, local_runs[0], check_exact=True)


def test_gate_command_on_a_cluster_with_a_module_only_in_the_cwd(on_ray, tmp_path, monkeypatch, capsys, request):
    """`estbench gate --executor ray --address ADDR` runs a user's estimator from a temporary directory on the
    cluster and prints what the local gate prints."""
    _, address = on_ray
    if request.node.callspec.params["on_ray"] != "two nodes":
        pytest.skip("the two-node cluster is the one that is not this process's")
    (tmp_path / "user_kl.py").write_text(USER_MODULE)
    argv = ["gate", "--kl", "user_kl:k3", "--cases", *CASES[:2], "--max-budget", str(2 ** 15), "--seed", "5"]
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv(GATE_STATUS, str(tmp_path / "status"))  # the gate runs in this process
    assert main(argv) == 0
    local = capsys.readouterr().out
    env = {**os.environ, "PYTHONPATH": str(ROOT), GATE_STATUS: str(tmp_path / "status-ray")}  # no grandchild
    out = subprocess.run([sys.executable, "-m", "reports.cli", *argv, "--executor", "ray", "--address", address],
                         cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout == local


def test_no_cluster_at_the_address_is_a_usage_error(tmp_path):
    start = time.monotonic()
    out = subprocess.run([sys.executable, "-m", "reports.cli", "report", "--quick", "--out", str(tmp_path),
                          "--executor", "ray", "--address", "127.0.0.1:1"],
                         env={**os.environ, "PYTHONPATH": str(ROOT)}, capture_output=True, text=True, timeout=120)
    assert out.returncode == 2
    assert time.monotonic() - start < 60
    lines = out.stderr.strip().splitlines()
    assert len(lines) == 1 and "no Ray cluster reachable at '127.0.0.1:1'" in lines[0], out.stderr


def test_without_ray_the_ray_executor_is_a_usage_error(tmp_path, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "ray", None)  # `import ray` fails as it does where Ray is not installed
    assert main(["report", "--quick", "--out", str(tmp_path), "--executor", "ray"]) == 2
    assert "pip install -e '.[ray]'" in capsys.readouterr().err
    assert main(["report", "--quick", "--out", str(tmp_path), "--address", "h:1"]) == 2


def test_the_command_line_offers_every_executor():
    from reports import cli, executors

    assert cli.EXECUTORS == executors.EXECUTORS
