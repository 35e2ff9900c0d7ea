"""The HTML report (reports.report.collect, reports.html.render): a complete, self-contained page from a small
real study; its policy (default_report), its figure registry and its asv link."""
from __future__ import annotations

import json
import re
from dataclasses import replace
from html import unescape
from pathlib import Path

import matplotlib.colors
import matplotlib.pyplot as plt
import numpy as np
import pandas as pd
import pytest
from matplotlib.container import Container
from PIL import Image

import reports.experiments
import reports.figures
import reports.html as report_html
from reports import ReportData, ReportPlan, default_report
from reports.catalog import ESTIMATORS as CATALOG
from reports.cells import BIASED, CASE, NOISE, critical_z, verdicts
from reports.figures import color_of, save, tick_labels
from reports.report import collect
from tests.browser import ASPECT_BOUNDS, CONTENT_WIDTH, MIN_SHOWN_SCALE

CASES = ("gauss-shift-1", "uniform-support", "vocab-50k-top-k")
ESTIMATORS = ("k1", "k3", "reverse_kl")
META = {"seed": "0", "command": "pytest", "versions": "test", "commit": "abc123", "machine": "ci",
        "date": "2024-01-01", "wall time": "1 s"}


@pytest.fixture(scope="module")
def data():
    plan = ReportPlan(cases=CASES, estimators=ESTIMATORS, ns=(10, 100), replicates=50, seed=0, marginal_cases=())
    return replace(collect(plan), provenance=META, history=None)  # the history is tested in test_history


def _rgb(handle) -> set[tuple]:
    """The colours (RGB, 3 decimals) a legend handle or an artist is drawn in."""
    handle = handle[0] if isinstance(handle, Container) else handle
    found = set()
    for getter in ("get_color", "get_facecolor", "get_edgecolor", "get_markerfacecolor"):
        if hasattr(handle, getter):
            try:
                rgba = matplotlib.colors.to_rgba_array(getattr(handle, getter)())
            except (ValueError, TypeError):
                continue
            found |= {tuple(np.round(c[:3], 3)) for c in rgba}
    return found


def figure_defects(fig) -> list[str]:
    """What a reader of ``fig`` would stumble on: an empty panel, overlapping tick labels, an estimator whose
    legend entry (or histogram panel) is not drawn in its one colour."""
    fig.canvas.draw()
    found = []
    for ax in fig.axes:
        if not ax.has_data():
            found.append(f"empty panel {ax.get_title()!r}")
        for axis in (ax.xaxis, ax.yaxis):
            boxes = [(label.get_text(), label.get_window_extent()) for _, _, label in tick_labels(axis)]
            found += [f"{ax.get_title()!r}: tick labels {a!r} and {b!r} overlap" for i, (a, box) in enumerate(boxes)
                      for b, other in boxes[i + 1:] if box.overlaps(other)]
        name = ax.get_title().split(" (")[0]
        if name in CATALOG and ax.has_data():  # a panel per estimator (the per-sample histograms)
            drawn = set().union(*(_rgb(a) for a in ax.get_children()))
            if tuple(np.round(color_of(name), 3)) not in drawn:
                found.append(f"panel {name!r} is not drawn in its colour")
    for legend in fig.legends + [ax.get_legend() for ax in fig.axes if ax.get_legend()]:
        for handle, text in zip(legend.legend_handles, legend.texts):
            if text.get_text() in CATALOG and tuple(np.round(color_of(text.get_text()), 3)) not in _rgb(handle):
                found.append(f"legend entry {text.get_text()!r} is not in its colour")
    return found


@pytest.fixture(scope="module")
def inspected():
    """Every figure saved while this is active, checked by :func:`figure_defects`: {file name: defects}."""
    defects = {}

    def checked_save(fig, path):
        reports.figures.declutter_ticks(fig)  # what save does first: the check sees what is saved
        defects[Path(path).name] = figure_defects(fig)
        return save(fig, path)

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(reports.figures, "save", checked_save)
        mp.setattr(reports.experiments, "save", checked_save)
        yield defects


@pytest.fixture(scope="module")
def page(data, tmp_path_factory, inspected):
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


def test_every_figure_has_no_empty_panel_no_colliding_ticks_and_one_colour_per_estimator(page, inspected):
    assert set(inspected) == {Path(src).name for src in re.findall(r'<img src="([^"]+)"', page[1])}
    assert {name: d for name, d in inspected.items() if d} == {}


def test_figure_checks_catch_the_defects_they_target():
    """figure_defects fails an empty panel, crowded tick labels, and a legend in the wrong colour."""
    fig, (empty, crowded) = plt.subplots(1, 2)
    crowded.plot([0, 1], [0, 1], color=color_of("k3"), label="k1")
    crowded.set_yticks(np.linspace(0, 1, 60))
    crowded.legend()
    defects = "\n".join(figure_defects(fig))
    plt.close(fig)
    assert "empty panel" in defects and "overlap" in defects and "'k1' is not in its colour" in defects


def test_figures_stay_readable_at_every_scale(inspected, tmp_path):
    """Seven estimators' relative biases from −1e5 to 10 in one panel (gauss-100d-fullcov) and a case whose every
    estimate is constant (uniform-support, rsd = 0): no colliding tick labels, no empty panel, no overlapping
    intervals (at each n every estimator has its own x)."""
    names = [n for n, s in CATALOG.items() if s.form == "token"]
    rows = [{"case": case, "estimator": name, "n": n, "truth": 1.0, "bias_se": 0.01 * (1 + i), "rsd": rsd,
             "rel_bias": -(10.0 ** (5 - i)) if case == "wide" else 0.0}
            for case, rsd in (("wide", 2.0), ("constant", 0.0), ("plain", 1.5)) for i, name in enumerate(names)
            for n in (10, 100, 1000)]
    frame = pd.DataFrame(rows)
    reports.figures.bias_vs_n(frame, tmp_path / "bias.png", names)
    reports.figures.rsd_vs_n(frame, tmp_path / "rsd.png", names)
    assert inspected["bias.png"] == [] and inspected["rsd.png"] == []


def test_bias_intervals_stand_apart(tmp_path):
    frame = pd.DataFrame([{"case": "c", "estimator": e, "n": n, "truth": 1.0, "bias_se": 0.1, "rel_bias": 0.0}
                          for e in ("k1", "k2", "k3") for n in (10, 100)])
    fig_holder = {}
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(reports.figures, "save", lambda fig, path: fig_holder.setdefault("fig", fig))
        reports.figures.bias_vs_n(frame, tmp_path / "b.png", ["k1", "k2", "k3"])
    points = [line for line in fig_holder["fig"].axes[0].lines if line.get_marker() == "o"]
    positions = [round(float(x), 6) for line in points for x in line.get_xdata()]
    assert len(positions) == 6 and len(set(positions)) == 6  # 3 estimators × 2 n, each at its own x
    plt.close(fig_holder["fig"])


def test_figures_keep_a_readable_shape_and_size(page):
    """Every PNG within the aspect bounds, and narrow enough that the page shows it at ≥ MIN_SHOWN_SCALE."""
    path, text = page
    low, high = ASPECT_BOUNDS
    for src in re.findall(r'<img src="([^"]+)"', text):
        width, height = Image.open(path.parent / src).size
        assert low <= width / height <= high, f"{src}: {width}×{height}"
        assert CONTENT_WIDTH / width >= MIN_SHOWN_SCALE, f"{src}: {width} px wide, shown at {CONTENT_WIDTH / width:.0%}"


def test_tables_scroll_and_name_every_column(page):
    _, text = page
    tables = re.findall(r"<table[^>]*>.*?</table>", text, re.S)
    scrolling = re.findall(r'<div class="table-wrap"><table', text)
    assert len(scrolling) == len(tables) - 1  # all but the provenance table, two columns of wrapped text
    for table in tables:
        assert all(unescape(h).strip() for h in re.findall(r"<th[^>]*>(.*?)</th>", table, re.S)), table[:200]
    with pytest.raises(ValueError, match="header"):
        report_html._table(pd.DataFrame([[1, 2]], columns=["a", " "]), "x")


def test_section_titles_speak_of_the_experiment(page):
    assert "course notes" not in page[1]


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


def _summary_row(text: str, estimator: str) -> list[str]:
    summary = text[text.index('<section id="summary">'):text.index('<section id="broken">')]
    row = summary[summary.index(f"<td>{estimator}</td>"):]
    return [unescape(c) for c in re.findall(r"<td>(.*?)</td>", row[:row.index("</tr>")])]


def test_summary_counts_consistent_cells(page):
    _, text = page
    # k1 is unbiased everywhere, its constant estimate on uniform-support too
    assert _summary_row(text, "k1")[2:5] == ["6 / 6", "none", "none"]
    assert "median var / var(k1)" in text and "median var / var(k3)" in text


def test_summary_separates_bias_on_broken_cases_from_bias_where_assumptions_hold(page):
    """k3's −72% on uniform-support (q has mass outside p's support) is the case's, not a finding against k3."""
    _, text = page
    k3 = _summary_row(text, "k3")
    assert k3[3] == "none"
    assert "uniform-support (support)" in k3[4] and "vocab-50k-top-k" not in k3[3]


def test_verdicts_tell_noise_from_bias_and_from_broken_assumptions():
    """A relative bias of 2.43 at 1 SE is noise (k1 on near-identical); 0.2 at 40 SE is biased; a cell on a case
    that breaks the estimator's assumptions is the case's whatever its size, the clamped k3 of verl on a support
    mismatch included; the threshold is Bonferroni's."""
    frame = pd.DataFrame({"case": ["near-identical", "gauss-shift-1", "uniform-support", "gauss-100d-fullcov"],
                          "estimator": ["k1", "k2", "verl_low_var_kl", "k1_cv"], "truth": [1e-4, 1.0, 1.0, 1.0],
                          "bias": [2.43e-4, 0.2, -0.72, 1e5], "bias_se": [2.43e-4, 0.005, 0.0, 1e4]})
    assert list(verdicts(frame)) == [NOISE, BIASED, CASE, CASE]
    z = critical_z(2)
    edge = pd.DataFrame({"case": ["gauss-shift-1"] * 2, "estimator": ["k1"] * 2, "truth": [1.0, 1.0],
                         "bias": [0.99 * z, 1.01 * z], "bias_se": [1.0, 1.0]})
    assert list(verdicts(edge)) == [NOISE, BIASED] and 2.80 < z < 2.81  # Φ⁻¹(1 − 0.01/4) = 2.807


def test_study_table_highlights_biased_cells_and_explains_its_columns(page):
    _, text = page
    study = text[text.index('<section id="study">'):]
    study = study[:study.index("</section>")]
    assert re.search(r'<tr class="case"><td>uniform-support</td><td>k3</td>', study)
    assert 'class="biased"' not in study or "biased where" in text
    for column in ("bias_se", "verdict", "rsd", "frac_negative", "nonfinite"):
        assert f"<b>{column}</b>: " in study


def test_sequence_and_marginal_sections(tmp_path, inspected):
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
    low, high = ASPECT_BOUNDS
    for figure in ("sequence_variance.png", "loss_curves.png", "marginal_bias_vs_k.png"):
        assert f'src="figures/{figure}"' in text and (tmp_path / "figures" / figure).stat().st_size > 0
        assert inspected[figure] == []  # no empty panel, no colliding tick labels, one colour per estimator
        width, height = Image.open(tmp_path / "figures" / figure).size
        assert low <= width / height <= high and CONTENT_WIDTH / width >= MIN_SHOWN_SCALE, (figure, width, height)
    assert "RB/k1 exact" in text and "measured / theory" in text and "1023" in text  # free-parameter table
    assert "Not drawn: Rao-Blackwellized" not in text
    assert "|bias| / |bias jackknife1|" in text
    jack = text[text.index("reduction</h3>"):text.index("Weight diagnostics")]
    assert "<th></th>" not in jack and "<th>estimator</th>" not in jack  # the pivot's column name is no header
    ratios = [unescape(r).split("</td><td>")[-1] for r in re.findall(r"<tr[^>]*><td>(.*?)</td></tr>", jack)]
    assert "noise" in ratios  # jackknife1's bias at noise level gives no ratio
    diag = text[text.index("Weight diagnostics"):text.index("Free parameters")]
    assert "<th>reading</th>" in diag and "<b>khat</b>: " in diag and "no tail to fit" in diag
    assert "−∞" in diag  # mixture-prior's few distinct weights leave no tail to fit


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
                       "which objective each KL loss optimizes (no gradient case in this report)",
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
