"""Throughput against floors: the cost of the unavoidable work on the same number of elements, timed in the same
process with the same fixed number of intra-op threads, so that time / floor measures the estimator rather than the
machine's load. Used by the asv suite, the report's throughput section and ``estbench throughput``.

Every time is the median of :data:`REPEAT` calls with its spread, the interquartile range over the median; a
spread above :data:`BUSY_SPREAD` means the machine was busy while timing (other processes took the cores), and
:func:`busy_warning` says so."""
import ctypes
import platform
import time
from contextlib import contextmanager
from dataclasses import dataclass
from functools import cache, partial

import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F

from estimators.vocab import token_kl
from reference_models import get_case

from .stats import seeded
from .study import StudyConfig, run_study

#: Intra-op threads while timing: one, so that a second core taken by another process cannot halve the speed of
#: half of every kernel (two threads on two shared cores varied by up to 100× between runs).
TIMING_THREADS = 1
#: Calls per timing; the median is reported, and the interquartile range over it is the spread.
REPEAT = 11
#: A spread above this (IQR / median) marks a timing taken on a busy machine. Unloaded, the spread of these
#: timings stays below 0.1 here (2 shared cores); under a competing load it reaches 0.3–1.
BUSY_SPREAD = 0.5


#: glibc's mallopt parameters, and the values that keep freed memory in the process: a block up to 1 GiB comes
#: from the heap rather than its own mmap, and the heap is never trimmed back to the system.
M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3
STEADY_MALLOC = {M_MMAP_THRESHOLD: 1 << 30, M_TRIM_THRESHOLD: 2 ** 31 - 1}


@cache
def steady_allocator() -> bool:
    """Fix glibc's allocator thresholds for the rest of the process (True where it is glibc and accepted them).
    By default glibc adapts them as blocks are freed, so the same call either reuses heap memory or maps and
    faults in fresh pages each time, depending on what ran before: k3 on 10⁶ floats took 1.2 ms or 5–6 ms in
    the same process, a whole pytest-benchmark run 10× slower than the previous one. The price: a timing
    process keeps the memory it freed."""
    if platform.libc_ver()[0] != "glibc":
        return False
    libc = ctypes.CDLL(None)
    return all(libc.mallopt(param, value) == 1 for param, value in STEADY_MALLOC.items())


@contextmanager
def fixed_threads(threads: int = TIMING_THREADS):
    """Run the body with ``threads`` intra-op torch threads, restoring the previous number afterwards."""
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        yield
    finally:
        torch.set_num_threads(before)


@dataclass(frozen=True)
class Timing:
    """The median wall time (seconds) of several calls, and their spread: interquartile range / median."""

    seconds: float
    spread: float

    @property
    def busy(self) -> bool:
        return self.spread > BUSY_SPREAD


def timed(fn, repeat: int = REPEAT) -> Timing:
    """Time ``repeat`` calls of ``fn`` (after one warm-up call) with :data:`TIMING_THREADS` threads, synchronising
    CUDA. (The asv suite also fixes the allocator, :func:`steady_allocator`; here a report or a test process goes
    on after timing, and fixed thresholds would make it keep every block it frees.)"""
    times = []
    with fixed_threads():
        for _ in range(repeat + 1):
            start = time.perf_counter()
            fn()
            if torch.cuda.is_available():
                torch.cuda.synchronize()
            times.append(time.perf_counter() - start)
    q1, median, q3 = np.percentile(times[1:], [25, 50, 75])
    return Timing(float(median), float((q3 - q1) / median) if median > 0 else 0.0)


def _spread(*timings: Timing) -> float:
    """The largest spread of the timings a row is made of."""
    return max(t.spread for t in timings)


def sample_floor(n: int, dtype=torch.float32, repeat: int = REPEAT, device: str = "cpu") -> Timing:
    """Draw n standard normals and make one exp and one log pass over them: the least a study can do."""
    g = torch.Generator(device=device).manual_seed(0)

    def work():
        x = torch.randn(n, generator=g, device=device, dtype=dtype)
        torch.log(torch.exp(x))

    return timed(work, repeat)


def read_floor(*tensors) -> Timing:
    """Read every element once (a sum per tensor): the least any exact vocabulary KL can do."""
    return timed(lambda: [t.sum() for t in tensors])


def busy_warning(tables: dict[str, pd.DataFrame]) -> str:
    """One line naming the rows whose timings spread beyond :data:`BUSY_SPREAD`, or "" when none did."""
    busy = [f"{title}: " + ", ".join(f"{row.iloc[0]} {row['spread']:.0%}" for _, row in
                                     frame[frame["spread"] > BUSY_SPREAD].iterrows())
            for title, frame in tables.items() if (frame["spread"] > BUSY_SPREAD).any()]
    if not busy:
        return ""
    return (f"warning: the machine was busy while timing (spread IQR/median above {BUSY_SPREAD:.0%} for "
            f"{'; '.join(busy)}); these times are unreliable, time again on an idle machine")


def require_device(device: str) -> None:
    """asv skips a parameter combination whose setup raises NotImplementedError."""
    if device == "cuda" and not torch.cuda.is_available():
        raise NotImplementedError("no CUDA device here")


def estimator_throughput(estimators, log_p: torch.Tensor, log_q: torch.Tensor) -> pd.DataFrame:
    """Median time of each ``(name, fn)`` on the given log-probs, its spread, and its ratio to one exp and one log
    pass over as many elements."""
    floor = timed(lambda: torch.log(torch.exp(log_q)))
    rows = []
    for name, fn in estimators:
        t = timed(lambda: fn(log_p, log_q))
        rows.append({"estimator": name, "samples": log_p.numel(), "ms": 1e3 * t.seconds,
                     "× floor": t.seconds / floor.seconds, "spread": _spread(t, floor)})
    return pd.DataFrame(rows)


def study_throughput(replicates: int = 10 ** 4, n: int = 1000, seed: int = 0, repeat: int = 5) -> pd.DataFrame:
    """A whole study of k1, k2 and k3 on gauss-shift-1 (``replicates`` × ``n`` samples each, every estimator
    drawing its own) against floors of as many draws + one exp + one log pass, in float64 (the dtype the
    ground-truth models draw in, the floor that counts) and in float32 (bare torch's cheapest); ``repeat`` calls each
    (a study takes seconds)."""
    config = StudyConfig(("gauss-shift-1",), ("k1", "k2", "k3"), (n,), replicates, seed)
    t = timed(lambda: run_study(config, progress=False), repeat)
    samples = 3 * replicates * n
    floors = {str(dtype).removeprefix("torch."): sample_floor(replicates * n, dtype, repeat)
              for dtype in (torch.float64, torch.float32)}
    return pd.DataFrame([{"work": f"study of k1, k2, k3 ({replicates} × {n})", "samples": samples, "s": t.seconds,
                          "floor": f"{dtype} draws + exp + log", "floor s": 3 * floor.seconds,
                          "× floor": t.seconds / (3 * floor.seconds), "spread": _spread(t, floor)}
                         for dtype, floor in floors.items()])


def throughput_tables(estimators, seed: int = 0) -> dict[str, pd.DataFrame]:
    """The CPU throughput tables of the report and of ``estbench throughput``: each ``(name, fn)`` estimator on
    10⁶ float32 log-prob pairs of gauss-shift-1, a whole study, and the vocabulary KL, each against its floor."""
    case = get_case("gauss-shift-1")
    lp, lq = case.draw(10 ** 6, seeded(seed, "throughput", device=case.device))
    return {"estimators": estimator_throughput(estimators, lp.float(), lq.float()),
            "study": study_throughput(seed=seed), "vocabulary KL": vocab_throughput(seed=seed)}


def logit_pair(rows: int, vocab: int, dtype: torch.dtype = torch.float32, device: str = "cpu",
               seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Two ``[rows, vocab]`` logit tensors for timing the vocabulary KL: a ~ N(0, 1) and b = a + 0.3·N(0, 1),
    drawn in float32 and cast to ``dtype``."""
    g = torch.Generator(device=device).manual_seed(seed)
    a = torch.randn(rows, vocab, generator=g, device=device)
    b = a + 0.3 * torch.randn(rows, vocab, generator=g, device=device)
    return a.to(dtype), b.to(dtype)


def torch_token_kl(logits_p: torch.Tensor, logits_q: torch.Tensor) -> torch.Tensor:
    """The naive exact per-token KL in torch, the reference token_kl is timed against: ``log_softmax`` of both in
    float32, then ``kl_div`` (three full-size float32 temporaries)."""
    return F.kl_div(F.log_softmax(logits_q.float(), -1), F.log_softmax(logits_p.float(), -1), log_target=True,
                    reduction="none").sum(-1)


def vocab_throughput(rows: int = 64, vocab: int = 50257, seed: int = 0) -> pd.DataFrame:
    """token_kl against log_softmax + kl_div in torch and against one read of the logits, float32 [rows, vocab]."""
    a, b = logit_pair(rows, vocab, seed=seed)
    floor = read_floor(a, b)
    return pd.DataFrame([{"method": name, "shape": f"[{rows}, {vocab}]", "ms": 1e3 * t.seconds,
                          "× read floor": t.seconds / floor.seconds, "spread": _spread(t, floor)}
                         for name, t in (("token_kl", timed(lambda: token_kl(a, b))),
                                         ("log_softmax + kl_div", timed(lambda: torch_token_kl(a, b))))])


#: Peak memory bandwidth (bytes/s) from the vendor's data sheet, for cards whose properties torch does not report.
SPEC_BANDWIDTH = {"H100 80GB HBM3": 3.35e12, "H100 PCIe": 2.0e12, "H100 NVL": 3.9e12, "H200": 4.8e12,
                  "A100-SXM4-80GB": 2.039e12, "A100-SXM4-40GB": 1.555e12, "A100-PCIE-40GB": 1.555e12}


def peak_bandwidth(device: str = "cuda") -> float | None:
    """The card's peak memory bandwidth in bytes/s: 2 (DDR) × memory clock × bus width where torch reports
    them, else the data sheet's figure for a known card name (:data:`SPEC_BANDWIDTH`), else None."""
    props = torch.cuda.get_device_properties(device)
    clock_khz, bus_bits = getattr(props, "memory_clock_rate", 0), getattr(props, "memory_bus_width", 0)
    if clock_khz and bus_bits:
        return 2 * clock_khz * 1e3 * bus_bits / 8
    return next((bw for name, bw in SPEC_BANDWIDTH.items() if name in props.name), None)


def liger_kl():
    """Liger-Kernel's KL loss on log-probabilities, ``f(log_q, log_p)`` (its per-row sums, then their sum;
    differentiable in ``log_q`` only), or None where ``liger-kernel`` is not installed: it is a benchmark-only
    comparison (``pip install liger-kernel``)."""
    try:
        from liger_kernel.transformers.kl_div import LigerKLDIVLoss
    except ImportError:
        return None
    return LigerKLDIVLoss(reduction="sum", log_target=True)


def compiled_torch_token_kl():
    """``torch.compile`` of :func:`torch_token_kl` (compiled at its first call, for each pass)."""
    return torch.compile(torch_token_kl)


#: Logit-sized tensors each pass moves at the least: the forward reads both logit tensors; forward + backward
#: reads them twice and writes both gradients.
PASSES = {"forward": 2, "forward + backward": 6}
#: The ratio columns of :func:`vocab_gpu_figures`: each time over that of this method in the same pass.
BASELINES = {"× Liger kernel": "Liger KL (kernel alone)", "× Liger from logits": "Liger KL (from logits)",
             "× torch.compile": "torch.compile(log_softmax + kl_div)", "× log_softmax + kl_div": "log_softmax + kl_div"}


def vocab_gpu_figures(rows: int = 16384, vocab: int = 131072, dtype: torch.dtype = torch.bfloat16,
                      seed: int = 0, repeat: int = 5, device: str = "cuda") -> pd.DataFrame:
    """Exact per-token KL from two ``[rows, vocab]`` logit tensors on the GPU, forward and forward + backward (the
    gradients of the summed KL): token_kl's Triton kernels and its torch path, against ``log_softmax`` + ``kl_div``
    in torch, eager and under ``torch.compile``, and Liger-Kernel's KL loss (where installed) on log-probabilities
    made beforehand (its kernel alone) and from logits (``log_softmax`` of both first). Liger differentiates its
    input (log q) only; the others give both gradients. Per method and pass: ms (median of ``repeat``) and its
    spread, GB/s of the least traffic of the pass (:data:`PASSES` · rows · vocab · itemsize bytes), the fraction of
    the card's peak bandwidth, and the time over each of :data:`BASELINES`. A comparison that fails (Liger's internals
    change between its releases; torch.compile needs a compiler) is left out, and ``frame.attrs`` says why.
    (``device="cpu"`` runs the same table on small shapes under Triton's interpreter: for tests.)"""
    require_device(device)
    a, b = logit_pair(rows, vocab, dtype, device, seed)
    required = {"token_kl (triton)": (partial(token_kl, backend="triton"), (a, b)),
                "token_kl (torch)": (partial(token_kl, backend="torch"), (a, b)),
                "log_softmax + kl_div": (torch_token_kl, (a, b))}
    optional = {"torch.compile(log_softmax + kl_div)": (compiled_torch_token_kl(), (a, b))}
    notes = {}
    liger = liger_kl()
    if liger is None:
        notes["Liger"] = "not installed (pip install liger-kernel)"
    else:
        log_p, log_q = (F.log_softmax(t.float(), -1).to(dtype) for t in (a, b))
        optional["Liger KL (kernel alone)"] = (liger, (log_q, log_p))
        optional["Liger KL (from logits)"] = (lambda x, y: liger(F.log_softmax(y, -1), F.log_softmax(x, -1)), (a, b))
    records = []
    for name, (fn, inputs) in {**required, **optional}.items():
        leaves = [t.detach().requires_grad_() for t in inputs]
        for work, run in (("forward", lambda: fn(*inputs)),
                          ("forward + backward", lambda: torch.autograd.grad(fn(*leaves).sum(), leaves,
                                                                             allow_unused=True))):
            try:
                run()                                      # compile and warm up outside the timing
            except Exception as err:
                if name in required:
                    raise
                notes[f"{name}, {work}"] = f"failed, left out: {type(err).__name__}: {err}"
                continue
            t = timed(run, repeat)
            records.append({"method": name, "pass": work, "ms": 1e3 * t.seconds, "spread": t.spread})
            if device == "cuda":
                torch.cuda.empty_cache()
    peak = peak_bandwidth(device) if device == "cuda" else None
    frame = pd.DataFrame(records)
    frame["GB/s"] = frame["pass"].map(PASSES) * rows * vocab * a.element_size() / (frame["ms"] / 1e3) / 1e9
    frame["of peak bandwidth"] = frame["GB/s"] * 1e9 / peak if peak else np.nan
    ms = frame.set_index(["pass", "method"])["ms"]
    for column, baseline in BASELINES.items():
        frame[column] = frame["ms"] / [ms.get((work, baseline), np.nan) for work in frame["pass"]]
    frame.attrs.update(card=torch.cuda.get_device_name(device) if device == "cuda" else device,
                       shape=f"[{rows}, {vocab}] {dtype}", peak_GBps=peak / 1e9 if peak else None, **notes)
    return frame
