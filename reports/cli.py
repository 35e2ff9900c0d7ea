"""The ``estbench`` command line: ``cases``, ``report``, ``gate``, ``throughput`` and ``train``.

Only the standard library is imported here: torch and the packages load where a command starts its work,
so that ``--help`` and ``cases`` (which reads the stored table of :mod:`reports.case_table`) answer at once.
"""
from __future__ import annotations

import argparse
import importlib
import math
import os
import subprocess
import sys
import tempfile
import textwrap
from pathlib import Path

from . import case_table
from .plan_defaults import DEFAULT_NS, QUICK_MARGINAL_KS, QUICK_NS, QUICK_REPLICATES, REPLICATES, SEQUENCE_FACTOR

EXIT_OK, EXIT_USAGE = 0, 2  # the gate's other codes: reports.verdicts
DEFAULT_TIMEOUT = 60.0  # seconds per call of a gated estimator (one chunk of up to 2^21 samples)
#: Set in the child process that runs a gate: the file where it leaves its exit status once it has a verdict.
GATE_STATUS = "ESTBENCH_GATE_STATUS"
MAX_REPLICATES = 10 ** 5  # 100× the default (whose report takes about a minute on 2 idle cores)
MAX_N = 10 ** 4  # samples per estimate: one estimate (n × event elements, 100 on gauss-100d) fits a study chunk (2^21)
MIN_BUDGET = 2 ** 10  # the gate's smallest chunk, in samples × event elements

DESCRIPTION = """\
Validate Monte Carlo estimators of KL divergences and marginal likelihoods against reference models whose
truth is exact: list the cases, write a bias/variance report, gate your own estimator in CI, time the
estimators, retrain the reference checkpoints."""

GATE_EPILOG = """\
direction: KL(p||q) is estimated from samples x ~ p. Your function is called as f(log_p, log_q), with
log_p the log-prob of the sampling policy p (the one that drew x) and log_q the reference's, as in RLHF
code; it returns one estimate per sample (same shape). On a sequence case it is applied to every token
and summed over the mask, as a KL penalty is.

cases: --kl runs the KL cases and the sequence cases tagged "gate" (see `estbench cases`); --marginal
runs the marginal cases tagged "gate" and a range check on extreme log-weights; --grad runs the gradient
cases tagged "gate" (a loss gets log_p [B, T] carrying the gradient, log_q, log_p_old of the policy that
sampled the tokens, and the mask; it passes where E_{x~p_old}[grad loss] = grad KL(p_theta||q)).

verdicts: holds (no bias beyond the z-test's critical value, sized to see a --rel-bias bias), caught
(biased, non-finite, raised, exited, hung, mutated its input or returned a wrong shape), assumption (biased
only because the case breaks an assumption of the estimator, e.g. q has mass outside p's support),
unverifiable (the variance is infinite or the tail too heavy for a z-test), skipped (does not apply).

exit status:
  0  every verifiable cell holds (assumption and unverifiable cells allowed, unless --strict)
  1  a cell is caught, or no cell could be verified at all
  2  usage error (a bad option value, a module that does not import, a function that cannot take the arguments)
  3  with --strict: nothing caught, but a cell is assumption or unverifiable"""


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
    except UsageError as err:
        print(f"estbench {args.command}: error: {err}", file=sys.stderr)
        code = EXIT_USAGE
    if args.command == "gate" and os.environ.get(GATE_STATUS):
        Path(os.environ[GATE_STATUS]).write_text(str(code))
    usercode = sys.modules.get(f"{__package__}.usercode")  # imported only by a command that ran user code
    if usercode is not None and usercode.abandoned():  # a user call still runs in a thread: torch code at
        sys.stdout.flush()                             # interpreter shutdown could crash
        sys.stderr.flush()
        os._exit(code)
    return code


def _int_in(low: int, high: int | None = None):
    """An argparse type: an integer in [low, high] (argparse names the option in its error)."""
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None
        if value < low or (high is not None and value > high):
            bound = f"at least {low}" if high is None else f"between {low} and {high}"
            raise argparse.ArgumentTypeError(f"must be {bound}, got {value}")
        return value
    return parse


def _float_in(low: float, high: float | None = None, low_open: bool = True):
    """An argparse type: a finite float in (low, high) (or [low, ...) when not ``low_open``)."""
    def parse(text: str) -> float:
        try:
            value = float(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
        if not math.isfinite(value):
            raise argparse.ArgumentTypeError(f"must be a finite number, got {text}")
        if not (value > low if low_open else value >= low) or (high is not None and not value < high):
            left = "(" if low_open else "["
            raise argparse.ArgumentTypeError(f"must be in {left}{low:g}, {'inf' if high is None else f'{high:g}'})"
                                             f", got {text}")
        return value
    return parse


class _Distinct(argparse.Action):
    """nargs="+" with no value given twice."""

    def __call__(self, parser, namespace, values, option_string=None):
        repeated = sorted({str(v) for v in values if values.count(v) > 1})
        if repeated:
            raise argparse.ArgumentError(self, f"{', '.join(repeated)} given more than once")
        setattr(namespace, self.dest, values)


def _wrap(text: str) -> str:
    return textwrap.fill(text, 100)


def _parser() -> argparse.ArgumentParser:
    fmt = argparse.RawDescriptionHelpFormatter  # keeps the epilogs' layout; descriptions are wrapped by _wrap
    parser = argparse.ArgumentParser(prog="estbench", description=DESCRIPTION, formatter_class=fmt,
                                     epilog="`estbench COMMAND --help` explains a command and its options.")
    sub = parser.add_subparsers(dest="command", title="commands", metavar="COMMAND")
    seed = dict(type=_int_in(0), default=0, help="seed of every draw; same seed, same numbers (default: %(default)s)")

    about = "list the named KL, sequence and marginal cases with their exact truth and how it was obtained"
    cases = sub.add_parser("cases", help=about, description=_wrap(about + " (stored with the cases; `python -m "
                           "reports.case_table` rewrites the table after a case changes)."), formatter_class=fmt)
    cases.set_defaults(func=_cases)

    about = "run a study and write an HTML bias/variance report"
    report = sub.add_parser("report", help=about, formatter_class=fmt, description=_wrap(
        f"{about}: every built-in estimator on every case tagged \"report\", n in {' '.join(map(str, DEFAULT_NS))}, "
        f"{REPLICATES} replicates per cell, the marginal-likelihood study, the experiments and the throughput "
        "tables. Finished cells are kept in OUT/cells, so an interrupted run resumes with the same numbers."))
    report.add_argument("--out", default="estbench-report", metavar="DIR",
                        help="output folder, created if needed (default: %(default)s)")
    report.add_argument("--cases", nargs="+", action=_Distinct, metavar="CASE",
                        help=f"KL and sequence cases to study (default: those tagged \"report\"); sequence cases run "
                             f"with n = 1 and {SEQUENCE_FACTOR}x the replicates")
    report.add_argument("--marginal-cases", nargs="+", action=_Distinct, metavar="CASE",
                        help="marginal-likelihood cases of the bias-vs-K study (default: "
                             f"{' '.join(case_table.names('marginal', 'report'))})")
    report.add_argument("--estimators", nargs="+", action=_Distinct, metavar="NAME",
                        help="built-in estimators to study (default: all)")
    report.add_argument("--n", nargs="+", action=_Distinct, type=_int_in(1, MAX_N), metavar="N",
                        help=f"samples per estimate, distinct, each in [1, {MAX_N}] (default: "
                             f"{' '.join(map(str, DEFAULT_NS))})")
    report.add_argument("--replicates", type=_int_in(2, MAX_REPLICATES), default=None, metavar="R",
                        help=f"estimates per cell, in [2, {MAX_REPLICATES}] (default: {REPLICATES}; {QUICK_REPLICATES} "
                             "with --quick)")
    report.add_argument("--seed", **seed)
    report.add_argument("--quick", action="store_true",
                        help=f"smoke run: n in {QUICK_NS}, {QUICK_REPLICATES} replicates, K in {QUICK_MARGINAL_KS}")
    report.add_argument("--no-resume", action="store_true",
                        help="recompute every cell instead of reusing the finished ones in OUT/cells")
    _add_executor_options(report)
    report.set_defaults(func=_report)

    about = "gate your own estimator against the exact truth of every case; exit 1 if it is caught"
    gate = sub.add_parser("gate", help=about, description=_wrap(about + "."), epilog=GATE_EPILOG, formatter_class=fmt)
    which = gate.add_mutually_exclusive_group(required=True)
    which.add_argument("--kl", metavar="MODULE:FUNCTION",
                       help="f(log_p, log_q) -> per-sample estimates of KL(p||q), x ~ p (the current folder is "
                            "importable)")
    which.add_argument("--marginal", metavar="MODULE:FUNCTION",
                       help="f(log_w[..., K]) -> log p_hat[...], an estimate of log p(x) from K importance weights "
                            "(uses --cases, --seed, --alpha, --timeout)")
    which.add_argument("--grad", metavar="MODULE:FUNCTION",
                       help="a KL loss f(log_p, log_q, log_p_old, mask) -> loss[B], one per sequence: is its expected "
                            "gradient E_{x~p_old}[grad loss] the exact grad KL(p_theta||q)? On the gradient cases, "
                            "on- and off-policy")
    gate.add_argument("--cases", nargs="+", action=_Distinct, metavar="CASE",
                      help="cases to run (default: those tagged \"gate\", see `estbench cases`)")
    gate.add_argument("--seed", **seed)
    gate.add_argument("--alpha", type=_float_in(0, 1), default=1e-4,
                      help="false-alarm rate of the whole run, in (0, 1) (default: %(default)s)")
    gate.add_argument("--rel-bias", type=_float_in(0), default=0.02,
                      help="relative bias each KL cell is sized to detect with probability 0.9 (default: %(default)s)")
    gate.add_argument("--max-budget", type=_int_in(MIN_BUDGET), default=2 ** 26, metavar="M",
                      help=f"cap on samples x event size per KL case, at least {MIN_BUDGET} (default: %(default)s)")
    gate.add_argument("--timeout", type=_float_in(0, low_open=False), default=DEFAULT_TIMEOUT, metavar="SECONDS",
                      help="seconds one call of the estimator may take before it is caught as hanging; 0: no limit "
                           "(default: %(default)s)")
    gate.add_argument("--strict", action="store_true",
                      help="also fail (exit 3) where a case breaks the estimator's assumptions or cannot verify it")
    gate.add_argument("--junit-xml", metavar="PATH",
                      help="write the verdicts as JUnit XML (a test case per estimator x case) for a CI system")
    gate.add_argument("--json", metavar="PATH",
                      help="write the verdicts, counts, verdict line and settings as JSON for scripts")
    _add_executor_options(gate)
    gate.set_defaults(func=_gate)

    about = "time the estimators, a study and the vocabulary KL against their floors"
    speed = sub.add_parser("throughput", help=about, description=_wrap(about + " (on the CPU; --gpu: on the GPU)."),
                           formatter_class=fmt)
    speed.add_argument("--gpu", action="store_true",
                       help="instead: the exact vocabulary KL on the GPU (Triton kernel, torch, log_softmax + kl_div, "
                            "Liger-Kernel where installed) in GB/s and against the card's peak bandwidth")
    speed.add_argument("--rows", type=_int_in(1), default=16384,
                       help="with --gpu: rows B*T (default: %(default)s)")
    speed.add_argument("--vocab", type=_int_in(1), default=131072,
                       help="with --gpu: vocabulary size (default: %(default)s)")
    speed.add_argument("--dtype", choices=["bfloat16", "float16", "float32"], default="bfloat16",
                       help="with --gpu: logit dtype (default: %(default)s)")
    speed.add_argument("--seed", **seed)
    speed.set_defaults(func=_throughput)

    about = "retrain the reference checkpoints from their seeded recipes"
    train = sub.add_parser("train", help=about, formatter_class=fmt, description=_wrap(
        f"{about}. The checkpoints go into --out; the package's shipped ones are replaced only with "
        "--replace-shipped."))
    train.add_argument("names", nargs="*", metavar="RECIPE", help="recipes to train (default: all)")
    where = train.add_mutually_exclusive_group()
    where.add_argument("--out", default="estbench-checkpoints", metavar="DIR",
                       help="folder for the checkpoints, created if needed (default: %(default)s)")
    where.add_argument("--replace-shipped", action="store_true",
                       help="write into the package's own checkpoint folder, replacing the shipped checkpoints")
    train.set_defaults(func=_train)
    return parser


def _writable_folder(path: str, option: str) -> Path:
    """``path`` as a folder this process can write into (created if needed), or a UsageError naming ``option``."""
    folder = Path(path)
    if folder.exists() and not folder.is_dir():
        raise UsageError(f"{option} {path}: is an existing file, not a folder")
    try:
        folder.mkdir(parents=True, exist_ok=True)
        tempfile.TemporaryFile(dir=folder).close()
    except OSError as err:
        raise UsageError(f"{option} {path}: cannot write into {folder} ({err.strerror or err})") from None
    return folder


def _writable_file(path: str, option: str) -> Path:
    """``path`` as a file this process can write (its folder created if needed), or a UsageError naming ``option``."""
    file = Path(path)
    if file.is_dir():
        raise UsageError(f"{option} {path}: is a folder, not a file")
    try:
        _writable_folder(str(file.parent), option)
    except UsageError as err:
        raise UsageError(str(err).replace(f"{option} {file.parent}:", f"{option} {path}:", 1)) from None
    if file.exists() and not os.access(file, os.W_OK):
        raise UsageError(f"{option} {path}: the file is not writable")
    return file


#: reports.executors.EXECUTORS, named here so that building the parser imports no torch (a test checks they agree).
EXECUTORS = ("local", "ray")


def _add_executor_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--executor", choices=EXECUTORS, default="local",
                        help="where the chunks run: in this process, or on Ray (default: %(default)s)")
    parser.add_argument("--address", metavar="ADDR",
                        help="with --executor ray: the Ray cluster to join (default: $RAY_ADDRESS; neither: start "
                             "a local Ray runtime)")


def _executor(args):
    from .executors import ExecutorUnavailable, make_executor

    try:
        return make_executor(args.executor, args.address)
    except (ExecutorUnavailable, ValueError) as err:
        raise UsageError(str(err)) from err


def _check_names(names, known, what) -> tuple[str, ...]:
    unknown = [n for n in names if n not in known]
    if unknown:
        raise UsageError(f"unknown {what} {', '.join(map(repr, unknown))}; known: {', '.join(known)}")
    return tuple(names)


def _cases(args) -> int:
    table = case_table.load()
    groups = [(("kl", "sequence"), "KL cases (x ~ p, KL(p‖q)) and sequence cases (x ~ p a whole sequence, per-token "
                                   "estimates summed):"),
              (("marginal",), "marginal-likelihood cases (log importance weights, exact log p(x)):")]
    groups += [((kind,), f"{kind} cases:") for kind in dict.fromkeys(c["kind"] for c in table.values())
               if kind not in ("kl", "sequence", "marginal")]
    for number, (kinds, title) in enumerate(groups):
        print(("\n" if number else "") + title)
        for name, case in table.items():
            if case["kind"] not in kinds:
                continue
            broken = f"  [breaks: {', '.join(case['breaks'])}]" if case["breaks"] else ""
            quantity = case_table.QUANTITY.get(case["kind"], "truth")
            print(f"{name:28s} {quantity} = {case['truth']:<12.6g} {case['how']}{broken}")
            print(f"{'':28s} {case['description']}")
    return EXIT_OK


def _throughput(args) -> int:
    import pandas as pd
    import torch

    from . import throughput
    from .catalog import ESTIMATORS

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
        frame = throughput.vocab_gpu_figures(args.rows, args.vocab, getattr(torch, args.dtype), args.seed)
        print(", ".join(f"{k}: {v}" for k, v in frame.attrs.items()))
        print(frame.to_string(index=False))
    return EXIT_OK


def _train(args) -> int:
    from reference_models.train import CHECKPOINT_DIR, RECIPES, train_all

    names = list(_check_names(args.names, list(RECIPES), "recipe")) if args.names else None
    out = CHECKPOINT_DIR if args.replace_shipped else _writable_folder(args.out, "--out")
    train_all(names, out, progress=True)
    print(f"checkpoints written to {out.resolve()}")
    return EXIT_OK


def _report(args) -> int:
    from dataclasses import replace

    from reference_models import case_names

    from .report import default_report, run_report

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
    path = run_report(plan, _writable_folder(args.out, "--out"), progress=True, resume=not args.no_resume,
                      executor=_executor(args))
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
    """Check the output paths, then run the gate in a child process (:func:`_gate_in_child`): it imports the
    estimator and the cases, runs the gate, prints the table and the verdict lines and writes the files."""
    name = args.kl or args.marginal or args.grad
    outputs = {flag: _writable_file(path, flag) for flag, path in (("--junit-xml", args.junit_xml),
                                                                   ("--json", args.json)) if path}
    if not os.environ.get(GATE_STATUS):
        return _gate_in_child(args, name, outputs)
    from tqdm.auto import tqdm

    # Importing torch and building the cases (a sequence case enumerates every sequence) can take a minute on a
    # busy machine: a bar shows it from the start.
    with tqdm(desc="gate: importing torch, building the cases", unit="step", total=None) as bar:
        from reference_models import case_names, get_case

        from . import verdicts
        from .catalog import KL_KINDS, EstimatorSpec
        from .gate import GateConfig, run_gate
        from .grad_gate import GRAD_CONFIG, run_grad_gate
        from .marginal_gate import MarginalGateConfig, run_marginal_gate
        from .usercode import SignatureMismatch

        form, kinds, what, run = (("token", KL_KINDS, "case", run_gate) if args.kl else
                                  ("log_weights", "marginal", "marginal case", run_marginal_gate) if args.marginal else
                                  ("loss", "gradient", "gradient case", run_grad_gate))
        spec = EstimatorSpec(name, load_function(name), form=form)
        cases = list(_check_names(args.cases or case_names(kind=kinds, tag="gate"), case_names(kind=kinds), what))
        bar.total = 1 + len(cases)
        bar.update()
        for case in cases:
            bar.set_postfix_str(case)
            get_case(case)  # cached: the gate finds it built
            bar.update()
    timeout = args.timeout or None
    if args.marginal:
        config = MarginalGateConfig(seed=args.seed, alpha=args.alpha, timeout=timeout)
    else:
        chunk = (GateConfig if args.kl else GRAD_CONFIG).chunk
        config = GateConfig(seed=args.seed, alpha=args.alpha, rel_bias=args.rel_bias, timeout=timeout,
                            chunk=min(chunk, args.max_budget), max_budget=args.max_budget)
    try:
        result = run([spec], cases, config, progress=True, executor=_executor(args))
    except SignatureMismatch as err:
        raise UsageError(str(err)) from err
    print(result.table())
    print(verdicts.summary(result, args.strict))
    _write(result, outputs, args.strict)
    return verdicts.exit_code(result, args.strict)


def _write(result, outputs: dict[str, Path], strict: bool) -> None:
    from . import verdicts

    for flag, path in outputs.items():
        (verdicts.write_junit if flag == "--junit-xml" else verdicts.write_json)(result, path, strict)
        print(f"{flag}: wrote {path}")


def _gate_in_child(args, name: str, outputs: dict[str, Path]) -> int:
    """The same gate in a child process, so that an estimator that ends its process (``os._exit``, a crash)
    ends the child, never this verdict: a child that exits without leaving its status is caught, and the files
    asked for say so."""
    with tempfile.TemporaryDirectory() as folder:
        status = Path(folder) / "status"
        child = subprocess.run([sys.executable, "-m", "reports.cli", *args.argv],
                               env={**os.environ, GATE_STATUS: str(status)})
        left = status.read_text() if status.exists() else None
    if left == str(child.returncode):
        return child.returncode
    import pandas as pd

    from .gate import GateResult
    from .stats import CAUGHT
    from .verdicts import EXIT_CAUGHT

    why = (f"{name} ended the gate's process (exit status {child.returncode}) before it reached a verdict: "
           "os._exit or a crash in the estimator.")
    frame = pd.DataFrame([dict(estimator=name, case="the gate's process", verdict=CAUGHT, reason=why)])
    frame.attrs.update(tests=0, test_unit="cells", rule="no verdict: the process ended")
    _write(GateResult(frame, None), outputs, args.strict)
    print(f"CAUGHT: {why}")
    return EXIT_CAUGHT


if __name__ == "__main__":
    sys.exit(main())
