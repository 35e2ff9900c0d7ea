"""The ``estbench`` command line: ``cases``, ``report``, ``gate``, ``throughput`` and ``train``."""
from __future__ import annotations

import argparse
import importlib
import os
import subprocess
import sys
import tempfile
from dataclasses import replace
from pathlib import Path

from reference_models import case_names, get_case

from .catalog import ESTIMATORS, KL_KINDS
from .report import DEFAULT_NS, QUICK_MARGINAL_KS, QUICK_NS, ReportPlan, default_report, run_report
from .stats import CAUGHT, HOLDS
from .usercode import SignatureMismatch, abandoned

EXIT_OK, EXIT_CAUGHT, EXIT_USAGE = 0, 1, 2
DEFAULT_TIMEOUT = 60.0  # seconds per call of a gated estimator (one chunk of up to 2^21 samples)
#: Set in the child process that runs a gate: the file where it leaves its exit status once it has a verdict.
GATE_STATUS = "ESTBENCH_GATE_STATUS"


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
        code = args.func(args)
    except (UsageError, SignatureMismatch) as err:
        print(f"estbench {args.command}: error: {err}", file=sys.stderr)
        code = EXIT_USAGE
    if args.command == "gate" and os.environ.get(GATE_STATUS):
        Path(os.environ[GATE_STATUS]).write_text(str(code))
    if abandoned():  # a user call still runs in a thread: torch code at interpreter shutdown could crash
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)
    return code


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="estbench", description=__doc__)
    sub = parser.add_subparsers(dest="command")

    cases = sub.add_parser("cases", help="list the named KL, sequence and marginal cases with their exact truth")
    cases.set_defaults(func=_cases)

    report = sub.add_parser("report", help="run a study and write an HTML bias/variance report")
    report.add_argument("--out", default="estbench-report", help="output directory (default: %(default)s)")
    report.add_argument("--cases", nargs="+", metavar="CASE",
                        help="KL and sequence cases to run (default: all); sequence cases run with n = 1 and "
                             f"{ReportPlan.sequence_factor}× the replicates")
    report.add_argument("--marginal-cases", nargs="+", metavar="CASE",
                        help=f"marginal-likelihood cases for the bias-vs-K study (default: "
                             f"{' '.join(case_names(kind='marginal', tag='report'))})")
    report.add_argument("--estimators", nargs="+", metavar="NAME", help="estimators (default: all built-ins)")
    report.add_argument("--n", nargs="+", type=int, metavar="N", help=f"samples per estimate (default: {DEFAULT_NS})")
    report.add_argument("--replicates", type=int, default=None, help="replicates per cell (default: 1000)")
    report.add_argument("--seed", type=int, default=0)
    report.add_argument("--quick", action="store_true",
                        help=f"smoke run: n in {QUICK_NS}, 100 replicates, K in {QUICK_MARGINAL_KS}")
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
    gate.add_argument("--timeout", type=float, default=DEFAULT_TIMEOUT,
                      help="seconds one call of the estimator may take before it is caught as hanging; 0: no limit "
                           "(%(default)s)")
    gate.set_defaults(func=_gate)

    speed = sub.add_parser("throughput", help="time the estimators, a study and the vocabulary KL against their floors")
    speed.add_argument("--gpu", action="store_true",
                       help="instead: the exact vocabulary KL on the GPU (Triton kernel, torch, log_softmax + kl_div, "
                            "Liger-Kernel where installed) in GB/s and against the card's peak bandwidth")
    speed.add_argument("--rows", type=int, default=16384, help="with --gpu: rows B·T (default: %(default)s)")
    speed.add_argument("--vocab", type=int, default=131072, help="with --gpu: vocabulary size (default: %(default)s)")
    speed.add_argument("--dtype", choices=["bfloat16", "float16", "float32"], default="bfloat16",
                       help="with --gpu: logit dtype (default: %(default)s)")
    speed.add_argument("--seed", type=int, default=0)
    speed.set_defaults(func=_throughput)

    train = sub.add_parser("train", help="retrain the reference checkpoints from their seeded recipes")
    train.add_argument("names", nargs="*", metavar="RECIPE", help="recipes to train (default: all)")
    train.add_argument("--out", default=None,
                       help="directory for the checkpoints (default: the package's own, replacing them)")
    train.set_defaults(func=_train)
    return parser


def _check_names(names, known, what) -> tuple[str, ...]:
    unknown = [n for n in names if n not in known]
    if unknown:
        raise UsageError(f"unknown {what} {', '.join(map(repr, unknown))}; known: {', '.join(known)}")
    return tuple(names)


def _cases(args) -> int:
    print("KL cases (x ~ p, KL(p‖q)) and sequence cases (x ~ p a whole sequence, per-token estimates summed):")
    for name in case_names(kind=KL_KINDS):
        case = get_case(name)
        broken = f"  [breaks: {', '.join(case.breaks)}]" if case.breaks else ""
        print(f"{name:28s} KL = {case.truth.value:<12.6g} {case.truth.describe()}{broken}")
        print(f"{'':28s} {case.description}")
    print("\nmarginal-likelihood cases (log importance weights, exact log p(x)):")
    for name in case_names(kind="marginal"):
        case = get_case(name)
        print(f"{name:28s} log p(x) = {case.log_marginal.value:<10.6g} {case.log_marginal.describe()}")
        print(f"{'':28s} {case.description}")
    return EXIT_OK


def _throughput(args) -> int:
    import pandas as pd
    import torch

    from . import throughput

    with pd.option_context("display.width", 200, "display.max_columns", 20):
        if not args.gpu:
            tables = throughput.throughput_tables([(name, spec.fn) for name, spec in ESTIMATORS.items()
                                                   if spec.form == "token"], args.seed)
            for title, frame in tables.items():
                print(f"{title}:\n{frame.to_string(index=False)}\n")
            print(throughput.busy_warning(tables) or f"timed with {throughput.TIMING_THREADS} intra-op thread, "
                  f"median of {throughput.REPEAT} calls; spread = IQR / median")
            return EXIT_OK
        if not torch.cuda.is_available():
            raise UsageError("--gpu needs a CUDA device, and torch sees none")
        if args.rows < 1 or args.vocab < 1:
            raise UsageError("--rows and --vocab must be positive")
        frame = throughput.vocab_gpu_figures(args.rows, args.vocab, getattr(torch, args.dtype), args.seed)
        print(", ".join(f"{k}: {v}" for k, v in frame.attrs.items()))
        print(frame.to_string(index=False))
    return EXIT_OK


def _train(args) -> int:
    from reference_models.train import CHECKPOINT_DIR, RECIPES, train_all

    names = list(_check_names(args.names, list(RECIPES), "recipe")) if args.names else None
    out = Path(args.out) if args.out else CHECKPOINT_DIR
    train_all(names, out, progress=True)
    print(f"checkpoints written to {out.resolve()}")
    return EXIT_OK


def _report(args) -> int:
    plan = default_report(quick=args.quick)
    try:
        plan = replace(plan, cases=_check_names(args.cases or plan.cases, plan.cases, "case"),
                       estimators=_check_names(args.estimators or plan.estimators, plan.estimators, "estimator"),
                       marginal_cases=_check_names(args.marginal_cases or plan.marginal_cases, case_names(kind="marginal"),
                                                   "marginal case"),
                       ns=tuple(args.n or plan.ns), replicates=args.replicates or plan.replicates, seed=args.seed,
                       command="estbench " + " ".join(args.argv))
    except ValueError as err:
        raise UsageError(str(err)) from err
    path = run_report(plan, args.out, progress=True, resume=not args.no_resume)
    print(f"report written to {path.resolve()}")
    return EXIT_OK


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
    from .catalog import EstimatorSpec
    from .gate import GateConfig, run_gate
    from .marginal_gate import MarginalGateConfig, run_marginal_gate

    name = args.kl or args.marginal
    form = "token" if args.kl else "log_weights"
    spec = EstimatorSpec(name, load_function(name), form=form)
    kinds = KL_KINDS if args.kl else "marginal"
    default = case_names(kind=kinds, tag="gate")
    cases = list(_check_names(args.cases or default, case_names(kind=kinds), "case" if args.kl else "marginal case"))
    timeout = args.timeout or None
    try:
        if args.kl:
            config = GateConfig(seed=args.seed, alpha=args.alpha, rel_bias=args.rel_bias, timeout=timeout,
                                chunk=min(GateConfig.chunk, args.max_budget), max_budget=args.max_budget)
        else:
            config = MarginalGateConfig(seed=args.seed, alpha=args.alpha, timeout=timeout)
    except ValueError as err:
        raise UsageError(str(err)) from err
    if not os.environ.get(GATE_STATUS):
        return _gate_in_child(args, name)
    result = (run_gate if args.kl else run_marginal_gate)([spec], cases, config, progress=True)
    print(result.table())
    counts = result.frame.verdict.value_counts().to_dict()
    attrs = result.frame.attrs
    print(f"\nfalse-alarm rate of this run: {config.alpha:g} (Bonferroni over {attrs['tests']} {attrs['test_unit']}; "
          f"{attrs['rule']})")
    print("verdicts: " + ", ".join(f"{k} {v}" for k, v in sorted(counts.items())))
    unit = "case(s)" if args.kl else "check(s)"
    if counts.get(CAUGHT):
        print(f"CAUGHT: {name} is wrong on {counts[CAUGHT]} {unit}: see the rows marked 'caught' above.")
        return EXIT_CAUGHT
    if not counts.get(HOLDS):
        print(f"UNVERIFIED: no {unit[:-3]} could check {name} (every one skipped or unverifiable, see the reasons "
              "above); the gate does not pass what it did not check.")
        return EXIT_CAUGHT
    holds = ("is consistent with the exact KL on every verifiable case" if args.kl
             else "is no more biased than log_mean_exp on every verifiable check")
    print(f"HOLDS: {name} {holds}.")
    return EXIT_OK


def _gate_in_child(args, name: str) -> int:
    """The same gate in a child process, so that an estimator that ends its process (``os._exit``, a crash)
    ends the child, never this verdict: a child that exits without leaving its status is caught."""
    with tempfile.TemporaryDirectory() as folder:
        status = Path(folder) / "status"
        child = subprocess.run([sys.executable, "-m", "reports.cli", *args.argv],
                               env={**os.environ, GATE_STATUS: str(status)})
        left = status.read_text() if status.exists() else None
    if left == str(child.returncode):
        return child.returncode
    print(f"CAUGHT: {name} ended the gate's process (exit status {child.returncode}) before it reached a verdict: "
          "os._exit or a crash in the estimator.")
    return EXIT_CAUGHT


if __name__ == "__main__":
    sys.exit(main())
