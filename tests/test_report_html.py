"""The HTML report (reports.html.write_report): a complete, self-contained page from a small real study."""
from __future__ import annotations

import re

import pandas as pd
import pytest

from reports.html import write_report
from reports.study import StudyConfig, run_study

CASES = ("gauss-shift-1", "uniform-support", "vocab-50k-top-k")
ESTIMATORS = ("k1", "k3", "reverse_kl")
META = {"seed": "0", "command": "pytest", "versions": "test", "commit": "abc123", "machine": "ci",
        "date": "2024-01-01", "wall time": "1 s"}


@pytest.fixture(scope="module")
def page(tmp_path_factory):
    frame = run_study(StudyConfig(cases=CASES, estimators=ESTIMATORS, ns=(10, 100), replicates=50, seed=0),
                      progress=False)
    path = write_report(frame, tmp_path_factory.mktemp("report"), META)
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
                   "× read floor", "log_softmax + kl_div"):
        assert needle in speed


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


def test_bad_frame_is_rejected(tmp_path):
    with pytest.raises(ValueError, match="frame"):
        write_report(pd.DataFrame({"case": []}), tmp_path, META)


def test_summary_counts_consistent_cells(page):
    _, text = page
    summary = text[text.index('<section id="summary">'):text.index('<section id="broken">')]
    k1_row = summary[summary.index("<td>k1</td>"):]
    k1_row = k1_row[:k1_row.index("</tr>")]
    assert "<td>6 / 6</td>" in k1_row  # k1 is unbiased everywhere, its constant estimate on uniform-support too
    assert "median var / var(k1)" in summary and "median var / var(k3)" in summary


def test_sequence_and_marginal_sections(tmp_path):
    """With a sequence study and a marginal study the page gains their sections, figures and tables."""
    from reports.marginal_study import run_marginal_study

    frame = run_study(StudyConfig(cases=("gauss-shift-1",), estimators=("k1", "k3"), ns=(10,), replicates=20, seed=0),
                      progress=False)
    seq = run_study(StudyConfig(cases=("seq-bn-vs-made", "seq-transformer-top-k"),
                                estimators=("k1", "k3", "rao_blackwell"), ns=(1,), replicates=200, seed=0),
                    progress=False)
    marginal = run_marginal_study(["lognormal-0.5", "mixture-prior"], ["log_mean_exp", "jackknife1"], Ks=(4, 16),
                                  replicates=50, seed=0)
    path = write_report(frame, tmp_path, META, sequence_frame=seq, marginal_frame=marginal)
    text = path.read_text(encoding="utf-8")
    for section in ("sequences", "marginal"):
        assert f'<section id="{section}">' in text
    for figure in ("sequence_variance.png", "loss_curves.png", "marginal_bias_vs_k.png"):
        assert f'src="figures/{figure}"' in text and (tmp_path / "figures" / figure).stat().st_size > 0
    assert "RB/k1 exact" in text and "measured / theory" in text and "1023" in text  # free-parameter table
    assert "Not drawn: Rao-Blackwellized" not in text
