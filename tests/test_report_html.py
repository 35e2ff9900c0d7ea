"""The HTML report (reports.report.collect, reports.html.render): a complete, self-contained page from a small
real study; its policy (default_report), its figure registry and its asv link."""
from __future__ import annotations

import json
import re
from dataclasses import replace
from html import unescape

import matplotlib.pyplot as plt
import pandas as pd
import pytest

import reports.html as report_html
from reports import ReportData, ReportPlan, default_report
from reports.catalog import ESTIMATORS as CATALOG
from reports.figures import save
from reports.report import collect

CASES = ("gauss-shift-1", "uniform-support", "vocab-50k-top-k")
ESTIMATORS = ("k1", "k3", "reverse_kl")
META = {"seed": "0", "command": "pytest", "versions": "test", "commit": "abc123", "machine": "ci",
        "date": "2024-01-01", "wall time": "1 s"}


@pytest.fixture(scope="module")
def data():
    plan = ReportPlan(cases=CASES, estimators=ESTIMATORS, ns=(10, 100), replicates=50, seed=0, marginal_cases=())
    return replace(collect(plan), provenance=META, history=None)  # the history is tested in test_history


@pytest.fixture(scope="module")
def page(data, tmp_path_factory):
    path = report_html.render(data, tmp_path_factory.mktemp("report"))
    return path, path.read_text(encoding="utf-8")


def test_page_names_every_case_and_estimator(page):
    path, text = page
    assert path.name == "index.html" and path.is_file()
    for name in CASES + ESTIMATORS:
        assert name in text


def test_sections_in_order(page):
    _, text = page
    ids = ["summary", "broken", "figures", "study", "provenance"]
    positions = [text.index(f'<section id="{i}">') for i in ids]
    assert positions == sorted(positions)
    for key, value in META.items():
        assert f"<th>{key}</th>" in text and value in text


def test_throughput_tables_give_ratios_to_their_floors(page):
    _, text = page
    speed = text[text.index('<section id="throughput">'):]
    speed = speed[:speed.index("</section>")]
    for needle in ("× floor", "study of k1, k2, k3", "float64 draws + exp + log", "float32 draws + exp + log",
                   "× read floor", "log_softmax + kl_div", "spread", "Median of"):
        assert needle in speed
    assert "do not depend on the machine" not in speed


def test_images_exist_and_are_png(page):
    path, text = page
    sources = re.findall(r'<img src="([^"]+)"', text)
    assert len(sources) == 5  # rsd, bias, per-sample, and the two seed experiments (no k1_cv nor heavy-ratio here)
    for src in sources:
        png = path.parent / src
        assert png.is_file() and png.stat().st_size > 0
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_self_contained(page):
    _, text = page
    assert "http://" not in text and "https://" not in text
    assert "<script src" not in text and "<link" not in text  # inline script only (table sorting)


def test_broken_assumptions_and_skipped_cells(page):
    _, text = page
    broken = text[text.index('<section id="broken">'):text.index('<section id="figures">')]
    assert "uniform-support" in broken and "vocab-50k-top-k" in broken
    assert "gauss-shift-1" not in broken
    assert "skipped: reverse_kl on uniform-support" in broken
    assert "skipped: reverse_kl on vocab-50k-top-k" in broken


def test_bad_frame_is_rejected():
    with pytest.raises(ValueError, match="frame"):
        ReportData(pd.DataFrame({"case": []}), META)


def test_summary_counts_consistent_cells(page):
    _, text = page
    summary = text[text.index('<section id="summary">'):text.index('<section id="broken">')]
    k1_row = summary[summary.index("<td>k1</td>"):]
    k1_row = k1_row[:k1_row.index("</tr>")]
    assert "<td>6 / 6</td>" in k1_row  # k1 is unbiased everywhere, its constant estimate on uniform-support too
    assert "median var / var(k1)" in summary and "median var / var(k3)" in summary


def test_sequence_and_marginal_sections(tmp_path):
    """With a sequence study and a marginal study the page gains their sections, figures and tables."""
    plan = ReportPlan(cases=("gauss-shift-1", "seq-bn-vs-made", "seq-transformer-top-k"),
                      estimators=("k1", "k3", "rao_blackwell"), ns=(10,), replicates=20, sequence_factor=10,
                      marginal_cases=("lognormal-0.5", "mixture-prior"),
                      marginal_estimators=("log_mean_exp", "jackknife1"), marginal_ks=(4, 16))
    data = collect(plan)
    assert data.sequences["replicates"].eq(200).all() and set(data.sequences["estimator"]) == {"k1", "k3",
                                                                                                 "rao_blackwell"}
    path = report_html.render(data, tmp_path)
    text = path.read_text(encoding="utf-8")
    for section in ("sequences", "marginal"):
        assert f'<section id="{section}">' in text
    for figure in ("sequence_variance.png", "loss_curves.png", "marginal_bias_vs_k.png"):
        assert f'src="figures/{figure}"' in text and (tmp_path / "figures" / figure).stat().st_size > 0
    assert "RB/k1 exact" in text and "measured / theory" in text and "1023" in text  # free-parameter table
    assert "Not drawn: Rao-Blackwellized" not in text
    assert "|bias| / |bias jackknife1|" in text


def test_a_registered_figure_is_numbered_and_one_without_its_data_is_listed(data, tmp_path, monkeypatch):
    """A figure registered here, without editing html.py, takes the next number with its caption; one whose
    data is missing is listed as not drawn, with its reason."""
    monkeypatch.setattr(report_html, "FIGURES", list(report_html.FIGURES))

    @report_html.figure("cases_per_estimator", "cells per estimator", "Cells per estimator in this study: {counts}.")
    def _cells(data, path):
        counts = data.kl["estimator"].value_counts(sort=False)
        fig, ax = plt.subplots()
        ax.bar(counts.index, counts.values)
        save(fig, path)
        return {"counts": ", ".join(f"{k} {v}" for k, v in counts.items())}

    report_html.figure("moon", "never drawn", "never shown", needs=lambda data: False,
                unavailable="the moon's KL (needs a moon in the study)")(lambda data, path: None)
    text = report_html.render(data, tmp_path).read_text(encoding="utf-8")
    # rsd, bias and per-sample are 1-3 (no k1_cv nor heavy-ratio here); the seed experiments follow it
    assert "Figure 4. Cells per estimator in this study: k1 6, k3 6, reverse_kl 2." in text
    assert '<img src="figures/cases_per_estimator.png" alt="cells per estimator">' in text
    assert (tmp_path / "figures" / "cases_per_estimator.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert text.index("Figure 4.") < text.index("Figure 5. A Gaussian fitted to the bimodal mixture")
    waiting = unescape(re.search(r'<p class="waiting">Not drawn: (.*?)\.</p>', text).group(1)).split("; ")
    assert waiting == ["control-variate variance reduction (needs k1_cv and k1 or k3 in the study)",
                       "the production clamps' bias (needs the heavy-ratio case and a clamped variant)",
                       "the moon's KL (needs a moon in the study)",
                       "Rao-Blackwellized KL on the sequence cases (no sequence case in this study)",
                       "log-of-mean bias vs K (no marginal study)",
                       "the benchmark history (no asv results read)"]
    assert "moon.png" not in text and not (tmp_path / "figures" / "moon.png").exists()


def test_default_report_policy():
    plan, quick = default_report(), default_report(quick=True)
    assert plan.ns == (10, 100, 1000) and plan.replicates == 1000 and plan.marginal_ks[-1] == 1024
    assert quick.ns == (10, 100) and quick.replicates == 100 and quick.marginal_ks == (1, 4, 16, 64)
    assert plan.marginal_estimators == ("log_mean_exp", "jackknife1", "jackknife2")
    kl, seq = plan.kl_study(), plan.sequence_study()
    assert set(kl.estimators) == {n for n, s in CATALOG.items() if s.form == "token"}
    assert "rao_blackwell" in seq.estimators and "k1_cv" not in seq.estimators and "reverse_kl" not in seq.estimators
    assert seq.ns == (1,) and seq.replicates == 20 * plan.replicates
    assert set(kl.cases).isdisjoint(seq.cases) and set(kl.cases) | set(seq.cases) == set(plan.cases)
    with pytest.raises(ValueError, match="at least one KL case"):
        replace(plan, cases=seq.cases)
    with pytest.raises(ValueError, match="replicates"):
        replace(plan, replicates=1)


def test_asv_link_from_the_project_configuration(tmp_path, monkeypatch):
    monkeypatch.setattr(report_html, "ASV_CONF", tmp_path / "asv.conf.json")
    assert "installed without its repository" in report_html._asv_link()
    (tmp_path / "asv.conf.json").write_text(json.dumps({"html_dir": "bench/html"}))
    assert "No asv history here yet" in report_html._asv_link()
    index = tmp_path / "bench" / "html" / "index.html"
    index.parent.mkdir(parents=True)
    index.write_text("<html></html>")
    assert f'href="{index.resolve().as_uri()}"' in report_html._asv_link()
