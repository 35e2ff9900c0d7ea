r"""The one test machine: streamed moments, z-tests, sizing, tail checks, verdicts and the chunk runner.

Every study and gate in estbench is built from the pieces below and only *declares* what it tests.

**Moments.** :class:`Moments` keeps the count, the means and the co-moment matrix
:math:`C_{ab} = \sum_i (a_i - \bar a)(b_i - \bar b)` of a few named series, merged chunk by chunk in float64
with Chan, Golub & LeVeque's pairwise update (no catastrophic cancellation, whatever the chunk order).

**z-tests.** A mean :math:`\bar v` of N values is tested against an exact value e by
:math:`z = (\bar v - e) / \mathrm{SE}`, :math:`\mathrm{SE} = s/\sqrt N`; a run of m tests, each looked at
``looks`` times, on ``sides`` sides, has the family-wise false-alarm rate α at
:math:`z_{crit} = \Phi^{-1}(1 - \alpha / (\mathrm{sides} \cdot \mathrm{looks} \cdot m))` (Bonferroni). A
difference below the rounding error of the inputs is no evidence and scores z = 0.

**Sizing.** To detect an effect δ with probability β, a test takes
:math:`N = ((z_{crit} + z_\beta)\,\sigma/\delta)^2` values (σ from a pilot), and a test of N values detects
:math:`(z_{crit} + z_\beta)\,\mathrm{SE}` with probability β (:func:`detectable`).

**Validity.** A z-test needs a finite variance: a Pareto k̂ ≥ 0.5 of the values' tail (:func:`tail_khat`)
makes a cell *unverifiable*, as does an exact kurtosis κ that needs more than the budget for the mean to be
normal (N ≥ :data:`CLT_FACTOR` κ).

**User code.** :func:`evaluate` calls an estimator through :func:`reports.usercode.call_user` and turns
every way it can fail (an exception, ``sys.exit``, a hang past the timeout, mutating its inputs, a wrong
shape, non-finite values) into a :class:`Finding`, which a gate reports as *caught*; a function that cannot
even be called with the form's arguments is a usage error (:class:`reports.usercode.SignatureMismatch`).

**Chunks.** Work is cut into :class:`Chunk` s, each seeded from its key (seed, case, estimator, n) and
index alone. :func:`run_jobs` is the one place that maps chunks to work, through an :class:`Executor`
(``reports.executors``: in process, or on Ray): it asks the jobs for their chunks, each in index order,
keeps up to ``executor.slots`` of them in flight and lets each job absorb its results in index order,
whatever order they finish in. A job asks for chunk i only once it has absorbed
chunk i − 1, unless it already knows it wants it (``planned``: a gate after its pilot, a study cell from
the start); it decides from what it has absorbed alone (a gate's pilot sizes the rest), so no number
depends on the executor, the number of workers or the order in which chunks finish.
"""
from __future__ import annotations

import hashlib
import itertools
import math
from collections import deque
from dataclasses import dataclass, field
from typing import Any, Callable, Hashable, Iterable, Protocol, Sequence

import numpy as np
import torch
from scipy import stats
from torch import Tensor
from tqdm.auto import tqdm

from estimators._validate import positive_int
from estimators.diagnostics import pareto_khat

from .usercode import UserCodeFailure, call_user

__all__ = ["HOLDS", "CAUGHT", "UNVERIFIABLE", "ASSUMPTION", "SKIPPED", "CLT_FACTOR", "Moments", "critical_z",
           "power_z", "z_score", "required_n", "detectable", "tail_khat", "Finding", "evaluate", "require_finite", "chunk_seed", "seeded",
           "outcomes", "Chunk", "chunk_sizes", "Task", "Job", "Executor", "LocalExecutor", "run_jobs", "positive_int", "Cell", "CellsJob"]

HOLDS, CAUGHT, UNVERIFIABLE, ASSUMPTION, SKIPPED = "holds", "caught", "unverifiable", "assumption", "skipped"

#: Where an estimate's kurtosis κ is exact, its mean is tested only with N ≥ CLT_FACTOR·κ values, so that
#: the excess kurtosis of the mean, (κ − 3)/N, is below 1/CLT_FACTOR.
CLT_FACTOR = 100


# --- streamed moments -----------------------------------------------------------------------------------------

@dataclass
class Moments:
    """Count, means and co-moments of the named series, merged chunk by chunk (see the module docstring)."""

    names: tuple[str, ...]
    n: int = 0
    mean: np.ndarray = None
    comoment: np.ndarray = None

    def __post_init__(self):
        k = len(self.names)
        self.mean = np.zeros(k) if self.mean is None else self.mean
        self.comoment = np.zeros((k, k)) if self.comoment is None else self.comoment

    @classmethod
    def of(cls, **series: Tensor) -> "Moments":
        """The moments of one chunk: each series a tensor of the same number of values."""
        x = torch.stack([v.detach().reshape(-1).double().cpu() for v in series.values()])
        m = x.mean(1, keepdim=True)
        c = x - m
        return cls(tuple(series), x.shape[1], m[:, 0].numpy(), (c @ c.T).numpy())

    def add(self, other: "Moments") -> None:
        """Merge ``other`` (the same series) into these moments."""
        if other.names != self.names:
            raise ValueError(f"cannot merge moments of {other.names} into {self.names}")
        n = self.n + other.n
        if other.n == 0:
            return
        delta = other.mean - self.mean
        self.comoment = self.comoment + other.comoment + np.outer(delta, delta) * (self.n * other.n / n)
        self.mean = self.mean + delta * (other.n / n)
        self.n = n

    def _i(self, name: str) -> int:
        return self.names.index(name)

    def mean_of(self, name: str) -> float:
        return float(self.mean[self._i(name)])

    def cov(self, a: str, b: str) -> float:
        """The sample covariance (ddof 1) of two series."""
        return float(self.comoment[self._i(a), self._i(b)]) / max(self.n - 1, 1)

    def var(self, name: str) -> float:
        return max(self.cov(name, name), 0.0)

    def se(self, name: str) -> float:
        """The standard error of the series' mean."""
        return math.sqrt(self.var(name) / self.n) if self.n else math.nan

    def raw(self, a: str, b: str) -> float:
        """Σ aᵢbᵢ, the uncentred cross moment."""
        return float(self.comoment[self._i(a), self._i(b)]) + self.n * self.mean_of(a) * self.mean_of(b)


# --- tests and sizing -------------------------------------------------------------------------------------------

def critical_z(alpha: float, tests: int, sides: int = 2, looks: int = 1) -> float:
    """Φ⁻¹(1 − α/(sides·looks·tests)): the threshold that holds the family-wise false-alarm rate at α."""
    return float(stats.norm.isf(alpha / (sides * looks * max(tests, 1))))


def power_z(power: float) -> float:
    """Φ⁻¹(power): the extra margin that detects an effect with probability ``power``."""
    return float(stats.norm.isf(1 - power))


def z_score(mean: float, expected: float, se: float, tol: float = 0.0) -> float:
    """(mean − expected)/se; 0 where |mean − expected| ≤ ``tol`` (rounding), ±inf where se = 0."""
    bias = mean - expected
    if abs(bias) <= tol:
        return 0.0
    return bias / se if se > 0 else math.copysign(math.inf, bias)


def required_n(sd: float, effect: float, z_crit: float, z_power: float) -> float:
    """Values needed to detect ``effect`` with the power behind ``z_power``: ((z_crit + z_power)·sd/effect)²."""
    return ((z_crit + z_power) * sd / max(abs(effect), 1e-300)) ** 2


def detectable(se: float, z_crit: float, z_power: float) -> float:
    """The effect a test with standard error ``se`` detects with the power behind ``z_power``."""
    return (z_crit + z_power) * se


def tail_khat(x: Tensor) -> float:
    """Pareto k̂ of |x − median| (both tails); −inf where there are too few values (< 20) or no tail."""
    return pareto_khat(x, tail="both") if x.numel() >= 20 else -math.inf


# --- user code into findings -----------------------------------------------------------------------------------

class Finding(Exception):
    """An estimator failed outright on a chunk: raised, exited, hung, mutated its inputs, returned the wrong
    shape or non-finite values. The message says which, in one line; a gate reports it as caught."""


def evaluate(fn: Callable, args: tuple, names: tuple[str, ...], shape: tuple[int, ...],
             timeout: float | None = None, finite: bool = True, keep_graph: bool = False) -> Tensor:
    """``fn(*args)`` as float64 on the CPU (with ``keep_graph``, as returned, autograd graph and all), checked to
    be a tensor of ``shape`` (and, with ``finite``, to hold finite values); every failure is a :class:`Finding`
    (a signature that cannot take ``args`` stays a SignatureMismatch: the caller's usage error)."""
    try:
        out = call_user(fn, args, names=names, timeout=timeout)
    except UserCodeFailure as err:
        raise Finding(str(err)) from err
    if not isinstance(out, Tensor) or tuple(out.shape) != tuple(shape):
        got = tuple(out.shape) if isinstance(out, Tensor) else type(out).__name__
        raise Finding(f"returned {got}, expected per-sample estimates of shape {tuple(shape)}")
    v = out.detach().double().cpu()
    if finite:
        require_finite(v)
    return out if keep_graph else v


def require_finite(v: Tensor) -> Tensor:
    """``v``, or a :class:`Finding` counting its non-finite values (a finite sum proves them all finite)."""
    if not bool(torch.isfinite(v.sum())):
        bad = int((~torch.isfinite(v)).sum())
        if bad:
            raise Finding(f"{bad} non-finite estimates out of {v.numel()}")
    return v


# --- chunks and the runner --------------------------------------------------------------------------------------

def chunk_seed(*parts) -> int:
    """A stable 63-bit seed from any printable parts (independent of Python's hash randomization)."""
    digest = hashlib.blake2b("|".join(map(str, parts)).encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") & (2 ** 63 - 1)


def seeded(*parts, device: torch.device | str = "cpu") -> torch.Generator:
    """A generator on ``device`` seeded from ``parts`` (:func:`chunk_seed`)."""
    return torch.Generator(device=device).manual_seed(chunk_seed(*parts))


@dataclass(frozen=True)
class Chunk:
    """One unit of work: ``size`` draws seeded from ``key`` (seed, case, estimator, n, or the parts a shared
    draw depends on) and ``index``, nothing else."""

    key: tuple
    index: int
    size: int

    @property
    def seed(self) -> int:
        return chunk_seed(*self.key, self.index)

    def generator(self, device: torch.device | str = "cpu") -> torch.Generator:
        return seeded(*self.key, self.index, device=device)


def chunk_sizes(total: int, per_chunk: int) -> list[int]:
    """``total`` cut into chunks of ``per_chunk`` (the last one shorter): the rule depends on nothing else."""
    full, rest = divmod(total, max(1, per_chunk))
    return [max(1, per_chunk)] * full + ([rest] if rest else [])


@dataclass(frozen=True)
class Task:
    """``fn(chunk, *args)``: a module-level function and picklable arguments, so any executor can run it."""

    fn: Callable
    chunk: Chunk
    args: tuple = ()

    def __call__(self):
        return self.fn(self.chunk, *self.args)


class Job(Protocol):
    """A sequence of chunks whose results are absorbed in index order. It may also have ``planned() -> int``:
    the indices below it that it wants whatever the results still to come say (without it: only the one
    after the last absorbed), so that an executor can run them at once."""

    def task(self, index: int) -> Task | None:
        """The work of chunk ``index``, or None when the job wants no more (it never wants one again)."""

    def absorb(self, index: int, result: Any) -> None:
        """Take chunk ``index``'s result (called in index order)."""


class Executor(Protocol):
    """Runs tasks; ``slots`` is how many are worth keeping in flight at once."""

    slots: int

    def submit(self, task: Task) -> Hashable:
        """Start ``task``; returns its handle."""

    def finished(self) -> list[tuple[Hashable, Any]]:
        """Wait until at least one submitted task is done; (handle, result) of each done one, each given once."""

    def cancel(self) -> None:
        """Drop every submitted task not yet given back."""


class LocalExecutor:
    """Runs each task in this process, one at a time, in the order submitted."""

    slots = 1

    def __init__(self):
        self._queue: deque[tuple[int, Task]] = deque()
        self._handles = itertools.count()

    def submit(self, task: Task) -> int:
        handle = next(self._handles)
        self._queue.append((handle, task))
        return handle

    def finished(self) -> list[tuple[int, Any]]:
        handle, task = self._queue.popleft()
        return [(handle, task())]

    def cancel(self) -> None:
        self._queue.clear()


@dataclass
class _Progress:
    """Where :func:`run_jobs` stands with one job: the next index to ask for and to absorb, results that
    arrived ahead of their turn."""

    job: Job
    asked: int = 0
    absorbed: int = 0
    done: bool = False
    arrived: dict = field(default_factory=dict)

    def may_ask(self) -> bool:
        planned = getattr(self.job, "planned", None)
        return not self.done and self.asked < max(self.absorbed + 1, planned() if planned else 0)

    def absorb_arrived(self) -> None:
        while self.absorbed in self.arrived:
            self.job.absorb(self.absorbed, self.arrived.pop(self.absorbed))
            self.absorbed += 1


def run_jobs(jobs: Sequence[Job], executor: Executor | None = None, desc: str = "chunks",
             progress: bool = False, total: int | None = None) -> None:
    """Run ``jobs`` to completion through ``executor`` (default: :class:`LocalExecutor`), up to its ``slots``
    chunks in flight, each slot going to the first job that can ask for a chunk (so jobs finish in order, and
    a study's cells reach its cache early); each job absorbs its results in index order."""
    executor = executor or LocalExecutor()
    runs, in_flight = [_Progress(job) for job in jobs], {}
    with tqdm(total=total, desc=desc, unit="chunk", disable=not progress) as bar:
        try:
            while True:
                while len(in_flight) < executor.slots:
                    run = next((run for run in runs if run.may_ask()), None)
                    if run is None:
                        break
                    task = run.job.task(run.asked)
                    if task is None:
                        run.done = True
                        continue
                    in_flight[executor.submit(task)] = run, run.asked
                    run.asked += 1
                if not in_flight:
                    return
                for handle, result in executor.finished():
                    run, index = in_flight.pop(handle)
                    run.arrived[index] = result
                    bar.update(1)
                    run.absorb_arrived()
        except BaseException:
            executor.cancel()
            raise


def outcomes(estimates: Iterable[Callable[[], Tensor]], series: Callable[[Tensor], dict[str, Tensor]],
             khat_of: tuple[str, ...] = ()) -> list[tuple["Moments | Finding", dict[str, float]]]:
    """Per estimator, on one chunk: the moments of the ``series`` built from its estimates (each
    ``estimates`` item computes them or raises a Finding), with the Pareto k̂ of the series named in
    ``khat_of``; or its Finding."""
    out = []
    for estimate in estimates:
        try:
            values = series(estimate())
        except Finding as finding:
            out.append((finding, {}))
            continue
        out.append((Moments.of(**values), {key: tail_khat(values[key]) for key in khat_of}))
    return out


@dataclass
class Cell:
    """A (estimator, target) cell's streamed state: its moments, pilot diagnostics and any verdict reached
    early (a finding, or why it cannot be tested)."""

    moments: Moments | None = None
    verdict: str | None = None
    reason: str = ""
    khat: dict = field(default_factory=dict)
    chunks: int = 1  # the chunks it takes: the pilot's plan

    @property
    def open(self) -> bool:
        return self.verdict is None

    @property
    def testable(self) -> bool:
        return True

    def take(self, outcome: "Moments | Finding", khat: dict[str, float]) -> None:
        """Absorb one chunk's outcome (:func:`outcomes`): its moments and k̂, or the finding that closes the
        cell as caught."""
        self.khat.update(khat)
        if not self.open:
            return
        if isinstance(outcome, Finding):
            self.verdict, self.reason = CAUGHT, str(outcome)
        elif self.moments is None:
            self.moments = outcome
        else:
            self.moments.add(outcome)

    def close(self, verdict: str, reason: str) -> None:
        if self.open:
            self.verdict, self.reason = verdict, reason


class CellsJob:
    """A :class:`Job` over the ``cells`` of one case that share each chunk's draws: chunk i runs the cells that
    are testable, open and planned to take more than i chunks, and after each chunk every cell still open is
    (re)planned from what it has absorbed (:meth:`plan`). A subclass says what a chunk computes
    (:meth:`chunk_task`), and whether it ``replans`` after every chunk; one that plans only from its pilot
    knows after it how many chunks it wants (:meth:`planned`), and a closed cell ignores those it was given."""

    cells: list[Cell]
    replans: bool = False

    def __init__(self):
        self._running: dict[int, list[Cell]] = {}  # the cells each chunk in flight runs

    def chunk_task(self, index: int, cells: list[Cell]) -> Task:
        raise NotImplementedError

    def plan(self, cell: Cell, index: int) -> None:
        """Set ``cell.chunks`` (or close the cell) after chunk ``index``."""
        raise NotImplementedError

    def planned(self) -> int:
        """The chunks this job wants whatever the results still to come say: the pilot, then every open cell's
        plan (none ahead for a job that replans)."""
        if self.replans:
            return 0
        return max([c.chunks for c in self.cells if c.testable and c.open], default=0)

    def task(self, index: int) -> Task | None:
        running = [c for c in self.cells if c.testable and c.open and c.chunks > index]
        if not running:
            return None
        self._running[index] = running
        return self.chunk_task(index, running)

    def absorb(self, index: int, result) -> None:
        for cell, (outcome, khat) in zip(self._running.pop(index), result):
            cell.take(outcome, khat)
            if cell.open:
                self.plan(cell, index)
