"""Throughput: time_ and peakmem_ of the estimators, a whole study and the vocabulary KL, with time / floor
ratios (track_, lower is better; medians of several calls) measured against floors in the same process. Every
benchmark here runs with the same fixed number of intra-op threads (``TIMING_THREADS``) and a steady allocator."""
import functools
import os

import torch

from estimators import kl
from estimators.vocab import token_kl
from reports.study import StudyConfig, run_study

from reports.throughput import (PASSES, TIMING_THREADS, logit_pair, read_floor, require_device, steady_allocator,
                                study_throughput, timed, torch_token_kl, vocab_gpu_figures)

torch.set_num_threads(TIMING_THREADS)  # asv times each benchmark in a process of its own, which imports this
steady_allocator()

#: ESTBENCH_ASV_SMOKE=1 (CI's dry run) keeps the small sizes only, so that a broken benchmark fails fast.
SMOKE = os.environ.get("ESTBENCH_ASV_SMOKE") == "1"
SIZES = [10 ** 3, 10 ** 4] if SMOKE else [10 ** 3, 10 ** 4, 10 ** 5, 10 ** 6, 10 ** 7]
DEVICES = ["cpu", "cuda"]


class Estimators:
    """Per-sample KL estimators on n float32 log-prob pairs."""

    params = (SIZES, ["k1", "k2", "k3", "k1_control_variate", "verl_low_var_kl"], DEVICES)
    param_names = ["n", "estimator", "device"]
    timeout = 120

    def setup(self, n, name, device):
        require_device(device)
        g = torch.Generator(device=device).manual_seed(0)
        self.log_p = -5 * torch.rand(n, generator=g, device=device)
        self.log_q = self.log_p + 0.1 * torch.randn(n, generator=g, device=device)
        self.fn = getattr(kl, name)

    def time_estimator(self, n, name, device):
        self.fn(self.log_p, self.log_q)
        if device == "cuda":
            torch.cuda.synchronize()

    def peakmem_estimator(self, n, name, device):
        self.fn(self.log_p, self.log_q)

    def track_time_over_floor(self, n, name, device):
        """Time / (one exp and one log pass over n elements)."""
        floor = timed(lambda: torch.log(torch.exp(self.log_q))).seconds
        return timed(lambda: self.fn(self.log_p, self.log_q)).seconds / floor

    track_time_over_floor.unit = "× floor"


class Study:
    """A whole study (sampling, exact log-densities, estimator, statistics) of k3 on gauss-shift-1 with
    N = replicates × n samples; the reference models live on the CPU."""

    params = SIZES
    param_names = ["samples"]
    timeout = 300

    def setup(self, samples):
        n = min(1000, samples // 2)
        self.config = StudyConfig(("gauss-shift-1",), ("k3",), (n,), samples // n, seed=0)

    def time_study(self, samples):
        run_study(self.config, progress=False)

    def peakmem_study(self, samples):
        run_study(self.config, progress=False)


class StudyFloor:
    """The issue's target: a 10⁴-replicate × n = 10³ study of k1, k2 and k3 on a Gaussian case, against
    floors of as many draws + exp + log (each estimator draws its own samples): in float64, the dtype the
    study's ground-truth models draw in (a float64 normal costs ~4× a float32 one on CPU; float32 Box–Muller
    cannot reach beyond ~5.8σ), and in float32, bare torch's cheapest."""

    timeout = 300
    replicates = 10 if SMOKE else 10 ** 4

    def setup(self):
        self.ratio = study_throughput(self.replicates).set_index("floor")["× floor"]

    def track_study_over_floor(self):
        return self.ratio["float32 draws + exp + log"]

    track_study_over_floor.unit = "× floor"

    def track_study_over_float64_floor(self):
        return self.ratio["float64 draws + exp + log"]

    track_study_over_float64_floor.unit = "× floor"


class VocabKL:
    """Exact per-token KL from two [rows, V] logit tensors: token_kl (vocabulary chunks) against
    log_softmax + kl_div in torch, and against one read of the logits."""

    params = ([50257] if SMOKE else [50257, 200000], ["float32", "bfloat16"], DEVICES)
    param_names = ["vocab", "dtype", "device"]
    rows = 64
    timeout = 300

    def setup(self, vocab, dtype, device):
        require_device(device)
        self.a, self.b = logit_pair(self.rows, vocab, getattr(torch, dtype), device)

    def _torch(self):
        return torch_token_kl(self.a, self.b)

    def time_token_kl(self, vocab, dtype, device):
        token_kl(self.a, self.b)

    def time_torch_reference(self, vocab, dtype, device):
        self._torch()

    def peakmem_token_kl(self, vocab, dtype, device):
        token_kl(self.a, self.b)

    def peakmem_torch_reference(self, vocab, dtype, device):
        self._torch()

    def track_time_over_torch(self, vocab, dtype, device):
        return timed(lambda: token_kl(self.a, self.b)).seconds / timed(self._torch).seconds

    track_time_over_torch.unit = "× torch"

    def track_time_over_read_floor(self, vocab, dtype, device):
        return timed(lambda: token_kl(self.a, self.b)).seconds / read_floor(self.a, self.b).seconds

    track_time_over_read_floor.unit = "× floor"


@functools.lru_cache(maxsize=None)
def _gpu_figures(shape: tuple[int, int]):
    """The GPU table, measured once per process for every pass and track."""
    return vocab_gpu_figures(*shape).set_index(["method", "pass"])


class VocabKLGPU:
    """The issue's GPU target at [16384, 131072] bf16, forward and forward + backward: token_kl's Triton kernels
    against the card's peak memory bandwidth (target: time ≤ 1/0.85 of moving the pass's least traffic at peak),
    Liger-Kernel's KL loss, its kernel alone and from logits (``pip install liger-kernel`` beside the suite, else
    those tracks are NaN), and log_softmax + kl_div under torch.compile and eager. Skipped without a GPU."""

    timeout = 1200
    shape = (256, 131072) if SMOKE else (16384, 131072)
    params = list(PASSES)
    param_names = ["pass"]

    def setup(self, pass_):  # measured in setup: asv's dry run does not hand setup_cache's value over
        require_device("cuda")
        self.triton = _gpu_figures(self.shape).loc[("token_kl (triton)", pass_)]

    def track_time_over_peak_bandwidth(self, pass_):
        return 1 / self.triton["of peak bandwidth"]

    track_time_over_peak_bandwidth.unit = "× ideal"

    def track_time_over_liger_kernel(self, pass_):
        return self.triton["× Liger kernel"]

    track_time_over_liger_kernel.unit = "× Liger"

    def track_time_over_liger_from_logits(self, pass_):
        return self.triton["× Liger from logits"]

    track_time_over_liger_from_logits.unit = "× Liger"

    def track_time_over_torch_compile(self, pass_):
        return self.triton["× torch.compile"]

    track_time_over_torch_compile.unit = "× torch.compile"

    def track_time_over_torch(self, pass_):
        return self.triton["× log_softmax + kl_div"]

    track_time_over_torch.unit = "× torch"
