"""The report's benchmark history (reports.history): asv's saved track_ results by commit, the commits where a
metric moved beyond its noise, the figure, and a one-line note where there are no results."""
from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import pytest
from asv.results import Results
from asv.runner import BenchmarkResult

from reports import ReportData, ReportPlan, history
from reports.html import render
from reports.study import run_study

MACHINE = "ci-box"


def write_results(results_dir: Path, series: dict[str, list[float]], machine: str = MACHINE,
                  commits: list[str] | None = None) -> None:
    """asv result files (written by asv's own Results) for ``commits`` (default: "000…", "111…", ...), one a day:
    ``series`` maps a benchmark to its value at each commit, every benchmark parametrised by two devices (cpu:
    value, cuda: 2 × value), beside a time_ benchmark that the history must leave out."""
    (results_dir / machine).mkdir(parents=True, exist_ok=True)
    (results_dir / machine / "machine.json").write_text(json.dumps({"machine": machine, "version": 1}))
    count = len(next(iter(series.values())))
    for i, commit in enumerate(commits or [str(i) * 40 for i in range(count)]):
        result = Results({"machine": machine, "python": "3.11"}, {}, commit, 1_700_000_000_000 + i * 86_400_000,
                         "3.11", "existing-py", {})
        for name, values in {**series, "bench_throughput.Study.time_study": [1e-3] * count}.items():
            benchmark = {"name": name, "params": [["'cpu'", "'cuda'"]], "version": "1"}
            pair = [values[i], 2 * values[i]]
            result.add_result(benchmark, BenchmarkResult(result=pair, samples=[[v] for v in pair], number=[1, 1],
                                                         errcode=0, stderr="", profile=None))
        result.save(str(results_dir))


STEADY = [1.0, 1.0, 1.0, 1.0, 1.0, 1.0]
NOISY = [2.0, 2.1, 1.9, 2.05, 1.95, 2.0]


def test_reads_every_track_metric_by_commit(tmp_path):
    write_results(tmp_path, {"bench_statistics.KL.track_rsd": STEADY,
                             "bench_throughput.X.track_time_over_floor": NOISY})
    frame = history.load_history(tmp_path)
    assert set(frame["benchmark"]) == {"bench_statistics.KL.track_rsd", "bench_throughput.X.track_time_over_floor"}
    assert len(frame) == 2 * 2 * 6 and set(frame["params"]) == {"'cpu'", "'cuda'"}
    assert list(frame["commit"].unique()) == [str(i) * 40 for i in range(6)]  # in commit-date order
    assert not frame["moved"].any()  # exact repeats and noise alone flag nothing


def test_flags_the_commit_where_a_metric_moved_beyond_its_noise(tmp_path):
    jump = NOISY[:4] + [4.0, 4.05]             # a 2× step at commit 4
    changed = STEADY[:3] + [1.01, 1.01, 1.01]  # a seeded statistic that changed at commit 3
    write_results(tmp_path, {"b.A.track_ratio": jump, "b.B.track_rsd": changed, "b.C.track_noise": NOISY})
    frame = history.load_history(tmp_path)
    flagged = frame[frame["moved"]]
    assert sorted(zip(flagged["benchmark"], flagged["commit"].str[-1], flagged["params"])) == [
        ("b.A.track_ratio", "4", "'cpu'"), ("b.A.track_ratio", "4", "'cuda'"),
        ("b.B.track_rsd", "3", "'cpu'"), ("b.B.track_rsd", "3", "'cuda'")]


def test_too_short_a_series_flags_nothing(tmp_path):
    write_results(tmp_path, {"b.A.track_ratio": [1.0, 1.0, 5.0]})
    assert not history.load_history(tmp_path)["moved"].any()


@pytest.mark.parametrize("setup, note", [
    (lambda d: None, "no track_ results"),
    (lambda d: d.mkdir(), "no track_ results"),
])
def test_absent_results_give_a_one_line_note(tmp_path, setup, note):
    setup(tmp_path / "results")
    frame = history.load_history(tmp_path / "results")
    assert frame.empty and note in frame.attrs["note"] and "\n" not in frame.attrs["note"]


def test_without_the_repository_the_note_says_so(tmp_path, monkeypatch):
    monkeypatch.setattr(history, "ASV_CONF", tmp_path / "asv.conf.json")
    frame = history.load_history()
    assert frame.empty and "installed without its repository" in frame.attrs["note"]


@pytest.fixture(scope="module")
def small_data():
    plan = ReportPlan(cases=("gauss-shift-1",), estimators=("k1", "k3"), ns=(10,), replicates=20, marginal_cases=())
    return ReportData(run_study(plan.kl_study(), progress=False), {"command": "pytest"})


def section(page: Path) -> str:
    text = page.read_text(encoding="utf-8")
    start = text.index('<section id="history">')
    return text[start:text.index("</section>", start)]


def test_report_section_draws_the_history_and_lists_flagged_commits(small_data, tmp_path):
    write_results(tmp_path / "results", {"b.A.track_ratio": NOISY[:4] + [4.0, 4.05], "b.C.track_noise": NOISY})
    data = replace(small_data, history=history.load_history(tmp_path / "results"))
    html = section(render(data, tmp_path / "report"))
    assert '<img src="figures/benchmark_history.png"' in html
    assert (tmp_path / "report" / "figures" / "benchmark_history.png").read_bytes()[:4] == b"\x89PNG"
    assert "6 commits" in html and "2 flagged" in html and "b.A.track_ratio" in html and "44444444" in html


def test_report_section_without_results_is_one_line(small_data, tmp_path):
    data = replace(small_data, history=history.load_history(tmp_path / "nothing"))
    html = section(render(data, tmp_path / "report"))
    assert "No benchmark history yet" in html and "<img" not in html and html.count("<p>") == 1
