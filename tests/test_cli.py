"""The estbench command line: exit codes and outputs as the contract states them."""
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def estbench(*args, cwd=ROOT):
    return subprocess.run([sys.executable, "-m", "reports.cli", *args], capture_output=True, text=True, cwd=cwd,
                          timeout=600)


def test_cases_lists_every_case():
    from reference_models import case_names

    out = estbench("cases")
    assert out.returncode == 0
    for name in case_names():
        assert name in out.stdout


def test_train_reproduces_a_checkpoint_into_a_folder(tmp_path):
    import json

    out = estbench("train", "fvsbn-bn", "--out", str(tmp_path))
    assert out.returncode == 0, out.stderr
    made = json.loads((tmp_path / "fvsbn-bn.json").read_text())
    committed = json.loads((ROOT / "reference_models" / "checkpoints" / "fvsbn-bn.json").read_text())
    assert made["fingerprint"] == pytest.approx(committed["fingerprint"], rel=1e-6)


def test_gate_holds_for_k3_and_reports_assumptions():
    out = estbench("gate", "--kl", "estimators.kl:k3", "--max-budget", str(2 ** 16))
    assert out.returncode == 0, out.stdout + out.stderr
    assert "assumption" in out.stdout and "HOLDS" in out.stdout


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
    (["report", "--replicates", "1"], "replicates"),
    (["report", "--marginal-cases", "nope"], "unknown marginal case"),
    (["gate", "--marginal", "estimators.marginal:log_mean_exp", "--cases", "nope"], "unknown marginal case"),
    (["train", "nope"], "unknown recipe"),
])
def test_usage_errors_exit_2(args, message):
    out = estbench(*args)
    assert out.returncode == 2
    assert message in out.stderr


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
