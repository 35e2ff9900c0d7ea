"""Throughput against floors: the cost of the unavoidable work on the same number of elements, timed in
the same process, so that time / floor does not depend on the machine. Used by the asv suite and by the
report's throughput table."""
import time

import pandas as pd
import torch
import torch.nn.functional as F

from estimators.vocab import token_kl


def best_of(fn, repeat: int = 3) -> float:
    """The best wall time of ``repeat`` calls (seconds), synchronising CUDA."""
    times = []
    for _ in range(repeat):
        start = time.perf_counter()
        fn()
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    return min(times)


def sample_floor(n: int, device: str = "cpu", dtype=torch.float32) -> float:
    """Draw n standard normals and make one exp and one log pass over them: the least a study can do."""
    g = torch.Generator(device=device).manual_seed(0)

    def work():
        x = torch.randn(n, generator=g, device=device, dtype=dtype)
        torch.log(torch.exp(x))

    return best_of(work)


def read_floor(*tensors) -> float:
    """Read every element once (a sum per tensor): the least any exact vocabulary KL can do."""
    return best_of(lambda: [t.sum() for t in tensors])


def require_device(device: str) -> None:
    """asv skips a parameter combination whose setup raises NotImplementedError."""
    if device == "cuda" and not torch.cuda.is_available():
        raise NotImplementedError("no CUDA device here")


def estimator_throughput(estimators, log_p: torch.Tensor, log_q: torch.Tensor) -> pd.DataFrame:
    """Best-of-3 time of each ``(name, fn)`` on the given log-probs, and its ratio to one exp and one log
    pass over as many elements."""
    floor = best_of(lambda: torch.log(torch.exp(log_q)))
    rows = []
    for name, fn in estimators:
        seconds = best_of(lambda: fn(log_p, log_q))
        rows.append({"estimator": name, "samples": log_p.numel(), "ms": 1e3 * seconds, "× floor": seconds / floor})
    return pd.DataFrame(rows)


def vocab_throughput(rows: int = 64, vocab: int = 50257, seed: int = 0) -> pd.DataFrame:
    """token_kl against log_softmax + kl_div in torch and against one read of the logits, float32 [rows, vocab]."""
    g = torch.Generator().manual_seed(seed)
    a = torch.randn(rows, vocab, generator=g)
    b = a + 0.3 * torch.randn(rows, vocab, generator=g)

    def reference():
        return F.kl_div(F.log_softmax(b, -1), F.log_softmax(a, -1), log_target=True, reduction="none").sum(-1)

    floor = read_floor(a, b)
    return pd.DataFrame([{"method": name, "shape": f"[{rows}, {vocab}]", "ms": 1e3 * t, "× read floor": t / floor}
                         for name, t in (("token_kl", best_of(lambda: token_kl(a, b))),
                                         ("log_softmax + kl_div", best_of(reference)))])
