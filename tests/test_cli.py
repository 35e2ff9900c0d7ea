"""The estbench command line: exit codes and outputs as the contract states them."""
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def estbench(*args, cwd=ROOT):
    return subprocess.run([sys.executable, "-m", "reports.cli", *args], capture_output=True, text=True, cwd=cwd,
                          timeout=600)


def test_cases_lists_every_case_with_its_stored_truth():
    from reports import case_table

    out = estbench("cases")
    assert out.returncode == 0
    for name, case in case_table.load().items():
        assert f"{case['truth']:<12.6g} {case['how']}" in next(l for l in out.stdout.splitlines() if l.startswith(name))


def test_train_reproduces_a_checkpoint_into_a_folder_not_the_shipped_one(tmp_path):
    """Without --out, train writes to ./estbench-checkpoints; the committed checkpoint is left untouched."""
    import json

    shipped = ROOT / "reference_models" / "checkpoints" / "fvsbn-bn.json"
    before = shipped.stat().st_mtime_ns, shipped.read_bytes()
    out = estbench("train", "fvsbn-bn", cwd=tmp_path)
    assert out.returncode == 0, out.stderr
    made = json.loads((tmp_path / "estbench-checkpoints" / "fvsbn-bn.json").read_text())
    assert made["fingerprint"] == pytest.approx(json.loads(before[1])["fingerprint"], rel=1e-6)
    assert (shipped.stat().st_mtime_ns, shipped.read_bytes()) == before


def test_train_replaces_the_shipped_checkpoints_only_when_asked(monkeypatch, capsys):
    from reference_models import train
    from reports.cli import main

    written = []
    monkeypatch.setattr(train, "train_all", lambda names, out, progress: written.append(out))
    assert main(["train", "fvsbn-bn", "--replace-shipped"]) == 0
    assert written == [train.CHECKPOINT_DIR]


def test_gate_holds_for_k3_and_reports_assumptions():
    out = estbench("gate", "--kl", "estimators.kl:k3", "--max-budget", str(2 ** 16))
    assert out.returncode == 0, out.stdout + out.stderr
    verdicts, line = out.stdout.splitlines()[-2:]
    assert verdicts.startswith("verdicts: ") and " caught, " in verdicts and " skipped" in verdicts
    assert line.startswith("HOLDS where its assumptions hold: estimators.kl:k3")
    for case in ("uniform-support", "vocab-50k-top-k", "seq-transformer-top-k"):  # E_p[q/p] < 1 on each
        assert f"% on {case}" in line
    assert "gate: importing torch, building the cases" in out.stderr  # progress before the chunks start


def test_strict_gate_fails_k3_on_broken_assumptions_with_its_own_code(tmp_path):
    from reports.verdicts import EXIT_STRICT

    out = estbench("gate", "--kl", "estimators.kl:k3", "--max-budget", str(2 ** 16), "--strict",
                   "--cases", "gauss-shift-1", "uniform-support")
    assert out.returncode == EXIT_STRICT == 3, out.stdout + out.stderr
    assert out.stdout.splitlines()[-1].startswith("STRICT FAIL: estimators.kl:k3 holds on 1 cell(s)")


def _readme_workflow() -> dict:
    import re

    import yaml

    text = (ROOT / "README.md").read_text()
    block = re.search(r"### In CI \(GitHub Actions\).*?```yaml\n(.*?)```", text, re.S).group(1)
    return yaml.safe_load(block)


def test_readme_ci_snippet_runs_and_its_files_read_back(tmp_path):
    """The README's workflow, as far as it runs here: its gate command on a user's module (on a small budget),
    then the files its later steps publish, read back with a JUnit reader and as JSON."""
    import json
    import shlex

    import junitparser

    steps = _readme_workflow()["jobs"]["gate"]["steps"]
    command = shlex.split(next(s["run"] for s in steps if s.get("run", "").startswith("estbench gate")))
    module, function = command[command.index("--kl") + 1].split(":")
    (tmp_path / module.replace(".", "/")).with_suffix(".py").parent.mkdir(parents=True)
    (tmp_path / module.replace(".", "/")).with_suffix(".py").write_text(f"from estimators.kl import k3 as {function}\n")
    cases = ["gauss-shift-1", "uniform-support", "gauss-var-wide-q"]
    out = estbench(*command[1:], "--max-budget", str(2 ** 16), "--cases", *cases, cwd=tmp_path)
    assert out.returncode == 0, out.stdout + out.stderr
    junit = next(s["with"]["report_paths"] for s in steps if "junit" in s.get("uses", ""))
    kept = next(s["with"]["path"] for s in steps if "upload-artifact" in s.get("uses", "")).split()
    assert junit in kept and all((tmp_path / f).is_file() for f in kept)
    (suite,) = junitparser.JUnitXml.fromfile(str(tmp_path / junit))
    assert suite.name == command[command.index("--kl") + 1] and [c.name for c in suite] == cases
    assert [type(c.result[0]).__name__ if c.result else "passed" for c in suite] == ["passed", "Skipped", "Skipped"]
    doc = json.loads((tmp_path / next(f for f in kept if f.endswith(".json"))).read_text())
    assert doc["exit_code"] == out.returncode and [c["verdict"] for c in doc["cells"]] == [
        "holds", "assumption", "unverifiable"]


def test_gate_catches_a_planted_bug_with_a_table():
    out = estbench("gate", "--kl", "reports.planted_bugs:k1_sign_flipped", "--max-budget", str(2 ** 16))
    assert out.returncode == 1
    assert "caught" in out.stdout and "CAUGHT" in out.stdout


@pytest.mark.parametrize("args, message", [
    (["gate", "--kl", "no_such_module:f"], "cannot import module"),
    (["gate", "--kl", "estimators.kl:no_such_function"], "has no attribute"),
    (["gate", "--kl", "estimators.kl"], "MODULE:FUNCTION"),
    (["gate", "--kl", "estimators.kl:k3", "--cases", "nope"], "unknown case"),
    (["report", "--estimators", "nope"], "unknown estimator"),
    (["report", "--replicates", "1"], "argument --replicates: must be between 2 and"),
    (["report", "--replicates", "0"], "argument --replicates: must be between 2 and"),
    (["report", "--replicates", "1e12"], "argument --replicates: expected an integer"),
    (["report", "--replicates", str(10 ** 12)], "argument --replicates: must be between 2 and"),
    (["report", "--n", "10", "10"], "argument --n: 10 given more than once"),
    (["report", "--n", "0"], "argument --n: must be between 1 and"),
    (["report", "--cases", "gauss-shift-1", "gauss-shift-1"], "argument --cases: gauss-shift-1 given more than once"),
    (["report", "--seed", "-1"], "argument --seed: must be at least 0"),
    (["report", "--out", "README.md"], "--out README.md: is an existing file"),
    (["gate", "--kl", "estimators.kl:k3", "--max-budget", "10"], "argument --max-budget: must be at least 1024"),
    (["gate", "--kl", "estimators.kl:k3", "--alpha", "0"], "argument --alpha: must be in (0, 1)"),
    (["gate", "--kl", "estimators.kl:k3", "--rel-bias", "-1"], "argument --rel-bias: must be in (0, inf)"),
    (["gate", "--kl", "estimators.kl:k3", "--timeout", "-1"], "argument --timeout: must be in [0, inf)"),
    (["gate", "--kl", "estimators.kl:k3", "--rel-bias", "inf"], "argument --rel-bias: must be a finite number"),
    (["gate", "--kl", "estimators.kl:k3", "--alpha", "nan"], "argument --alpha: must be a finite number"),
    (["gate", "--kl", "estimators.kl:k3", "--json", "reports"], "--json reports: is a folder"),
    (["gate", "--kl", "estimators.kl:k3", "--junit-xml", "README.md/x.xml"], "--junit-xml README.md/x.xml: "),
    (["throughput", "--rows", "0"], "argument --rows: must be at least 1"),
    (["train", "--out", "README.md"], "--out README.md: is an existing file"),
    (["train", "--out", "x", "--replace-shipped"], "argument --replace-shipped: not allowed with argument --out"),
    (["report", "--marginal-cases", "nope"], "unknown marginal case"),
    (["gate", "--marginal", "estimators.marginal:log_mean_exp", "--cases", "nope"], "unknown marginal case"),
    (["train", "nope"], "unknown recipe"),
])
def test_usage_errors_exit_2(args, message):
    out = estbench(*args)
    assert out.returncode == 2, out.stdout + out.stderr
    assert message in out.stderr
    assert "Traceback" not in out.stderr


def _read_only_folder(tmp_path) -> Path:
    """A folder this process cannot write into: a mode-0555 one, or (for root, who writes there anyway) /sys."""
    folder = tmp_path / "read-only"
    folder.mkdir(mode=0o555)
    try:
        (folder / "probe").touch()
    except OSError:
        return folder
    return Path("/sys")


@pytest.mark.parametrize("command, option", [("report", "--out"), ("train", "--out"), ("gate", "--junit-xml"),
                                             ("gate", "--json")])
def test_an_output_that_cannot_be_written_is_a_usage_error(tmp_path, command, option):
    target = _read_only_folder(tmp_path) / "estbench-out"
    gated = ["--kl", "estimators.kl:k3"] if command == "gate" else []
    out = estbench(command, *gated, option, str(target))
    assert out.returncode == 2 and f"{option} {target}: cannot write into" in out.stderr, out.stderr


def test_help_is_plain_text_and_explains_every_option():
    from reports.cli import _parser

    parser = _parser()
    commands = next(a for a in parser._actions if isinstance(a, __import__("argparse")._SubParsersAction)).choices
    for name, sub in commands.items():
        assert sub.description, f"{name} --help has no description"
        for action in sub._actions:
            assert action.help, f"{name} {'/'.join(action.option_strings) or action.dest} has no help"
        text = sub.format_help()
        assert "``" not in text and ":func:" not in text, text
    assert "``" not in parser.format_help() and ":mod:" not in parser.format_help()
    gate = commands["gate"].format_help()
    for needle in ("exit status", "  0  ", "  1  ", "  2  ", "  3  ", "log_p the log-prob of the sampling policy",
                   "x ~ p", "sequence cases"):
        assert needle in gate
    assert "every KL case" not in gate


def test_help_and_cases_do_not_import_torch():
    """--help and cases answer without torch, pandas or building a case (their wall time: README, below 1 s)."""
    code = ("import sys, contextlib, io\n"
            "from reports.cli import main\n"
            "with contextlib.redirect_stdout(io.StringIO()):\n"
            "    assert main(['cases']) == 0\n"
            "    for argv in (['--help'], ['gate', '--help'], ['report', '--help'], ['train', '--help']):\n"
            "        try: main(argv)\n"
            "        except SystemExit as e: assert e.code == 0\n"
            "print(sorted(m for m in ('torch', 'pandas', 'numpy', 'reference_models') if m in sys.modules))\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, timeout=60)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "[]"


def test_stored_case_table_matches_the_exact_computation():
    """The truths `estbench cases` prints are the registry's exact ones (rewrite: python -m reports.case_table)."""
    from reports import case_table

    stored, exact = case_table.load(), case_table.build()
    assert list(stored) == list(exact), "cases added or removed: run python -m reports.case_table"
    for name, case in exact.items():
        truth = case.pop("truth")
        assert stored[name].pop("truth") == pytest.approx(truth, rel=1e-12, abs=0), name
        assert stored[name] == case, name


def test_throughput_prints_each_table_against_its_floor():
    out = estbench("throughput")
    assert out.returncode == 0, out.stderr
    for needle in ("estimators:", "study:", "vocabulary KL:", "× floor", "float64 draws + exp + log", "k1_cv",
                   "log_softmax + kl_div", "× read floor", "spread"):
        assert needle in out.stdout
    assert "rao_blackwell" not in out.stdout  # sequence-only estimators have no per-token throughput


@pytest.mark.skipif(__import__("torch").cuda.is_available(), reason="checks the message on a machine without CUDA")
def test_throughput_gpu_without_cuda_is_a_usage_error():
    out = estbench("throughput", "--gpu")
    assert out.returncode == 2
    assert "needs a CUDA device" in out.stderr


def test_report_quick_writes_html(tmp_path):
    out = estbench("report", "--quick", "--cases", "gauss-shift-1", "uniform-support", "--out", str(tmp_path / "r"))
    assert out.returncode == 0, out.stderr
    assert (tmp_path / "r" / "index.html").is_file()
    assert "report written to" in out.stdout


def test_the_largest_n_the_command_line_accepts_fits_a_study_chunk():
    from reference_models import case_names, get_case
    from reports.cli import MAX_N
    from reports.study import CHUNK_ELEMENTS

    assert MAX_N * max(get_case(c).event_numel for c in case_names(kind="kl")) <= CHUNK_ELEMENTS
