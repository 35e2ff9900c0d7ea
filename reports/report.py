"""The report's policy and its data: what :func:`default_report` studies, and :func:`run_report`, which runs
the studies, the gradient gate on the built-in KL losses, the exact KL experiments and the timings into a
:class:`ReportData` and then renders it
(:func:`reports.html.render`)."""
from __future__ import annotations

import os
import platform
import subprocess
import time
from dataclasses import dataclass, replace
from datetime import datetime, timezone
from functools import partial
from pathlib import Path

import pandas as pd

from reference_models import case_names

from .cache import CellCache
from .catalog import KL_FORMS, KL_KINDS, estimator_names, get_estimator
from .gate import GateConfig
from .grad_gate import run_grad_gate
from .stats import Executor
from .plan_defaults import (DEFAULT_NS, MARGINAL_KS, QUICK_MARGINAL_KS, QUICK_NS, QUICK_REPLICATES, REPLICATES,
                            SEQUENCE_FACTOR)
from .study import COLUMNS, StudyConfig, run_study

__all__ = ["ReportPlan", "ReportData", "default_report", "collect", "run_report", "DEFAULT_NS", "QUICK_NS",
           "MARGINAL_KS", "QUICK_MARGINAL_KS", "MARGINAL_CASES"]

MARGINAL_CASES = tuple(case_names(kind="marginal", tag="report"))


def _split_cases(names: tuple[str, ...]) -> tuple[tuple[str, ...], tuple[str, ...]]:
    """(KL cases, sequence cases) among ``names``."""
    kl = set(case_names(kind="kl"))
    return tuple(c for c in names if c in kl), tuple(c for c in names if c not in kl)


@dataclass(frozen=True)
class ReportPlan:
    """What a report studies. ``estimators`` are catalog names: the KL study takes the per-token ones, the
    sequence study (n = 1, ``sequence_factor`` × ``replicates``) those that target KL(p‖q) and do not couple
    samples; the marginal study runs ``marginal_estimators`` on ``marginal_cases`` with ``marginal_factor`` ×
    ``replicates`` (no marginal study when ``marginal_cases`` is empty); the gradient gate runs ``losses`` on
``gradient_cases`` (none by default; :func:`default_report` takes every one tagged "report"), one chunk of
``gradient_budget`` tokens per cell. ``command`` is recorded as provenance.
    A ValueError names a bad field."""

    cases: tuple[str, ...]
    estimators: tuple[str, ...]
    ns: tuple[int, ...] = DEFAULT_NS
    replicates: int = REPLICATES
    seed: int = 0
    sequence_factor: int = SEQUENCE_FACTOR
    marginal_cases: tuple[str, ...] = MARGINAL_CASES
    marginal_estimators: tuple[str, ...] = ("log_mean_exp", "jackknife1", "jackknife2")
    marginal_ks: tuple[int, ...] = MARGINAL_KS
    marginal_factor: int = 2
    losses: tuple[str, ...] = tuple(estimator_names("loss"))
    gradient_cases: tuple[str, ...] = ()  # default_report: every gradient case tagged "report"
    gradient_budget: int = 2 ** 18  # tokens per (loss, case) cell: one chunk, the gate's pilot
    command: str = "reports.run_report"

    def __post_init__(self):  # a bad field raises here, before anything runs
        self.kl_study()
        self.sequence_study()
        self.gradient_gate()

    def kl_study(self) -> StudyConfig:
        """The KL cases × the per-token estimators."""
        kl_cases, _ = _split_cases(self.cases)
        if not kl_cases:
            raise ValueError("the report needs at least one KL case (see `estbench cases`)")
        est = tuple(e for e in self.estimators if get_estimator(e).form == "token")
        return StudyConfig(kl_cases, est, self.ns, self.replicates, self.seed)

    def gradient_gate(self) -> GateConfig | None:
        """The gradient gate's configuration for ``losses`` × ``gradient_cases`` (one chunk of
        ``gradient_budget`` tokens per cell); None without either."""
        if not (self.losses and self.gradient_cases):
            return None
        return GateConfig(seed=self.seed, chunk=self.gradient_budget, max_budget=self.gradient_budget)

    def sequence_study(self) -> StudyConfig | None:
        """The sequence cases × the estimators that target KL(p‖q) without coupling samples; None without either."""
        _, seq_cases = _split_cases(self.cases)
        est = tuple(e for e in self.estimators
                    if not get_estimator(e).couples_samples and get_estimator(e).target == "kl")
        return (StudyConfig(seq_cases, est, (1,), self.sequence_factor * self.replicates, self.seed)
                if seq_cases and est else None)


def default_report(quick: bool = False) -> ReportPlan:
    """Every KL and sequence case × every built-in estimator, n ∈ {10, 100, 1000}, 1000 replicates, and
    log-of-mean with the jackknifes on five marginal cases for K up to 1024, and every built-in KL loss through
    the gradient gate on every gradient case; ``quick``: a smoke run (n ∈ {10, 100}, 100 replicates, K ∈ {1, 4,
    16, 64})."""
    plan = ReportPlan(tuple(case_names(kind=KL_KINDS, tag="report")), tuple(estimator_names(*KL_FORMS)),
                      gradient_cases=tuple(case_names(kind="gradient", tag="report")))
    return replace(plan, ns=QUICK_NS, replicates=QUICK_REPLICATES, marginal_ks=QUICK_MARGINAL_KS) if quick else plan


@dataclass(frozen=True)
class ReportData:
    """Everything a report shows, computed before it is drawn: the KL study frame (:func:`reports.study.run_study`),
    the sequence and marginal study frames, the exact KL experiments (:func:`reports.experiments.run_all`),
    the throughput tables (:func:`reports.throughput.throughput_tables`), the benchmark history asv saved
    (:func:`reports.history.load_history`), the gradient gate's frame (:mod:`reports.grad_gate`) and the
    provenance (name -> text); ``seed`` seeds the per-sample figure. What is None is left out of the page and
    said so."""

    kl: pd.DataFrame
    provenance: dict[str, str]
    seed: int = 0
    sequences: pd.DataFrame | None = None
    marginal: pd.DataFrame | None = None
    experiments: dict | None = None
    throughput: dict[str, pd.DataFrame] | None = None
    history: pd.DataFrame | None = None
    gradients: pd.DataFrame | None = None

    def __post_init__(self):
        missing = [c for c in COLUMNS if c not in self.kl.columns]
        if missing or self.kl.empty:
            raise ValueError(f"kl must be a non-empty study frame; missing columns: {missing}")


def collect(plan: ReportPlan, cache_dir: str | Path | None = None, progress: bool = False,
            executor: Executor | None = None) -> ReportData:
    """Run ``plan``'s studies (their cells cached in ``cache_dir``, their chunks on ``executor``), the gradient
    gate, the experiments and the timings, and read the benchmark history."""
    from . import experiments, history, throughput

    start = time.perf_counter()
    study = partial(run_study, progress=progress, cache_dir=cache_dir, executor=executor)
    kl = study(plan.kl_study())
    seq_config = plan.sequence_study()
    seq = study(seq_config) if seq_config else None
    marginal_replicates = plan.marginal_factor * plan.replicates
    marginal = (study(StudyConfig(plan.marginal_cases, plan.marginal_estimators, plan.marginal_ks,
                                  marginal_replicates, plan.seed))
                if plan.marginal_cases else None)
    grad_config = plan.gradient_gate()
    grads = (run_grad_gate([get_estimator(e) for e in plan.losses], list(plan.gradient_cases), grad_config,
                           progress=progress, executor=executor).frame if grad_config else None)
    meta = _provenance(plan, time.perf_counter() - start)
    if grad_config:
        meta["gradient gate"] = (f"{len(plan.losses)} losses × {len(plan.gradient_cases)} cases, "
                                 f"{plan.gradient_budget} tokens per cell")
    if seq_config:
        meta["sequence study"] = (f"{len(seq_config.cases)} cases × {len(seq_config.estimators)} estimators, "
                                  f"n = 1, {seq_config.replicates} replicates")
    if marginal is not None:
        meta["marginal study"] = (f"{len(plan.marginal_cases)} cases, K ∈ "
                                  f"{{{', '.join(map(str, marginal['K'].unique()))}}}, {marginal_replicates} replicates")
    speed = throughput.throughput_tables([(e, get_estimator(e).fn) for e in kl["estimator"].unique()], plan.seed)
    return ReportData(kl, meta, plan.seed, seq, marginal, experiments.run_all(), speed, history.load_history(),
                      grads)


def run_report(plan: ReportPlan, out_dir: str | Path, progress: bool = True, resume: bool = True,
               executor: Executor | None = None) -> Path:
    """Run ``plan`` (its study chunks on ``executor``, default in process) and write ``out_dir/index.html``
    with its figures; finished study cells are kept in ``out_dir/cells`` and reused when ``resume`` (same
    seed, same numbers, on any executor). Returns the page's path."""
    from .html import render  # seaborn/matplotlib only load for the report

    cells = Path(out_dir) / "cells"
    if not resume and cells.exists():
        CellCache(cells).clear()
    return render(collect(plan, cells, progress, executor), out_dir)


def _provenance(plan: ReportPlan, seconds: float) -> dict[str, str]:
    import numpy, scipy, torch  # noqa: E401  (versions only)

    try:
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                                cwd=Path(__file__).parent, timeout=5).stdout.strip() or "unknown"
    except (OSError, subprocess.SubprocessError):
        commit = "unknown"
    return {
        "command": plan.command,
        "seed": str(plan.seed), "replicates": str(plan.replicates), "n": ", ".join(map(str, plan.ns)),
        "study wall time": f"{seconds:.1f} s", "commit": commit,
        "date": datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "machine": f"{platform.node()} ({platform.machine()}, {os.cpu_count()} CPUs, {platform.platform()})",
        "versions": f"python {platform.python_version()}, torch {torch.__version__}, numpy {numpy.__version__}, "
                    f"pandas {pd.__version__}, scipy {scipy.__version__}",
    }
