"""The ``estbench`` command line: ``cases``, ``report`` and ``gate``."""
from __future__ import annotations

import argparse
import importlib
import os
import platform
import subprocess
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

from reference_models import case_names, get_case

from .catalog import ESTIMATORS
from .study import StudyConfig, run_study

EXIT_OK, EXIT_CAUGHT, EXIT_USAGE = 0, 1, 2

DEFAULT_NS = (10, 100, 1000)
QUICK_NS = (10, 100)


class UsageError(Exception):
    """Bad command-line input: reported in one line, exit status 2."""


def main(argv: list[str] | None = None) -> int:
    parser = _parser()
    args = parser.parse_args(argv)
    args.argv = list(sys.argv[1:] if argv is None else argv)
    if args.command is None:
        parser.print_help()
        return EXIT_USAGE
    try:
        return args.func(args)
    except UsageError as err:
        print(f"estbench {args.command}: error: {err}", file=sys.stderr)
        return EXIT_USAGE


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="estbench", description=__doc__)
    sub = parser.add_subparsers(dest="command")

    cases = sub.add_parser("cases", help="list the named KL cases with their exact truth")
    cases.set_defaults(func=_cases)

    report = sub.add_parser("report", help="run a study and write an HTML bias/variance report")
    report.add_argument("--out", default="estbench-report", help="output directory (default: %(default)s)")
    report.add_argument("--cases", nargs="+", metavar="CASE", help="cases to run (default: all)")
    report.add_argument("--estimators", nargs="+", metavar="NAME", help="estimators (default: all built-ins)")
    report.add_argument("--n", nargs="+", type=int, metavar="N", help=f"samples per estimate (default: {DEFAULT_NS})")
    report.add_argument("--replicates", type=int, default=None, help="replicates per cell (default: 1000)")
    report.add_argument("--seed", type=int, default=0)
    report.add_argument("--quick", action="store_true", help=f"smoke run: n in {QUICK_NS}, 100 replicates")
    report.add_argument("--no-resume", action="store_true",
                        help="recompute every cell instead of reusing the finished ones in DIR/cells")
    report.set_defaults(func=_report)

    gate = sub.add_parser("gate", help="gate a user's estimator against every KL case; exit 1 if it is caught")
    which = gate.add_mutually_exclusive_group(required=True)
    which.add_argument("--kl", metavar="MODULE:FUNCTION", help="f(log_p, log_q) -> per-sample KL(p||q) estimates")
    which.add_argument("--marginal", metavar="MODULE:FUNCTION",
                       help="f(log_w[..., K]) -> log p_hat[...] (uses --cases, --seed, --alpha)")
    gate.add_argument("--cases", nargs="+", metavar="CASE", help="cases (default: all)")
    gate.add_argument("--seed", type=int, default=0)
    gate.add_argument("--alpha", type=float, default=1e-4, help="false-alarm rate of the whole run (%(default)s)")
    gate.add_argument("--rel-bias", type=float, default=0.02,
                      help="relative bias each case is sized to detect with probability 0.9 (%(default)s)")
    gate.add_argument("--max-budget", type=int, default=2 ** 26,
                      help="cap on samples x event size per case (%(default)s)")
    gate.set_defaults(func=_gate)
    return parser


def _check_names(names, known, what) -> tuple[str, ...]:
    unknown = [n for n in names if n not in known]
    if unknown:
        raise UsageError(f"unknown {what} {', '.join(map(repr, unknown))}; known: {', '.join(known)}")
    return tuple(names)


def _cases(args) -> int:
    for name in case_names():
        case = get_case(name)
        broken = f"  [breaks: {', '.join(case.breaks)}]" if case.breaks else ""
        print(f"{name:20s} KL = {case.truth.value:<12.6g} {case.truth.describe()}{broken}")
        print(f"{'':20s} {case.description}")
    return EXIT_OK


def _report(args) -> int:
    from .html import write_report  # seaborn/matplotlib only load for the report

    cases = _check_names(args.cases or case_names(), case_names(), "case")
    estimators = _check_names(args.estimators or list(ESTIMATORS), list(ESTIMATORS), "estimator")
    ns = tuple(args.n or (QUICK_NS if args.quick else DEFAULT_NS))
    replicates = args.replicates or (100 if args.quick else 1000)
    try:
        config = StudyConfig(cases, estimators, ns, replicates, args.seed)
    except ValueError as err:
        raise UsageError(str(err)) from err
    start = time.perf_counter()
    out = Path(args.out)
    cells = out / "cells"
    if args.no_resume and cells.exists():
        for f in cells.glob("*.json"):
            f.unlink()
    frame = run_study(config, progress=True, cache_dir=cells)
    meta = _provenance(args, config, time.perf_counter() - start)
    path = write_report(frame, out, meta, seed=config.seed)
    print(f"report written to {path.resolve()}")
    return EXIT_OK


def _provenance(args, config: StudyConfig, seconds: float) -> dict[str, str]:
    import numpy, pandas, scipy, torch  # noqa: E401  (versions only)

    try:
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                                cwd=Path(__file__).parent, timeout=5).stdout.strip() or "unknown"
    except (OSError, subprocess.SubprocessError):
        commit = "unknown"
    return {
        "command": "estbench " + " ".join(args.argv),
        "seed": str(config.seed), "replicates": str(config.replicates), "n": ", ".join(map(str, config.ns)),
        "study wall time": f"{seconds:.1f} s", "commit": commit,
        "date": datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "machine": f"{platform.node()} ({platform.machine()}, {os.cpu_count()} CPUs, {platform.platform()})",
        "versions": f"python {platform.python_version()}, torch {torch.__version__}, numpy {numpy.__version__}, "
                    f"pandas {pandas.__version__}, scipy {scipy.__version__}",
    }


def load_function(spec: str):
    """Import ``MODULE:FUNCTION`` (the current directory is importable), or raise UsageError."""
    module_name, sep, func_name = spec.partition(":")
    if not sep or not module_name or not func_name:
        raise UsageError(f"expected MODULE:FUNCTION, got {spec!r}")
    if os.getcwd() not in sys.path:
        sys.path.insert(0, os.getcwd())
    try:
        module = importlib.import_module(module_name)
    except Exception as err:  # any failure to import is the user's to fix: report it, exit 2
        raise UsageError(f"cannot import module {module_name!r}: {type(err).__name__}: {err}") from err
    func = module
    for part in func_name.split("."):
        func = getattr(func, part, None)
        if func is None:
            raise UsageError(f"module {module_name!r} has no attribute {func_name!r}")
    if not callable(func):
        raise UsageError(f"{spec} is not callable")
    return func


def _gate(args) -> int:
    from .gate import CAUGHT, GateConfig, GateEntry, run_gate

    if args.marginal:
        return _gate_marginal(args)
    fn = load_function(args.kl)
    cases = _check_names(args.cases or case_names(), case_names(), "case")
    try:
        config = GateConfig(seed=args.seed, alpha=args.alpha, rel_bias=args.rel_bias,
                            chunk=min(GateConfig.chunk, args.max_budget), max_budget=args.max_budget)
    except ValueError as err:
        raise UsageError(str(err)) from err
    result = run_gate([GateEntry(args.kl, fn)], list(cases), config, progress=True)
    print(result.table())
    frame = result.frame
    counts = frame.verdict.value_counts().to_dict()
    print(f"\nfalse-alarm rate of this run: {config.alpha:g} (Bonferroni over {len(frame)} cases; "
          f"|z| > {frame.z_crit.iloc[0]:.2f} is caught)")
    print("verdicts: " + ", ".join(f"{k} {v}" for k, v in sorted(counts.items())))
    if counts.get(CAUGHT):
        print(f"CAUGHT: {args.kl} is wrong on {counts[CAUGHT]} case(s): see the rows marked 'caught' above.")
        return EXIT_CAUGHT
    print(f"HOLDS: {args.kl} is consistent with the exact KL on every verifiable case.")
    return EXIT_OK


def _gate_marginal(args) -> int:
    from reference_models.marginal_cases import marginal_case_names

    from .gate import CAUGHT
    from .marginal_gate import DEFAULT_CASES, MarginalEntry, MarginalGateConfig, run_marginal_gate

    fn = load_function(args.marginal)
    cases = _check_names(args.cases or DEFAULT_CASES, marginal_case_names(), "marginal case")
    try:
        config = MarginalGateConfig(seed=args.seed, alpha=args.alpha)
    except ValueError as err:
        raise UsageError(str(err)) from err
    result = run_marginal_gate([MarginalEntry(args.marginal, fn)], list(cases), config, progress=True)
    print(result.table())
    frame = result.frame
    counts = frame.verdict.value_counts().to_dict()
    tests = int(frame.z_crit.notna().sum())
    print(f"\nfalse-alarm rate of this run: {config.alpha:g} (Bonferroni over {tests} one-sided z-tests, two looks "
          f"each; z beyond {frame.z_crit.max():.2f} on the tested side is caught)")
    print("verdicts: " + ", ".join(f"{k} {v}" for k, v in sorted(counts.items())))
    if counts.get(CAUGHT):
        print(f"CAUGHT: {args.marginal} fails {counts[CAUGHT]} check(s): see the rows marked 'caught' above.")
        return EXIT_CAUGHT
    print(f"HOLDS: {args.marginal} is no more biased than log_mean_exp on every verifiable check.")
    return EXIT_OK


if __name__ == "__main__":
    sys.exit(main())
