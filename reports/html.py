"""The HTML report of a study: one self-contained page (inline CSS, no network) with PNG figures beside it."""
from __future__ import annotations

import html
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
from matplotlib.ticker import LogFormatter  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402
import seaborn as sns  # noqa: E402

from reference_models import get_case  # noqa: E402

from .catalog import ESTIMATORS  # noqa: E402
from .study import COLUMNS  # noqa: E402

__all__ = ["write_report"]

TABLE_COLUMNS = ["case", "estimator", "n", "truth", "mean", "bias", "bias_se", "rel_bias", "rsd", "rmse",
                 "frac_negative", "nonfinite", "truth_method"]
DPI = 110
#: Relative size below which a difference is float rounding (a constant estimate has rsd ~ 1e-16, not 0).
ROUNDING = 1e-9
esc = html.escape

CSS = """
body { font-family: system-ui, sans-serif; max-width: 1400px; margin: 2em auto; padding: 0 1em; color: #222; }
figure { margin: 1.5em 0; } figure img { max-width: 100%; } figcaption { font-size: 0.9em; color: #444; }
table { border-collapse: collapse; font-size: 0.85em; }
th, td { padding: 2px 8px; border-bottom: 1px solid #ddd; text-align: right; white-space: nowrap; }
th { background: #f0f0f0; }
.table-wrap { overflow: auto; max-height: 70vh; border: 1px solid #ccc; }
table.study { font-size: 12px; } table.study th { position: sticky; top: 0; z-index: 1; }
table.provenance th, table.provenance td, table.summary td:nth-child(2) { text-align: left; white-space: normal; }
"""

INTRO = (
    "Every estimator is run many times (replicates) against the exact KL(p‖q) of each reference case, with "
    "x ~ p and log r = log q(x) − log p(x): k1 = −log r, k2 = (log r)²/2, k3 = (r − 1) − log r. Each cell "
    "(case, estimator, n) averages n per-sample estimates; its bias, variance and error are measured over "
    "the replicates. Truths are exact (closed form, enumeration, or quadrature with an error bound)."
)

RSD_CAPTION = (
    "Relative standard deviation of one per-sample estimate, rsd = √var / |truth|, with var = n × the "
    "variance of the replicate means. For i.i.d. estimators rsd does not depend on n, so lines are flat up to "
    "noise, and the samples needed for a given relative error scale as rsd². When q is close to p, k1's rsd "
    "grows like √(2 / KL) while k2's and k3's stay near √2 (when log r is close to Gaussian). Where a case "
    "breaks an estimator's finite-variance assumption (see above) its rsd is noise, not a property."
)

BIAS_CAPTION = (
    "Relative bias (mean − truth) / |truth| with ±2 standard errors (2·bias_se / |truth|); the dashed line is "
    "zero. An unbiased estimator's bars cross it in about 95% of cells. k2 is biased by design (it targets "
    "E[(log r)²]/2); k3-type estimators are biased by E_p[r] − 1 where q has mass outside p's support."
)


def _table(frame: pd.DataFrame, css_class: str) -> str:
    return frame.to_html(index=False, border=0, classes=css_class, na_rep="–", float_format=lambda v: f"{v:.4g}")


def _summary(frame: pd.DataFrame) -> pd.DataFrame:
    present = set(frame["estimator"])
    refs = {ref: frame[frame["estimator"] == ref].set_index(["case", "n"])["var"] for ref in ("k1", "k3")
            if ref in present}
    rows = []
    for name, g in frame.groupby("estimator", sort=False):
        consistent = g["bias"].abs() <= 4 * g["bias_se"] + ROUNDING * g["truth"].abs()
        abs_rel = g["rel_bias"].abs().dropna()
        worst = g.loc[abs_rel.idxmax()] if len(abs_rel) else None
        row = {"estimator": name, "definition": ESTIMATORS[name].label if name in ESTIMATORS else "",
               "|bias| ≤ 4·bias_se": f"{int(consistent.sum())} / {len(g)}",
               "worst |rel_bias|": "–" if worst is None
               else f"{abs(worst['rel_bias']):.4g} ({worst['case']}, n = {worst['n']})",
               "median rsd": g["rsd"].median()}
        for ref, ref_var in refs.items():
            row[f"median var / var({ref})"] = (g.set_index(["case", "n"])["var"] / ref_var).median()
        rows.append(row)
    return pd.DataFrame(rows)


def _broken(frame: pd.DataFrame) -> list[str]:
    items = []
    flagged = frame[frame["breaks"].fillna("") != ""]
    for (case, keys), g in flagged.groupby(["case", "breaks"], sort=False):
        reasons = get_case(case).breaks
        for key in keys.split("; "):
            why = f"{key}: {reasons[key]}" if key in reasons else key
            items.append(f"<b>{esc(case)}</b> (affects {esc(', '.join(g['estimator'].unique()))}) — {esc(why)}")
    items += [f"skipped: {esc(s)}" for s in frame.attrs.get("skipped", [])]
    return items


def _rsd_figure(frame: pd.DataFrame, path: Path, order: list[str]) -> list[str]:
    """Draws rsd vs n; returns the cells it leaves out (not finite, or constant up to rounding)."""
    drawable = np.isfinite(frame["rsd"]) & (frame["rsd"] > ROUNDING)
    g = sns.relplot(data=frame[drawable], x="n", y="rsd", hue="estimator", hue_order=order, col="case",
                    col_order=list(frame["case"].unique()), col_wrap=4, kind="line", marker="o", estimator=None,
                    height=2.6, aspect=1.3, facet_kws={"sharey": False})
    g.set(xscale="log", yscale="log")
    for ax in g.axes.flat:  # plain numbers ("20", "0.5") rather than "2×10¹"
        ax.yaxis.set_major_formatter(LogFormatter())
        ax.yaxis.set_minor_formatter(LogFormatter(labelOnlyBase=False))
    g.set_titles("{col_name}")
    g.savefig(path, dpi=DPI)
    plt.close(g.figure)
    left_out = frame[~drawable].groupby("case", sort=False)
    return [f"{case}: {', '.join(g['estimator'].unique())}" for case, g in left_out]


def _errorbars(data: pd.DataFrame, color, label: str) -> None:
    data = data.sort_values("n")
    plt.errorbar(data["x"], data["rel_bias"], yerr=2 * data["bias_se"] / data["truth"].abs(), fmt="o-", ms=3,
                 lw=1, capsize=2, color=color, label=label)


def _bias_figure(frame: pd.DataFrame, path: Path, order: list[str]) -> None:
    data = frame[np.isfinite(frame["rel_bias"])].copy()
    # spread the estimators a little along n so that their error bars do not overlap
    data["x"] = data["n"] * 1.08 ** (data["estimator"].map(order.index) - (len(order) - 1) / 2)
    g = sns.FacetGrid(data, col="case", col_order=list(frame["case"].unique()), col_wrap=4, hue="estimator",
                      hue_order=order, height=2.6, aspect=1.3, sharey=False)
    g.map_dataframe(_errorbars)
    for ax in g.axes.flat:
        ax.axhline(0, ls="--", lw=0.8, color="0.4")
        ax.set_xscale("log")
    g.set_titles("{col_name}")
    g.set_axis_labels("n", "relative bias")
    g.add_legend()
    g.savefig(path, dpi=DPI)
    plt.close(g.figure)


def write_report(frame: pd.DataFrame, out_dir: str | Path, meta: dict[str, str]) -> Path:
    """Write ``out_dir/index.html`` and its figures ``out_dir/figures/*.png`` for a study frame of
    :func:`reports.study.run_study`; ``meta`` (name -> text) is printed as provenance. Returns the page's path."""
    missing = [c for c in COLUMNS if c not in frame.columns]
    if missing or frame.empty:
        raise ValueError(f"frame must be a non-empty study frame; missing columns: {missing}")
    out = Path(out_dir)
    (out / "figures").mkdir(parents=True, exist_ok=True)
    order = list(frame["estimator"].unique())
    not_drawn = _rsd_figure(frame, out / "figures" / "rsd_vs_n.png", order)
    _bias_figure(frame, out / "figures" / "rel_bias_vs_n.png", order)

    broken = _broken(frame)
    rsd_caption = RSD_CAPTION + (" Not drawn (a constant estimate, rsd = 0 up to rounding, or not finite): "
                                 + "; ".join(not_drawn) + "." if not_drawn else "")
    replicates = ", ".join(map(str, sorted(frame["replicates"].unique())))
    scope = (f"{frame['case'].nunique()} cases × {len(order)} estimators × n ∈ "
             f"{{{', '.join(map(str, sorted(frame['n'].unique())))}}}, {replicates} replicates per cell.")
    provenance = "".join(f"<tr><th>{esc(str(k))}</th><td>{esc(str(v))}</td></tr>"
                         for k, v in meta.items())
    page = f"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><title>estbench: KL estimator study</title>
<style>{CSS}</style></head><body>
<h1>estbench: KL estimator study</h1>
<p>{esc(INTRO)} {esc(scope)}</p>
<section id="summary"><h2>Summary per estimator</h2>
<p>Cells consistent with the truth (|bias| ≤ 4·bias_se, give or take float rounding), the worst relative
bias, the median rsd, and the median variance relative to k1's and k3's on the same (case, n).</p>
<div class="table-wrap">{_table(_summary(frame), "summary")}</div></section>
<section id="broken"><h2>Broken assumptions</h2>
{"<ul>" + "".join(f"<li>{item}</li>" for item in broken) + "</ul>" if broken else "<p>None.</p>"}</section>
<section id="figures"><h2>Figures</h2>
<figure><img src="figures/rsd_vs_n.png" alt="relative standard deviation vs n, one panel per case">
<figcaption>Figure 1. {esc(rsd_caption)}</figcaption></figure>
<figure><img src="figures/rel_bias_vs_n.png" alt="relative bias vs n, one panel per case">
<figcaption>Figure 2. {esc(BIAS_CAPTION)}</figcaption></figure></section>
<section id="study"><h2>Study table</h2>
<div class="table-wrap">{_table(frame[TABLE_COLUMNS], "study")}</div></section>
<section id="provenance"><h2>Provenance</h2><table class="provenance">{provenance}</table></section>
</body></html>
"""
    path = out / "index.html"
    path.write_text(page, encoding="utf-8")
    return path
