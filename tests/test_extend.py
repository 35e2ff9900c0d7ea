"""Extending estbench touches no file of its own: a module that registers a new estimator and a new case sees
them in a study, a gate run and a report (README, "How to extend"). It runs in a fresh interpreter, so the
registrations do not leak into the other tests' registries."""
import subprocess
import sys
import textwrap
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

EXTENSION = textwrap.dedent('''
    import sys
    from dataclasses import replace

    from estimators import kl
    from reference_models import Gaussian, register_kl_case
    from reports import default_report, run_report
    from reports.catalog import EstimatorSpec, register_estimator
    from reports.gate import GateConfig, run_gate
    from reports.study import StudyConfig, run_study


    def half_k1_half_k3(log_p, log_q):
        """(k1 + k3)/2: unbiased wherever k3 is."""
        return 0.5 * kl.k1(log_p, log_q) + 0.5 * kl.k3(log_p, log_q)


    register_estimator(EstimatorSpec("half_k1_k3", half_k1_half_k3, "(k1 + k3)/2", unbiased=True, uses_ratio=True))
    register_kl_case("shift-0.3", lambda: (Gaussian(0.0, 1.0), Gaussian(0.3, 1.0)), "N(0,1) ‖ N(0.3,1), KL = 0.045")

    frame = run_study(StudyConfig(("shift-0.3",), ("k1", "half_k1_k3"), (10,), 200), progress=False)
    row = frame.set_index("estimator").loc["half_k1_k3"]
    assert abs(row.truth - 0.045) < 1e-12 and abs(row.bias) < 5 * row.bias_se, row

    gate = run_gate([EstimatorSpec("half_k1_k3", half_k1_half_k3)], ["shift-0.3"],
                    GateConfig(chunk=2 ** 16, max_budget=2 ** 18))
    assert gate.holds() and (gate.frame.verdict == "holds").all(), gate.table()

    plan = replace(default_report(quick=True), cases=("gauss-shift-0.1", "shift-0.3"), replicates=20,
                   marginal_cases=())
    assert "half_k1_k3" in plan.estimators and "shift-0.3" in default_report().cases
    page = run_report(plan, sys.argv[1], progress=False).read_text()
    assert page.count("half_k1_k3") >= 2 and page.count("shift-0.3") >= 2
    print("extension seen in the study, the gate and the report")
''')


def test_a_registered_estimator_and_case_appear_in_study_gate_and_report(tmp_path):
    script = tmp_path / "my_extension.py"
    script.write_text(EXTENSION)
    out = subprocess.run([sys.executable, str(script), str(tmp_path / "report")], capture_output=True, text=True,
                         cwd=ROOT, timeout=600)
    assert out.returncode == 0, out.stdout + out.stderr
    assert "extension seen" in out.stdout
