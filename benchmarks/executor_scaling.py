"""A fixed study on the ``local`` executor and on Ray with 1 and 2 workers: the overhead Ray adds per chunk
and the speedup at 2 workers (a script, not an asv benchmark: asv's environments do not install Ray).

    OMP_NUM_THREADS=1 python -m benchmarks.executor_scaling [--repeats 5] [--workers 1 2]

Every run is on one torch thread per chunk (the driver's local run too), after one warm-up run per
executor (Ray's workers import torch once). Two studies:

- *overhead*: :data:`TINY` cut into chunks of 2^12 elements, whose work is ~nothing: the per-chunk
  overhead is (t_ray,1 − t_local) / chunks;
- *speedup*: :data:`FULL` in the default 2^21-element chunks: t_local, t_ray,w and t_ray,1 / t_ray,w.

It prints medians with the min–max spread over ``--repeats`` runs; each Ray run checks that its frame
equals the local one bit for bit.
"""
from __future__ import annotations

import argparse
import os
import statistics
import time

import pandas as pd
import torch

from reports import study
from reports.executors import make_executor
from reports.stats import LocalExecutor
from reports.study import StudyConfig, run_study

TINY = StudyConfig(("gauss-shift-1",), ("k1", "k3"), (100,), 4096, seed=0)  # 2 cells x 100 chunks of 2^12
FULL = StudyConfig(("gauss-shift-1", "near-identical"), ("k1", "k3"), (1000,), 16384, seed=0)  # 4 cells x 8 chunks
TINY_CHUNK = 2 ** 12


def _chunks(config: StudyConfig) -> int:
    counter = _Counting(LocalExecutor())
    run_study(config, progress=False, executor=counter)
    return counter.submitted


class _Counting:
    def __init__(self, inner):
        self.inner, self.slots, self.submitted = inner, inner.slots, 0

    def submit(self, task):
        self.submitted += 1
        return self.inner.submit(task)

    def finished(self):
        return self.inner.finished()

    def cancel(self):
        self.inner.cancel()


def _timed(config: StudyConfig, executor, repeats: int, expected: pd.DataFrame | None) -> list[float]:
    run_study(config, progress=False, executor=executor)  # warm-up
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        frame = run_study(config, progress=False, executor=executor)
        times.append(time.perf_counter() - start)
        if expected is not None:
            pd.testing.assert_frame_equal(frame, expected, check_exact=True)
    return times


def _show(label: str, times: list[float]) -> str:
    return f"{label}: median {statistics.median(times):.3f} s (min {min(times):.3f}, max {max(times):.3f})"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--workers", type=int, nargs="+", default=[1, 2])
    args = parser.parse_args()
    torch.set_num_threads(1)
    default_chunk = study.CHUNK_ELEMENTS
    results = {}
    for name, config, chunk in (("overhead", TINY, TINY_CHUNK), ("speedup", FULL, default_chunk)):
        study.CHUNK_ELEMENTS = chunk
        n = _chunks(config)
        expected = run_study(config, progress=False)
        results[name] = dict(chunks=n, local=_timed(config, LocalExecutor(), args.repeats, None))
        results[name]["expected"] = expected
    for w in args.workers:
        executor = make_executor("ray", num_cpus=w)
        for name, config, chunk in (("overhead", TINY, TINY_CHUNK), ("speedup", FULL, default_chunk)):
            study.CHUNK_ELEMENTS = chunk
            results[name][w] = _timed(config, executor, args.repeats, results[name]["expected"])
        executor.close()
    study.CHUNK_ELEMENTS = default_chunk
    print(f"load average (1, 5, 15 min) at the end: {', '.join(f'{x:.1f}' for x in os.getloadavg())} on "
          f"{os.cpu_count()} CPUs")
    for name, r in results.items():
        print(f"\n{name}: {r['chunks']} chunks")
        print("  " + _show("local, 1 thread", r["local"]))
        for w in args.workers:
            print("  " + _show(f"ray, {w} worker(s)", r[w]))
    med = {name: {k: statistics.median(v) for k, v in r.items() if k not in ("chunks", "expected")}
           for name, r in results.items()}
    tiny, full = med["overhead"], med["speedup"]
    if 1 in args.workers:
        print(f"\noverhead per chunk (median ray 1 worker − median local) / chunks: "
              f"{(tiny[1] - tiny['local']) / results['overhead']['chunks'] * 1e3:.2f} ms")
    print(f"chunk duration (speedup study, local): {full['local'] / results['speedup']['chunks'] * 1e3:.1f} ms")
    for w in args.workers:
        if w > 1 and 1 in args.workers:
            print(f"speedup at {w} workers: {full[1] / full[w]:.2f} over ray with 1, "
                  f"{full['local'] / full[w]:.2f} over local")

if __name__ == "__main__":
    main()
