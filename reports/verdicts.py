"""What a gate run tells people and machines: the verdict lines, the exit status, JUnit XML and JSON.

Generic over :class:`reports.gate.GateResult`, whatever the gate (values, marginals, gradients): a frame
with one row per cell and the columns ``estimator``, ``verdict``, ``reason``, the cell's identifying
columns (those of ``result.columns`` before ``verdict``, e.g. ``case``, or ``check``, ``case``, ``K``) and,
where the gate measures them, ``rel_bias`` (relative) or ``bias`` (absolute); ``frame.attrs`` holds
``tests``, ``test_unit`` and ``rule``.

Exit status: 0 every verifiable cell holds; 1 a cell is caught, or no cell could be verified at all; 3
(``strict``) nothing is caught, but a cell is biased only because its case breaks the estimator's
assumptions (``assumption``) or cannot be verified (``unverifiable``). 2 is the command line's usage error.
"""
from __future__ import annotations

import dataclasses
import json
import math
import xml.etree.ElementTree as ET
from pathlib import Path

from .stats import ASSUMPTION, CAUGHT, HOLDS, SKIPPED, UNVERIFIABLE

__all__ = ["EXIT_HOLDS", "EXIT_CAUGHT", "EXIT_STRICT", "VERDICTS", "exit_code", "summary", "write_junit",
           "write_json"]

EXIT_HOLDS, EXIT_CAUGHT, EXIT_STRICT = 0, 1, 3
VERDICTS = (HOLDS, CAUGHT, ASSUMPTION, UNVERIFIABLE, SKIPPED)
STRICT_FAILS = (ASSUMPTION, UNVERIFIABLE)
_NAMED = 8  # cells named per verdict in a line; the rest are counted


def fails(verdict: str, strict: bool) -> bool:
    """Whether a cell with this verdict fails the run."""
    return verdict == CAUGHT or (strict and verdict in STRICT_FAILS)


def exit_code(result, strict: bool = False) -> int:
    """0, 1 or 3 as the module docstring states."""
    verdicts = set(result.frame.verdict)
    if CAUGHT in verdicts or HOLDS not in verdicts:
        return EXIT_CAUGHT
    return EXIT_STRICT if strict and verdicts & set(STRICT_FAILS) else EXIT_HOLDS


def counts(frame) -> dict[str, int]:
    """Cells per verdict, every verdict listed (0 included)."""
    found = frame.verdict.value_counts()
    return {v: int(found.get(v, 0)) for v in VERDICTS}


def summary(result, strict: bool = False) -> str:
    """The run's false-alarm rule, its counts, and one verdict line per estimator."""
    frame, attrs = result.frame, result.frame.attrs
    alpha = getattr(result.config, "alpha", None)
    lines = [f"false-alarm rate of this run: {alpha:g} (Bonferroni over {attrs['tests']} {attrs['test_unit']}; "
             f"{attrs['rule']})" if alpha is not None else attrs["rule"],
             "verdicts: " + ", ".join(f"{n} {v}" for v, n in counts(frame).items())]
    for name, rows in frame.groupby("estimator", sort=False):
        lines.append(_verdict_line(name, rows, _id_columns(result), strict))
    return "\n".join(lines)


def _verdict_line(name: str, rows, ids: list[str], strict: bool) -> str:
    def named(verdict: str) -> str:
        """The cells of this verdict, each with its bias where that means something."""
        cells = [f"{_effect(r) if verdict != UNVERIFIABLE else ''}{_cell_id(r, ids)}"
                 for r in rows[rows.verdict == verdict].itertuples()]
        more = f" and {len(cells) - _NAMED} more" if len(cells) > _NAMED else ""
        return ", ".join(cells[:_NAMED]) + more

    n = counts(rows)
    caveats = "; ".join(filter(None, [
        f"biased by {named(ASSUMPTION)}, cases that break its assumptions" if n[ASSUMPTION] else "",
        f"unverifiable on {named(UNVERIFIABLE)}" if n[UNVERIFIABLE] else ""]))
    if n[CAUGHT]:
        return (f"CAUGHT: {name} is wrong on {n[CAUGHT]} cell(s): {named(CAUGHT)} (rows marked 'caught' above)"
                + (f"; it is also {caveats}" if caveats else "") + ".")
    if not n[HOLDS]:
        return (f"UNVERIFIED: no cell could check {name} (each skipped or unverifiable, see the reasons above); "
                "the gate does not pass what it did not check.")
    if not caveats:
        return f"HOLDS: {name} holds on every verifiable cell ({n[HOLDS]})."
    if strict:
        return f"STRICT FAIL: {name} holds on {n[HOLDS]} cell(s), but it is {caveats} (see the reasons above)."
    where = "where its assumptions hold" if n[ASSUMPTION] else "where it can be verified"
    return (f"HOLDS {where}: {name} holds on {n[HOLDS]} cell(s); it is {caveats} (see the reasons above; "
            "--strict fails these).")


def _id_columns(result) -> list[str]:
    """The columns that name a cell besides its estimator: those shown before the verdict."""
    columns = list(result.columns)
    return [c for c in columns[:columns.index("verdict")] if c != "estimator" and c in result.frame]


def _cell_id(row, ids: list[str]) -> str:
    return " ".join(f"{c}={getattr(row, c)}" if c == "K" else str(getattr(row, c)) for c in ids)


def _effect(row) -> str:
    """"-72.1% on " (relative bias), "+0.031 on " (absolute) or nothing."""
    rel, bias = getattr(row, "rel_bias", math.nan), getattr(row, "bias", math.nan)
    if _finite(rel):
        return f"{rel:+.1%} on "
    return f"{bias:+.3g} on " if _finite(bias) else ""


def _finite(x) -> bool:
    return isinstance(x, (int, float)) and math.isfinite(x)


def write_junit(result, path: str | Path, strict: bool = False) -> None:
    """JUnit XML: a testsuite per estimator, a testcase per cell (classname the estimator, name the cell);
    caught cells fail, assumption and unverifiable ones are skipped (failed under ``strict``), as are
    skipped ones."""
    frame, ids = result.frame, _id_columns(result)
    root = ET.Element("testsuites", name="estbench gate")
    for name, rows in frame.groupby("estimator", sort=False):
        failures = sum(fails(v, strict) for v in rows.verdict)
        skipped = sum(not fails(v, strict) and v != HOLDS for v in rows.verdict)
        suite = ET.SubElement(root, "testsuite", name=str(name), tests=str(len(rows)), failures=str(failures),
                              errors="0", skipped=str(skipped))
        props = ET.SubElement(suite, "properties")
        for key, value in {**_settings(result), "strict": strict}.items():
            ET.SubElement(props, "property", name=key, value=str(value))
        for row in rows.itertuples():
            case = ET.SubElement(suite, "testcase", classname=str(name), name=_cell_id(row, ids))
            if row.verdict == HOLDS:
                continue
            tag = "failure" if fails(row.verdict, strict) else "skipped"
            ET.SubElement(case, tag, type=row.verdict, message=f"{row.verdict}: {row.reason}").text = (
                _details(row, frame.columns))
    ET.indent(root)
    ET.ElementTree(root).write(path, encoding="utf-8", xml_declaration=True)


def _details(row, columns) -> str:
    return "\n".join(f"{c} = {getattr(row, c)}" for c in columns if c not in ("estimator", "verdict"))


def write_json(result, path: str | Path, strict: bool = False) -> None:
    """One JSON object: the exit status, counts and verdict lines, the run's settings, and every cell (NaN and
    ±inf as null)."""
    frame = result.frame
    cells = json.loads(frame.to_json(orient="records", double_precision=15))
    doc = dict(exit_code=exit_code(result, strict), strict=strict, counts=counts(frame),
               summary=summary(result, strict).splitlines(), settings=_settings(result), cells=cells)
    Path(path).write_text(json.dumps(doc, indent=1, default=str, allow_nan=False) + "\n")


def _settings(result) -> dict:
    config = dataclasses.asdict(result.config) if dataclasses.is_dataclass(result.config) else {}
    return {k: _plain(v) for k, v in {**config, **result.frame.attrs}.items()}


def _plain(v):
    """A JSON value: numbers, strings and None as they are (a non-finite number as None), sequences as lists,
    anything else as text."""
    if isinstance(v, float) and not math.isfinite(v):
        return None
    if isinstance(v, (tuple, list)):
        return [_plain(x) for x in v]
    return v if isinstance(v, (int, float, str, type(None))) else str(v)
