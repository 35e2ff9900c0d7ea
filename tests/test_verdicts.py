"""The gate's output (reports/verdicts.py) on hand-made results of both gates' shapes: the exit status of every
mix of verdicts, the verdict lines, and the JUnit XML and JSON files read back with a JUnit reader."""
import json
import math

import junitparser
import pandas as pd
import pytest

from reports.gate import ASSUMPTION, CAUGHT, HOLDS, SKIPPED, UNVERIFIABLE, GateConfig, GateResult
from reports.marginal_gate import COLUMNS as MARGINAL_COLUMNS
from reports.marginal_gate import MarginalGateConfig
from reports.verdicts import EXIT_CAUGHT, EXIT_HOLDS, EXIT_STRICT, counts, exit_code, summary, write_json, write_junit

ATTRS = dict(tests=4, test_unit="tested cells", rule="|z| > 4.21 is caught")


def kl_result(*cells, name="my:k3") -> GateResult:
    """cells: (case, verdict, rel_bias)."""
    frame = pd.DataFrame([dict(estimator=name, case=c, verdict=v, n=1000, rel_bias=b, z=math.inf if v == CAUGHT
                               else 0.0, reason=f"why {c}") for c, v, b in cells])
    frame.attrs.update(ATTRS)
    return GateResult(frame, GateConfig())


K3_LIKE = [("gauss-shift-1", HOLDS, 0.001), ("uniform-support", ASSUMPTION, -0.7213),
           ("gauss-var-wide-q", UNVERIFIABLE, 0.01), ("seq-bn-vs-made", SKIPPED, math.nan)]


@pytest.mark.parametrize("verdicts, plain, strict", [
    ([HOLDS, SKIPPED], EXIT_HOLDS, EXIT_HOLDS),
    ([HOLDS, ASSUMPTION], EXIT_HOLDS, EXIT_STRICT),
    ([HOLDS, UNVERIFIABLE], EXIT_HOLDS, EXIT_STRICT),
    ([HOLDS, CAUGHT, ASSUMPTION], EXIT_CAUGHT, EXIT_CAUGHT),  # caught outranks strict
    ([UNVERIFIABLE, SKIPPED], EXIT_CAUGHT, EXIT_CAUGHT),  # nothing verified never passes
])
def test_exit_status(verdicts, plain, strict):
    result = kl_result(*[(f"case{i}", v, 0.0) for i, v in enumerate(verdicts)])
    assert (exit_code(result), exit_code(result, strict=True)) == (plain, strict)
    assert EXIT_STRICT not in (0, 1, 2)  # the contract's codes keep their meaning


def test_verdict_line_counts_every_kind_and_names_the_broken_cases():
    text = summary(kl_result(*K3_LIKE))
    assert "verdicts: 1 holds, 0 caught, 1 assumption, 1 unverifiable, 1 skipped" in text
    line = text.splitlines()[-1]
    assert line.startswith("HOLDS where its assumptions hold: my:k3 holds on 1 cell(s)")
    assert "biased by -72.1% on uniform-support, cases that break its assumptions" in line
    assert "unverifiable on gauss-var-wide-q" in line and "--strict fails these" in line
    strict = summary(kl_result(*K3_LIKE), strict=True).splitlines()[-1]
    assert strict.startswith("STRICT FAIL:") and "-72.1% on uniform-support" in strict


def test_caught_line_names_the_cells_and_their_bias():
    cells = [(f"case{i}", CAUGHT, -0.01 * i) for i in range(1, 11)] + [("uniform-support", ASSUMPTION, -0.72)]
    line = summary(kl_result(*cells)).splitlines()[-1]
    assert line.startswith("CAUGHT: my:k3 is wrong on 10 cell(s): -1.0% on case1")
    assert "and 2 more" in line and "also biased by -72.0% on uniform-support" in line
    assert summary(kl_result(("a", HOLDS, 0.0))).splitlines()[-1] == "HOLDS: my:k3 holds on every verifiable cell (1)."


def test_marginal_cells_are_named_by_check_case_and_k(tmp_path):
    frame = pd.DataFrame([dict(estimator="my:lme", check="below", case="gauss-2d", K=16, verdict=CAUGHT,
                               bias=-0.25, reason="more biased"),
                          dict(estimator="my:lme", check="range", case="extreme log-weights", K=100000,
                               verdict=HOLDS, bias=1e-9, reason="finite")])
    frame.attrs.update(ATTRS)
    result = GateResult(frame, MarginalGateConfig(), MARGINAL_COLUMNS)
    assert "-0.25 on below gauss-2d K=16" in summary(result)
    write_json(result, tmp_path / "marginal.json")
    assert json.loads((tmp_path / "marginal.json").read_text())["settings"]["Ks"] == list(MarginalGateConfig().Ks)


def test_junit_xml_reads_back_one_case_per_cell(tmp_path):
    for strict in (False, True):
        path = tmp_path / f"gate-{strict}.xml"
        write_junit(kl_result(*K3_LIKE), path, strict=strict)
        suites = list(junitparser.JUnitXml.fromfile(str(path)))
        assert [s.name for s in suites] == ["my:k3"]
        cases = {c.name: c for c in suites[0]}
        assert list(cases) == [c for c, _, _ in K3_LIKE] and {c.classname for c in cases.values()} == {"my:k3"}
        assert cases["gauss-shift-1"].is_passed
        assert cases["seq-bn-vs-made"].is_skipped
        for name in ("uniform-support", "gauss-var-wide-q"):
            (outcome,) = cases[name].result
            assert isinstance(outcome, junitparser.Failure if strict else junitparser.Skipped)
            assert outcome.message.endswith(f"why {name}")
        assert (suites[0].tests, suites[0].failures, suites[0].skipped) == ((4, 2, 1) if strict else (4, 0, 3))


def test_junit_failure_for_a_caught_cell(tmp_path):
    write_junit(kl_result(("heavy-ratio", CAUGHT, -0.26), ("a", HOLDS, 0.0)), tmp_path / "g.xml")
    (suite,) = junitparser.JUnitXml.fromfile(str(tmp_path / "g.xml"))
    (failure,) = next(iter(suite)).result
    assert isinstance(failure, junitparser.Failure) and failure.type == CAUGHT and "rel_bias = -0.26" in failure.text


def test_json_is_strict_json_with_every_cell(tmp_path):
    path = tmp_path / "gate.json"
    result = kl_result(*K3_LIKE, ("heavy-ratio", CAUGHT, -math.inf))
    write_json(result, path, strict=True)
    doc = json.loads(path.read_text(), parse_constant=lambda c: pytest.fail(f"non-JSON constant {c}"))
    assert doc["exit_code"] == EXIT_CAUGHT and doc["strict"] is True
    assert doc["counts"] == counts(result.frame) == {HOLDS: 1, CAUGHT: 1, ASSUMPTION: 1, UNVERIFIABLE: 1, SKIPPED: 1}
    assert doc["summary"] == summary(result, strict=True).splitlines()
    assert doc["settings"]["alpha"] == 1e-4 and doc["settings"]["rule"] == ATTRS["rule"]
    assert [c["case"] for c in doc["cells"]] == [c for c, _, _ in K3_LIKE] + ["heavy-ratio"]
    assert doc["cells"][-1]["rel_bias"] is None and doc["cells"][-1]["z"] is None  # ±inf and NaN as null
