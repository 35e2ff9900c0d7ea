"""Studies: run each (case, estimator, n) many times against the exact truth, into a tidy frame.

A study is vectorized over replicates: samples are drawn as one tensor of shape [replicates, n] per
chunk, and the estimator is applied to the whole chunk. Chunks are cut by a rule that depends only on
n and the event size, and each is seeded from (seed, case, estimator, n, chunk), so that any executor,
one process or a cluster, gives identical numbers for the same seed.
"""
from __future__ import annotations

import hashlib
import json
import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from tqdm.auto import tqdm

from reference_models import KLCase, get_case

from .catalog import KL_KINDS, EstimatorSpec, get_estimator, per_sample_estimates

__all__ = ["StudyConfig", "chunk_seed", "draw", "run_study", "COLUMNS"]

#: Samples × event elements per chunk; fixed so that chunking never changes the numbers.
CHUNK_ELEMENTS = 2 ** 21

COLUMNS = ["case", "estimator", "n", "replicates", "seed", "truth", "truth_method", "expected", "mean", "bias",
           "bias_se", "rel_bias", "var", "rsd", "rmse", "frac_negative", "nonfinite", "breaks"]


@dataclass(frozen=True)
class StudyConfig:
    cases: tuple[str, ...]
    estimators: tuple[str, ...]
    ns: tuple[int, ...] = (10, 100, 1000)
    replicates: int = 1000
    seed: int = 0

    def __post_init__(self):
        if not self.cases:
            raise ValueError("cases must name at least one case")
        if not self.estimators:
            raise ValueError("estimators must name at least one estimator")
        for e in self.estimators:
            get_estimator(e)
        if any(isinstance(n, bool) or not isinstance(n, int) or n < 1 for n in self.ns) or not self.ns:
            raise ValueError(f"ns must be positive ints, got {self.ns!r}")
        if isinstance(self.replicates, bool) or not isinstance(self.replicates, int) or self.replicates < 2:
            raise ValueError(f"replicates must be an int ≥ 2, got {self.replicates!r}")


def chunk_seed(*parts) -> int:
    """A stable 63-bit seed from any printable parts (independent of Python's hash randomization)."""
    digest = hashlib.blake2b("|".join(map(str, parts)).encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") & (2 ** 63 - 1)


def draw(case: KLCase, size: int, seed: int, dtype: torch.dtype | None = None):
    """``case.draw`` of ``size`` samples from a generator on the case's device seeded with ``seed``."""
    return case.draw(size, torch.Generator(device=case.device).manual_seed(seed), dtype)


def _chunks(case: KLCase, n: int, replicates: int) -> list[int]:
    per_chunk = max(1, CHUNK_ELEMENTS // (n * case.event_numel))
    full, rest = divmod(replicates, per_chunk)
    return [per_chunk] * full + ([rest] if rest else [])


def _run_cell(case: KLCase, spec: EstimatorSpec, n: int, replicates: int, seed: int, bar) -> dict:
    means, negative, nonfinite = [], 0, 0
    for i, reps in enumerate(_chunks(case, n, replicates)):
        sample = draw(case, reps * n, chunk_seed(seed, case.name, spec.name, n, i))
        if isinstance(sample, tuple):  # the estimator sees [replicates, n]: its samples lie along the last dim
            sample = tuple(t.reshape(reps, n) for t in sample)
        est = per_sample_estimates(spec.fn, spec.form, sample).double().reshape(reps, n)
        means.append(est.mean(-1))
        negative += int(torch.count_nonzero(est < 0))
        if not bool(torch.isfinite(means[-1]).all()):  # finite float64 means prove every estimate finite
            nonfinite += int((~torch.isfinite(est)).sum())
        bar.update(1)
    m = torch.cat(means).numpy()
    truth = spec.target_value(case)
    mean = float(m.mean())
    var_of_mean = float(m.var(ddof=1))
    expected = spec.expected(case)
    breaks = {k: v for k, v in case.breaks.items() if spec.uses_ratio}
    return dict(
        case=case.name, estimator=spec.name, n=n, replicates=replicates, seed=seed, truth=truth,
        truth_method=getattr(case.moments, spec.target).describe(),
        expected=np.nan if expected is None else expected, mean=mean, bias=mean - truth,
        bias_se=math.sqrt(var_of_mean / replicates), rel_bias=(mean - truth) / abs(truth),
        var=n * var_of_mean, rsd=math.sqrt(n * var_of_mean) / abs(truth),
        rmse=float(np.sqrt(np.mean((m - truth) ** 2))), frac_negative=negative / (n * replicates),
        nonfinite=nonfinite, breaks="; ".join(breaks))


def _release() -> str:
    """The installed estbench version, part of the cache key so that a new release recomputes."""
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("estbench")
    except PackageNotFoundError:
        return "unknown"


def _cell_file(cache_dir: Path, release: str, case: str, estimator: str, n: int, replicates: int,
               seed: int) -> Path:
    key = chunk_seed(release, case, estimator, n, replicates, seed)
    return cache_dir / f"{case}__{estimator}__n{n}__r{replicates}__s{seed}__{key:016x}.json"


def run_study(config: StudyConfig, progress: bool = True, cache_dir: str | Path | None = None) -> pd.DataFrame:
    """Run every (case, estimator, n) of ``config``; one row each, columns :data:`COLUMNS`.

    With ``cache_dir``, each finished cell is written there as JSON and a rerun loads it instead of
    recomputing it, so an interrupted study resumes where it stopped (the numbers are the same either way:
    every chunk is seeded). The cache key holds the installed estbench version.

    ``var`` is n × the variance of the replicate means (the per-sample variance for i.i.d. estimators,
    and the honest equivalent for the leave-one-out control variate); ``rsd = √var / |truth|``;
    ``bias_se`` is the standard error of ``bias``. Cells whose target is infinite (the reverse KL on a
    support mismatch) are skipped and listed in ``frame.attrs["skipped"]``.
    """
    cases = [get_case(c, kind=KL_KINDS) for c in config.cases]
    specs = [get_estimator(e) for e in config.estimators]
    cells, skipped = [], []
    for case in cases:
        for spec in specs:
            target = getattr(case.moments, spec.target)
            if not spec.applies(case):
                why = "it mixes the samples of one estimate" if case.kind == "sequence" else "sequences only"
                skipped.append(f"{spec.name} on {case.name}: {why}")
                continue
            if not target.finite:
                skipped.append(f"{spec.name} on {case.name}: its target {spec.target} is infinite ({target.note})")
                continue
            cells += [(case, spec, n) for n in config.ns]
    cache = Path(cache_dir) if cache_dir is not None else None
    if cache is not None:
        cache.mkdir(parents=True, exist_ok=True)
    release = _release() if cache else None
    files = [_cell_file(cache, release, case.name, spec.name, n, config.replicates, config.seed) if cache else None
             for case, spec, n in cells]
    todo = [cell for cell, f in zip(cells, files) if f is None or not f.exists()]
    total = sum(len(_chunks(case, n, config.replicates)) for case, _, n in todo)
    rows = []
    with tqdm(total=total, desc="study", unit="chunk", disable=not progress) as bar:
        for (case, spec, n), f in zip(cells, files):
            if f is not None and f.exists():
                rows.append(json.loads(f.read_text()))
                continue
            bar.set_postfix_str(f"{case.name} {spec.name} n={n}", refresh=False)
            row = _run_cell(case, spec, n, config.replicates, config.seed, bar)
            if f is not None:
                tmp = f.with_suffix(".tmp")
                tmp.write_text(json.dumps(row))
                tmp.replace(f)  # atomic: an interrupted write leaves no half cell behind
            rows.append(row)
    frame = pd.DataFrame(rows, columns=COLUMNS)
    frame.attrs["skipped"] = skipped
    return frame
