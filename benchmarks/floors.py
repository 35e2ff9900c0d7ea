"""Floors: the cost of the unavoidable work on the same number of elements, timed in the same process,
so that a benchmark's time / floor does not depend on the machine."""
import time

import torch


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
