"""The HTML report: one self-contained page (inline CSS and JS, no network) with PNG figures in ``figures/``
beside it, drawn by :func:`render` from a :class:`~reports.report.ReportData` computed beforehand.

The page is its registered sections (:data:`SECTIONS`) in order, each with its registered figures
(:data:`FIGURES`). A figure is registered with :func:`figure`, its caption beside its draw function; figures
are numbered in the order they are drawn, and one whose data the study lacks is listed under "Not drawn".
"""
from __future__ import annotations

import html
import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import pandas as pd

from reference_models import get_case
from reference_models.bayesnet import parameter_table

from . import experiments, figures, history
from .catalog import ESTIMATORS, KL_FORMS, EstimatorSpec, exact_moments
from .cells import BIASED, CASE, NOISE, assumptions, at_noise, critical_z, verdicts
from .stats import z_score
from .report import ReportData

__all__ = ["Figure", "Section", "Drawn", "FIGURES", "SECTIONS", "figure", "section", "render"]

#: The study tables' columns (mean = truth + bias is left out, so that they fit a 1400-px window).
TABLE_COLUMNS = ["case", "estimator", "n", "truth", "bias", "bias_se", "verdict", "rel_bias", "rsd", "rmse",
                 "frac_negative", "nonfinite", "truth_method"]
#: What a column means, said under every table that shows it.
COLUMN_NOTES = {
    "bias_se": "the standard error of bias (the replicate means' sd / √replicates)",
    "verdict": f"{NOISE}: |bias| within the noise rule above; {BIASED}: beyond it where the estimator's assumptions "
               f"hold (highlighted); {CASE}: the case breaks one of them, so its bias is the case's (shaded)",
    "rel_bias": "bias / |truth|",
    "rsd": "√var / |truth|, var = n × the variance of the replicate means",
    "rmse": "root mean squared error of the replicate means",
    "frac_negative": "the fraction of single-sample estimates below 0",
    "nonfinite": "single-sample estimates that were ±inf or NaN",
    "truth_method": "how the exact target was obtained",
    "breaks": "the estimator assumptions the case breaks (support: q has mass outside p's support; ratio_variance: "
              "E_p[(q/p)²] = ∞)",
    "khat": "Pareto k̂ of the tail of one estimate's K weights (PSIS): below 0.5 reliable, 0.5–0.7 slow to "
            "converge, above 0.7 not to be trusted; −∞ where fewer than 10 distinct weights exceed the tail "
            "threshold, so there is no tail to fit (a discrete latent gives few distinct weights)",
    "ess": "Kish's effective sample size (Σw)²/Σw² of K weights, averaged over replicates",
}
ASV_CONF = history.ASV_CONF
esc = html.escape

CSS = """
body { font-family: system-ui, sans-serif; max-width: 1400px; margin: 2em auto; padding: 0 1em; color: #222; }
figure { margin: 1.5em 0; } figure img { max-width: 100%; } figcaption { font-size: 0.9em; color: #444; }
table { border-collapse: collapse; font-size: 0.85em; }
th, td { padding: 2px 8px; border-bottom: 1px solid #ddd; text-align: right; white-space: nowrap; }
th { background: #f0f0f0; cursor: pointer; } th.sorted-asc::after { content: " ▲"; } th.sorted-desc::after { content: " ▼"; }
.table-wrap { overflow: auto; max-height: 70vh; border: 1px solid #ccc; }
table.study { font-size: 12px; } table.study th { position: sticky; top: 0; z-index: 1; }
table.study td:last-child { white-space: normal; min-width: 10em; text-align: left; }
table.provenance th, table.provenance td, table.left td, table.left th { text-align: left; white-space: normal; }
tr.biased td { background: #fdd9b5; font-weight: 600; } tr.case td { background: #e4ecf7; }
.notes { font-size: 0.8em; color: #555; margin-top: 0.3em; }
.waiting { color: #777; font-style: italic; }
.warning { color: #8a4b00; background: #fff3cd; border-left: 4px solid #e0a800; padding: 4px 8px; }
"""

# Click a column header to sort the table by it (numbers numerically); no library, no network.
SORT_JS = """
document.querySelectorAll("table.sortable").forEach(function (table) {
  table.querySelectorAll("thead th").forEach(function (th, col) {
    th.addEventListener("click", function () {
      var asc = !th.classList.contains("sorted-asc");
      table.querySelectorAll("thead th").forEach(function (h) { h.classList.remove("sorted-asc", "sorted-desc"); });
      th.classList.add(asc ? "sorted-asc" : "sorted-desc");
      var body = table.tBodies[0], rows = Array.prototype.slice.call(body.rows);
      rows.sort(function (a, b) {
        var x = a.cells[col].textContent, y = b.cells[col].textContent, nx = parseFloat(x), ny = parseFloat(y);
        var c = (isNaN(nx) || isNaN(ny)) ? x.localeCompare(y) : nx - ny;
        return asc ? c : -c;
      });
      rows.forEach(function (r) { body.appendChild(r); });
    });
  });
});
"""

INTRO = (
    "Every estimator is run many times (replicates) against the exact KL(p‖q) of each reference case, with "
    "x ~ p and log r = log q(x) − log p(x): k1 = −log r, k2 = (log r)²/2, k3 = (r − 1) − log r. Each cell "
    "(case, estimator, n) averages n per-sample estimates; its bias, variance and error are measured over "
    "the replicates. Truths are exact (closed form, enumeration, or quadrature with an error bound)."
)

SEQUENCE_INTRO = (
    "Pairs of trained autoregressive models (FVSBN, NADE, MADE on binarized 4×4 scikit-learn digits and on "
    "samples of a known Bayesian network; a small transformer on a hidden Markov source) and the sources "
    "themselves. Every sequence is enumerated (2¹⁴–5⁸ of them), so the sequence KL and the exact variance of "
    "each per-sequence estimator are known; sequences are drawn exactly from p by inverse CDF over that "
    "enumeration. Per-token estimators (k1, k2, k3 and the clamped variants) are summed over the tokens of a "
    "sequence as RLHF code does; seq_k3 is k3 of the whole-sequence ratio; rao_blackwell sums the exact "
    "next-step KL at each sampled prefix (Amini, Vieira & Cotterell 2025).")

GRADIENT_INTRO = (
    "RLHF code uses a KL estimate as a loss, f(log_p, log_q, log_p_old, mask) per sequence, and what it "
    "optimizes is its expected gradient E_{x~p_old}[∇θ f]. Each gradient case knows ∇θ KL(p_θ‖q) and ∇θ KL(q‖p_θ) "
    "exactly (closed form for Gaussians and a 50,257-token bandit; autograd through every enumerated sequence "
    "of the trained NADE and transformer, with p's next-step logits at every prefix as θ), on-policy and off-policy "
    "(samples from p at temperature 1.25). The gate projects each sample's gradient on six fixed directions (the "
    "true gradient first, then the rest of ∇KL(q‖p) and four random ones) and z-tests the mean projections against "
    "each candidate: ∇KL(p‖q) (holds), ∇KL(q‖p), zero, or none of them. rel_bias = ‖m − t‖/‖t‖ and the cosines "
    "are measured in that six-dimensional span; grad_var is one sample's relative gradient variance there. This "
    "page runs one chunk per cell (the gate's pilot): `estbench gate --grad` sizes each cell to catch a 2% bias.")

MARGINAL_INTRO = (
    "log Â with Â = (1/K) Σ w_k, w = p(x, z)/q(z|x), z ~ q, is the IWAE bound: Â is unbiased for p(x) but "
    "E[log Â] ≤ log p(x) (Jensen). The delta method predicts the bias −μ₂/(2K) to first order and adds "
    "(μ₃/(3μ³) − 3μ₂²/(4μ⁴))/K² to second (Nowozin 2018), with μ₂, μ₃ the exact central moments of the "
    "normalized weight w/p(x) (closed form for log-normal weights and Gaussian pairs, finite sums for discrete "
    "latents). The jackknife removes the 1/K term (order 1) and the 1/K² term (order 2). Biases are measured "
    "with the control variate Â/p(x) − 1, whose mean is exactly 0, so that their standard errors are small.")

#: The losses of the gradient error figure: one of each kind of behaviour.
GRADIENT_FIGURE_LOSSES = ("k1_loss", "k2_loss", "k3_loss", "k1_reward_to_go", "k2_sequence_loss", "is_reinforce")
#: The case of the per-sample figure (k1 is negative about half the time there) and of the clamp figure.
PER_SAMPLE_CASE = "gauss-shift-0.1"
CLAMP_CASE = "heavy-ratio"
#: The marginal section's subject, log Â; the other estimators of the marginal study are compared with it.
MARGINAL_BASELINE = "log_mean_exp"


# --- the registry ----------------------------------------------------------------------------------------------

def _always(data: ReportData) -> bool:
    return True


@dataclass(frozen=True)
class Figure:
    """A figure in section ``section``: ``draw(data, path)`` saves ``figures/{name}.png`` and returns the fields
    (a dict, or None) that its ``alt`` and ``caption`` format strings use. When not ``needs(data)`` it is not
    drawn and ``unavailable`` says so."""

    name: str
    alt: str
    caption: str
    draw: Callable[[ReportData, Path], dict | None]
    needs: Callable[[ReportData], bool] = _always
    unavailable: str = ""
    section: str = "figures"


@dataclass(frozen=True)
class Section:
    """``<section id=id>`` around ``render(data, drawn)``; left out when not ``needs(data)``, and then
    ``unavailable`` says so under the figures."""

    id: str
    render: Callable[[ReportData, "Drawn"], str]
    needs: Callable[[ReportData], bool] = _always
    unavailable: str = ""


@dataclass
class Drawn:
    """The figures drawn for one page (their HTML by name, in page order) and what was not drawn, with why."""

    html: dict[str, str]
    not_drawn: list[str]


#: The page's sections and figures, in page order; :func:`section` and :func:`figure` append to them.
SECTIONS: list[Section] = []
FIGURES: list[Figure] = []


def section(id: str, needs: Callable[[ReportData], bool] = _always, unavailable: str = ""):
    """Register the decorated ``render(data, drawn) -> HTML`` as the next section of the page."""
    def register(render_fn):
        SECTIONS.append(Section(id, render_fn, needs, unavailable))
        return render_fn
    return register


def figure(name: str, alt: str, caption: str, needs: Callable[[ReportData], bool] = _always,
           unavailable: str = "", section: str = "figures"):
    """Register the decorated ``draw(data, path) -> fields`` as the next figure of ``section`` (see :class:`Figure`)."""
    def register(draw):
        FIGURES.append(Figure(name, alt, caption, draw, needs, unavailable, section))
        return draw
    return register


# --- estimators by what the catalog says of them ------------------------------------------------------------------

def _plain(spec: EstimatorSpec) -> bool:
    """A plain per-token KL estimator (k1, k2, k3): no clamp, no coupling of samples."""
    return spec.form == "token" and spec.target == "kl" and not spec.couples_samples and spec.clamps is None


def _reference(spec: EstimatorSpec) -> bool:
    """A plain unbiased estimator (k1, k3): what the others' variances are compared with."""
    return _plain(spec) and spec.unbiased


def _coupled(spec: EstimatorSpec) -> bool:
    """A control variate fitted over the samples of one estimate (k1_cv)."""
    return spec.couples_samples


def _studied(data: ReportData, keep: Callable[[EstimatorSpec], bool]) -> list[str]:
    """The KL study's estimators, in its order, that ``keep`` selects."""
    return [e for e in data.kl["estimator"].unique() if keep(ESTIMATORS[e])]


def _clamped(data: ReportData) -> list[str]:
    """The KL study's clamped production variants, with the estimators they clamp."""
    bases = {ESTIMATORS[e].clamps for e in _studied(data, lambda s: s.clamps is not None)}
    return _studied(data, lambda s: s.clamps is not None or s.name in bases)


# --- helpers ----------------------------------------------------------------------------------------------------------

def _text(value) -> str:
    """A table cell's text: floats to 4 significant digits, NaN as –, ±inf as ±∞."""
    if isinstance(value, float) and not math.isfinite(value):
        return "–" if math.isnan(value) else "∞" if value > 0 else "−∞"
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value)


def _table(frame: pd.DataFrame, css_class: str, row_classes=None) -> str:
    """``frame`` as a sortable table in a box that scrolls (never cuts) what does not fit, each row of class
    ``row_classes[i]`` (an iterable of CSS classes, or None), with :data:`COLUMN_NOTES` for its columns under it.
    A ValueError names an empty column header."""
    names = [str(c) for c in frame.columns]
    if not all(n.strip() for n in names):
        raise ValueError(f"every column of a table needs a header, got {names}")
    classes = list(row_classes) if row_classes is not None else [""] * len(frame)
    head = "".join(f"<th>{esc(n)}</th>" for n in names)
    body = "".join(f'<tr class="{esc(c)}">' + "".join(f"<td>{esc(_text(v))}</td>" for v in row) + "</tr>"
                   for c, row in zip(classes, frame.itertuples(index=False, name=None)))
    notes = "; ".join(f"<b>{esc(n)}</b>: {esc(COLUMN_NOTES[n])}" for n in names if n in COLUMN_NOTES)
    return (f'<div class="table-wrap"><table class="{css_class} sortable"><thead><tr>{head}</tr></thead>'
            f"<tbody>{body}</tbody></table></div>" + (f'<p class="notes">{notes}.</p>' if notes else ""))


def _study_table(frame: pd.DataFrame) -> str:
    """A study frame with each cell's verdict (:func:`reports.cells.verdicts`), biased cells highlighted."""
    verdict = verdicts(frame)
    rows = frame.assign(verdict=verdict)[TABLE_COLUMNS]
    return _table(rows, "study", verdict.map({BIASED: "biased", CASE: "case", NOISE: ""}))


def _noise_rule(cells: int) -> str:
    return (f"A cell's bias is noise when |bias| ≤ {critical_z(cells):.2f}·SE (give or take float rounding): "
            f"Φ⁻¹(1 − α/2m) for the m = {cells} cells of the table, so that every unbiased cell reads as noise "
            f"with probability ≥ 99% (α = 1%, Bonferroni).")


def _figure(name: str, alt: str, number: int, caption: str) -> str:
    return (f'<figure><img src="figures/{name}" alt="{esc(alt)}">'
            f"<figcaption>Figure {number}. {esc(caption)}</figcaption></figure>")


def _ratio(src, a: str, b: str) -> float:
    return src[a] / src[b] if a in src and b in src and src[b] > 0 else math.nan


def _exact_variance(case: str, estimator: str) -> float:
    """The exact per-sequence variance of ``estimator`` on a sequence case (enumerated for the estimators whose
    spec asks for it); NaN for the others."""
    spec = ESTIMATORS.get(estimator)
    return exact_moments(spec, get_case(case))["var"].value if spec is not None and spec.enumerated else math.nan


def _asv_link() -> str:
    """A link to the asv history published where :data:`ASV_CONF` puts it, or why there is none."""
    if not ASV_CONF.is_file():
        return ("<p>No asv history: estbench is installed without its repository (no asv.conf.json beside "
                "the packages).</p>")
    index = ASV_CONF.parent / json.loads(ASV_CONF.read_text()).get("html_dir", ".asv/html") / "index.html"
    if not index.is_file():
        return ("<p>No asv history here yet (run <code>asv run</code> and <code>asv publish</code> to make "
                "one).</p>")
    return (f'<p><a href="{esc(index.resolve().as_uri())}">asv history of the benchmarks</a> (to view it offline: '
            "<code>python -m reports.asv_offline</code>, then <code>asv preview</code>)</p>")


# --- the sections and their figures, in page order ----------------------------------------------------------------------

@section("summary")
def _summary(data: ReportData, drawn: Drawn) -> str:
    frame = data.kl.assign(verdict=verdicts(data.kl), breaks=assumptions(data.kl))
    refs = {ref: frame[frame["estimator"] == ref].set_index(["case", "n"])["var"]
            for ref in _studied(data, _reference)}
    refs = {ref: v[v > 0] for ref, v in refs.items()}  # a constant reference (uniform-support) has no ratio
    rows = []
    for name, g in frame.groupby("estimator", sort=False):
        row = {"estimator": name, "definition": ESTIMATORS[name].label,
               "cells at noise level": f"{int((g['verdict'] == NOISE).sum())} / {len(g)}",
               "biased where its assumptions hold": _worst(g[g["verdict"] == BIASED]),
               "biased where a case breaks its assumptions": _worst(g[g["verdict"] == CASE]),
               "median rsd": g["rsd"].median()}
        for ref, ref_var in refs.items():
            row[f"median var / var({ref})"] = (g.set_index(["case", "n"])["var"] / ref_var).dropna().median()
        rows.append(row)
    biased = ["biased" if (frame[frame["estimator"] == r["estimator"]]["verdict"] == BIASED).any() else ""
              for r in rows]
    return f"""<h2>Summary per estimator</h2>
<p>{esc(_noise_rule(len(frame)))} Each estimator's cells fall in three classes: at noise level; biased where its
assumptions hold (a finding, unless the estimator is biased by design, as k2 and the clamped production variants
are; highlighted); biased on a case that breaks one of its assumptions (listed below: the bias belongs to the
case). The worst relative bias of each class is named with its case, n and z = bias / SE (or the assumption the
case breaks). The medians compare variances with k1's and k3's on the same (case, n). Click a header to sort.</p>
{_table(pd.DataFrame(rows), "summary left", biased)}"""


def _worst(cells: pd.DataFrame) -> str:
    """'none', or how many cells and the worst |rel_bias| among them with its case, n and z (or, on a case that
    breaks an assumption, which one)."""
    finite = cells["rel_bias"].abs().dropna()
    if cells.empty:
        return "none"
    count = f"{len(cells)} cell{'s' * (len(cells) > 1)}"
    if finite.empty:
        return f"{count}, not finite"
    w = cells.loc[finite.idxmax()]
    worst = f"{count}; worst {w['rel_bias']:+.3g} on {w['case']}"
    if w["breaks"]:  # a z-test means nothing there (no finite variance, or another expectation)
        return f"{worst} ({w['breaks']}), n = {w['n']}"
    return f"{worst}, n = {w['n']}, z = {_text(z_score(w['mean'], w['truth'], w['bias_se']))}"


@section("broken")
def _broken(data: ReportData, drawn: Drawn) -> str:
    affected: dict[tuple[str, str], list[str]] = {}  # (case, assumption) -> the estimators it concerns
    for case, name, keys in zip(data.kl["case"], data.kl["estimator"], assumptions(data.kl)):
        for key in filter(None, keys.split("; ")):
            names = affected.setdefault((case, key), [])
            names += [] if name in names else [name]
    items = [f"<b>{esc(case)}</b> (affects {esc(', '.join(names))}) — {esc(key)}: {esc(get_case(case).breaks[key])}"
             for (case, key), names in affected.items()]
    items += [f"skipped: {esc(s)}" for s in data.kl.attrs.get("skipped", [])]
    listed = "<ul>" + "".join(f"<li>{item}</li>" for item in items) + "</ul>" if items else "<p>None.</p>"
    return f"<h2>Broken assumptions</h2>\n{listed}"


@section("figures")
def _figures(data: ReportData, drawn: Drawn) -> str:
    blocks = "".join(drawn.html[f.name] for f in FIGURES if f.section == "figures" and f.name in drawn.html)
    waiting = f'<p class="waiting">Not drawn: {esc("; ".join(drawn.not_drawn))}.</p>' if drawn.not_drawn else ""
    return f"<h2>Figures</h2>\n{blocks}\n{waiting}"


@figure("rsd_vs_n", "relative standard deviation vs n, one panel per case",
        "Relative standard deviation of one per-sample estimate, rsd = √var / |truth|, with var = n × the "
        "variance of the replicate means. For i.i.d. estimators rsd does not depend on n, so lines are flat up "
        "to noise, and the samples needed for a given relative error scale as rsd². When q is close to p, k1's "
        "rsd grows like √(2 / KL) while k2's and k3's stay near √2. Where a case breaks an estimator's "
        "finite-variance assumption (see above) its rsd is noise that grows with n, not a property.{left_out}")
def _rsd(data: ReportData, path: Path) -> dict:
    left_out = figures.rsd_vs_n(data.kl, path, list(data.kl["estimator"].unique()))
    return {"left_out": " Not drawn (a constant estimate, rsd = 0 up to rounding, or not finite): "
                        + "; ".join(left_out) + "." if left_out else ""}


@figure("rel_bias_vs_n", "relative bias vs n with ±2 SE, one panel per case",
        "Relative bias (mean − truth) / |truth| ± 2 standard errors; at each n the estimators stand side by side, "
        "in the legend's order and each in its one colour; the dashed line is zero and the y axis is linear "
        "within ±0.02 and logarithmic beyond. An unbiased estimator's interval covers zero in about 95% of cells. "
        "k2 is biased by design (it targets E[(log r)²]/2); k3-type estimators are biased by E_p[r] − 1 where q "
        "has mass outside p's support; on infinite-variance cases the bias is noise.")
def _bias(data: ReportData, path: Path) -> None:
    figures.bias_vs_n(data.kl, path, list(data.kl["estimator"].unique()))


@figure("per_sample", "histogram of single-sample estimates on {case}",
        "Single-sample estimates on one case. k1 = −log r is negative whenever q(x) > p(x), often about half "
        "the time when q is close to p, and only its mean is right; k3 adds r − 1, which has mean zero, and "
        "is never negative; k2 is never negative but biased. Fraction of negative estimates here: {fractions}.",
        needs=lambda data: bool(_studied(data, _plain)),
        unavailable="single-sample estimates (needs k1, k2 or k3 in the study)")
def _per_sample(data: ReportData, path: Path) -> dict:
    cases = list(data.kl["case"].unique())
    case = PER_SAMPLE_CASE if PER_SAMPLE_CASE in cases else cases[0]
    negative = figures.per_sample_distribution(case, _studied(data, _plain), data.seed, path)
    return {"case": case, "fractions": ", ".join(f"{k}: {v:.1%}" for k, v in negative.items())}


@figure("cv_variance", "variance ratio of the control variate per case",
        "Variance of the leave-one-out control variate k1 + λ̂(r − 1) relative to k1 and to k3 (λ = 1) at the "
        "largest n, per case. Below 1 it helps. Its variance ratios mean nothing on cases that break the "
        "support or finite-variance assumptions (listed above).",
        needs=lambda data: bool(_studied(data, _coupled) and _studied(data, _reference)),
        unavailable="control-variate variance reduction (needs k1_cv and k1 or k3 in the study)")
def _cv(data: ReportData, path: Path) -> None:
    figures.variance_ratio(data.kl, _studied(data, _coupled)[0], _studied(data, _reference), path)


@figure("clamp_bias", "relative bias of the clamped variants on heavy-ratio",
        "The production clamps on the heavy-ratio case, where |log r| > 20 with probability ≈ 4%: verl's "
        "low_var_kl and OpenRLHF's k3 cap each estimate at 10, which removes a quarter of the KL; k3 itself "
        "is unbiased there. Bars: ±2 standard errors.",
        needs=lambda data: CLAMP_CASE in set(data.kl["case"]) and len(_clamped(data)) > 1,
        unavailable="the production clamps' bias (needs the heavy-ratio case and a clamped variant)")
def _clamp(data: ReportData, path: Path) -> None:
    figures.clamp_bias(data.kl, CLAMP_CASE, _clamped(data), path)


@section("sequences", needs=lambda data: data.sequences is not None and not data.sequences.empty,
         unavailable="Rao-Blackwellized KL on the sequence cases (no sequence case in this study)")
def _sequences(data: ReportData, drawn: Drawn) -> str:
    seq = data.sequences
    exact = [n for n, s in ESTIMATORS.items() if s.enumerated and s.form in KL_FORMS]
    rao_blackwell = [e for e in exact if ESTIMATORS[e].form == "logits"]
    refs = [e for e in exact if _reference(ESTIMATORS[e])]
    short = {e: "RB" if e in rao_blackwell else e for e in exact}
    rows = []
    for name in seq["case"].unique():
        case = get_case(name)
        v = {e: _exact_variance(name, e) for e in exact}
        measured = seq[seq["case"] == name].set_index("estimator")["var"]
        row = {"case": name, "KL": case.truth.value, "how": case.truth.describe()}
        row.update({f"var {short[e]}": v[e] for e in exact})
        for kind, src in (("exact", v), ("measured", measured)):
            row.update({f"{short[rb]}/{ref} {kind}": _ratio(src, rb, ref) for rb in rao_blackwell for ref in refs})
        rows.append({**row, "breaks": ", ".join(case.breaks) or "–", "description": case.description})
    return f"""<h2>Sequence-level KL on trained autoregressive models</h2>
<p>{esc(SEQUENCE_INTRO)}</p>
{drawn.html["sequence_variance"]}
<p>var X: the exact variance of one per-sequence estimate of X, by enumeration; RB/X exact and measured: the
Rao-Blackwellized estimator's variance over X's, exact and as the study measured it (below 1 it helps).</p>
{_table(pd.DataFrame(rows), "seqtruth left")}
<h3>Sequence study</h3>
<p>{esc(_noise_rule(len(seq)))}</p>
{_study_table(seq)}
{drawn.html["loss_curves"]}"""


@figure("sequence_variance", "per-sequence variance of k1, k3 and Rao-Blackwellized KL per case",
        "Variance of one per-sequence estimate on each sequence case (log axis): the study's measurement "
        "(bars, n = 1) and the exact value by enumeration (black ticks). Where a bar falls far below its tick "
        "the per-sequence estimate is heavy-tailed (k3 and seq_k3 on the Bayesian-network cases: a rare "
        "sequence has a huge ratio q/p), and a few thousand replicates rarely see the tail. At the sequence "
        "level k3 can be far noisier than k1. The Rao-Blackwellized estimator "
        "is never negative and is below k1 on every case here (it need not be in general: the exact "
        "difference is Σ_t E[Var(k1_t | x_<t) + 2 Cov(k1_t, KL still to come | x_<t)]). On the top-k case, "
        "k1 and rao_blackwell coincide: both kept tokens have the same log-ratio −log Z_t(prefix).",
        section="sequences")
def _sequence_variance(data: ReportData, path: Path) -> None:
    seq = data.sequences
    figures.sequence_variances(seq.assign(**{"exact var": [_exact_variance(c, e) for c, e
                                                            in zip(seq["case"], seq["estimator"])]}), path)


@figure("loss_curves", "training loss curves of the reference checkpoints",
        "Training loss (negative log-likelihood, nats per sequence, averaged over blocks of steps) of every "
        "committed checkpoint's seeded recipe (`estbench train` retrains them).", section="sequences")
def _loss_curves(data: ReportData, path: Path) -> None:
    from reference_models.train import checkpoint_names, load_checkpoint

    figures.loss_curves({n: load_checkpoint(n)[1] for n in checkpoint_names() if "@" not in n}, path)


@section("gradients", needs=lambda data: data.gradients is not None and not data.gradients.empty,
         unavailable="which objective each KL loss optimizes (no gradient case in this report)")
def _gradients(data: ReportData, drawn: Drawn) -> str:
    frame = data.gradients.assign(loss=lambda f: [ESTIMATORS[e].label if e in ESTIMATORS else e for e in f.estimator])
    cols = ["estimator", "loss", "case", "policy", "verdict", "follows", "rel_bias", "cos_kl", "cos_reverse_kl",
            "detectable", "grad_var", "n", "reason"]
    return f"""<h2>Which objective does each KL loss optimize?</h2>
<p>{esc(GRADIENT_INTRO)}</p>
{drawn.html["gradient_angle"]}
{drawn.html["gradient_error"]}
{_table(frame[cols], "gradients", ["biased" if v == "caught" else "" for v in frame["verdict"]])}"""


@figure("gradient_angle", "angle between each loss's expected gradient and the true gradient, loss × case",
        "Angle (degrees) between each KL loss's measured expected gradient and the exact ∇θ KL(p_θ‖q), within "
        "the gate's six directions (blank: unverifiable). 0° and a verdict of holds is the right objective; k3 "
        "as a loss points along ∇KL(q‖p) instead (on one token exactly), k1 as a loss has expected gradient "
        "zero (its angle is noise), and the per-token forms miss the KL of the tokens still to come on "
        "sequences and the importance weight off-policy.", section="gradients")
def _gradient_angle(data: ReportData, path: Path) -> None:
    figures.gradient_angles(data.gradients, path)


@figure("gradient_error", "relative RMSE of a batch-mean gradient vs batch size, one panel per gradient case",
        "Relative root-mean-square error of the gradient averaged over a batch of B samples, √(bias² + "
        "grad_var/B)/‖∇KL‖, from each cell's measured bias and per-sample variance (the gate's six directions): "
        "a biased loss flattens at its bias however large the batch; an unbiased one falls as 1/√B. Losses: "
        "{losses}.", section="gradients")
def _gradient_error(data: ReportData, path: Path) -> dict:
    shown = [e for e in GRADIENT_FIGURE_LOSSES if e in set(data.gradients.estimator)]
    figures.gradient_error_vs_batch(data.gradients, shown, path)
    return {"losses": ", ".join(shown)}


@section("marginal", needs=lambda data: data.marginal is not None and not data.marginal.empty,
         unavailable="log-of-mean bias vs K (no marginal study)")
def _marginal(data: ReportData, drawn: Drawn) -> str:
    marginal = data.marginal
    lme = marginal[(marginal["estimator"] == MARGINAL_BASELINE) & marginal["theory_second"].notna()]
    ratios = lme[["case", "K", "bias_cv", "bias_cv_se", "theory_first", "theory_second"]]
    ratios = ratios.assign(**{"measured / theory": ratios["bias_cv"] / ratios["theory_second"]})
    noise = marginal.assign(noise=at_noise(marginal["bias_cv"], marginal["bias_cv_se"], marginal["truth"],
                                           critical_z(len(marginal))))
    wide = noise.pivot_table(index=["case", "K"], columns="estimator", values="bias_cv").reset_index()
    at_noise_level = noise.pivot_table(index=["case", "K"], columns="estimator", values="noise").reset_index()
    for other in marginal["estimator"].unique():
        if other != MARGINAL_BASELINE and MARGINAL_BASELINE in wide:
            ratio = (wide[MARGINAL_BASELINE].abs() / wide[other].abs()).astype(object)
            ratio[at_noise_level[other] == 1] = "noise"  # a ratio to a bias at noise level measures the noise
            wide[f"|bias| / |bias {other}|"] = ratio
    wide.columns = [str(c) for c in wide.columns]  # drop the pivot's column name ("estimator"), an empty header
    top = marginal[marginal["estimator"] == MARGINAL_BASELINE]
    top = top[top["K"] == top["K"].max()][["case", "K", "khat", "ess"]]
    return f"""<h2>Marginal likelihoods: the bias of log-of-mean</h2>
<p>{esc(MARGINAL_INTRO)}</p>
{drawn.html["marginal_bias_vs_k"]}
<h3>Measured bias of log Â over the second-order prediction</h3>
{_table(ratios, "ratios left")}
<h3>Bias (control-variate estimate) of each estimator, and the jackknife's reduction</h3>
<p>{esc(_noise_rule(len(marginal)))} "noise" marks a reduction ratio whose denominator is at noise level: the
jackknife removed the bias as far as this study can see, and the ratio would only measure the noise.</p>
{_table(wide, "jack left")}
<h3>Weight diagnostics at the largest K (one estimate)</h3>
{_table(top.assign(reading=top["khat"].map(_khat_reading)), "diag left")}
<h3>Free parameters of discrete models</h3>
{_table(parameter_table(), "params left")}"""


def _khat_reading(khat: float) -> str:
    """What one Pareto k̂ says (PSIS's thresholds), −∞ and NaN included."""
    if math.isnan(khat):
        return "not computed (K < 64)"
    if khat == -math.inf:
        return "no tail to fit: the weights take few distinct values"
    return "reliable" if khat < 0.5 else "slow to converge" if khat < 0.7 else "not to be trusted at this K"


@figure("marginal_bias_vs_k", "K times the bias of log-of-mean and the jackknifes vs K with theory",
        "K × bias of log Â (log_mean_exp) and of the jackknifes against K, one panel per case, ±2 SE. "
        "The delta method's first-order prediction is the flat dashed line −μ₂/2; the dotted line adds the "
        "second-order term. The jackknifes' K × bias goes to 0.", section="marginal")
def _marginal_bias(data: ReportData, path: Path) -> None:
    figures.marginal_bias_vs_k(data.marginal, path)


@section("seeds", needs=lambda data: data.experiments is not None,
         unavailable="the exact KL experiments (not run)")
def _seeds(data: ReportData, drawn: Drawn) -> str:
    return f"""<h2>Forward and reverse KL, autoregressive orderings, code lengths: three exact experiments</h2>
{drawn.html["bimodal_fits"]}
{_table(data.experiments["bimodal"]["table"], "fits left")}
{drawn.html["ar_hypothesis_spaces"]}
<h3>Entropy, cross-entropy and KL in bits (p = (½, ¼, ¼), q = (¼, ½, ¼))</h3>
{_table(data.experiments["entropy"]["table"], "entropy left")}
{_table(data.experiments["entropy"]["code_lengths"], "codes left")}"""


@figure("bimodal_fits", "forward and reverse KL fits of a Gaussian to a bimodal mixture",
        "A Gaussian fitted to the bimodal mixture p by minimising the forward KL(p‖q) covers both modes "
        "(moment matching: μ = 0, σ² = 4.25), by minimising the reverse KL(q‖p) it picks one mode "
        "(KL ≈ log 2). Every KL is exact (quadrature).", section="seeds")
def _bimodal(data: ReportData, path: Path) -> None:
    experiments.plot_bimodal_fits(data.experiments["bimodal"], path)


@figure("ar_hypothesis_spaces", "forward and reverse autoregressive hypothesis spaces",
        "Forward autoregressive model z1 ~ N(0,1), z2 | z1 ~ N(1[z1 > 0], 0.1²): the marginal of z2 is bimodal. "
        "A reverse-order model with Gaussian conditionals must model z2 first with one Gaussian; its best fit "
        "N({a:.3f}, {b:.3f}²) loses {loglik_gap:.3f} nats per sample (exactly {gap_exact.value:.4f}, by "
        "quadrature): the two orders have different hypothesis spaces.", section="seeds")
def _hypothesis_spaces(data: ReportData, path: Path) -> dict:
    experiments.plot_hypothesis_spaces(data.experiments["ar"], path)
    return data.experiments["ar"]


@section("throughput", needs=lambda data: data.throughput is not None, unavailable="throughput (not timed)")
def _throughput(data: ReportData, drawn: Drawn) -> str:
    """Time per estimator on 10⁶ float32 log-prob pairs, a whole study and the vocabulary KL, each against its floor."""
    from .throughput import BUSY_SPREAD, REPEAT, TIMING_THREADS, busy_warning

    tables = data.throughput
    warning = busy_warning(tables)
    return f"""<h2>Throughput on this machine</h2>
{f'<p class="warning">{esc(warning)}</p>' if warning else ""}
<p>Median of {REPEAT} runs (5 for the whole study) with {TIMING_THREADS} intra-op thread, timed in this process;
spread is the interquartile range over the median (above {BUSY_SPREAD:.0%} the machine was busy). The floor of an
estimator is one exp and one log pass over as many elements; the floor of a whole study is drawing its samples plus
that pass (float64 is the dtype its ground-truth models draw in; float32 is shown for reference); the floor of the
exact vocabulary KL is one read of both logit tensors. Ratios to a floor timed beside the work cancel most of a machine's speed, not all of
it (cache sizes and vector units differ); asv tracks them over commits.</p>
{_table(tables["estimators"], "speed left")}
{_table(tables["study"], "study left")}
{_table(tables["vocabulary KL"], "vocab left")}"""


@section("history")
def _history(data: ReportData, drawn: Drawn) -> str:
    """asv's track_ metrics by commit, and the commits where one moved beyond its noise."""
    frame = data.history
    title = "<h2>Benchmark history (asv track_ metrics by commit)</h2>"
    if frame is None or frame.empty:
        return f"{title}\n<p>{esc('Not read.' if frame is None else frame.attrs.get('note', ''))}</p>"
    moved = frame[frame["moved"]].assign(commit=lambda f: f["commit"].str[:8])
    rows = moved[["benchmark", "params", "machine", "commit", "date", "value", "step", "noise"]]
    return f"""{title}
<p>{frame["commit"].nunique()} commits, {frame.groupby(["machine", "benchmark", "params"]).ngroups} series of
{frame["benchmark"].nunique()} metrics, read from asv's results. A commit is flagged when its step from the previous
commit exceeds {history.NOISE_FACTOR:g} × the series' noise (1.4826 × the median absolute deviation of its steps)
and {history.RELATIVE_FLOOR:g} of the previous value, once the series has {history.MIN_STEPS} steps; seeded
statistics repeat exactly on unchanged code, so any change of theirs is flagged. {len(moved)} flagged.</p>
{drawn.html["benchmark_history"]}
{_table(rows, "history left") if len(rows) else ""}"""


@figure("benchmark_history", "asv track_ metrics over commits, flagged commits marked",
        "Each asv track_ metric over the commits (value over the series' median; one line per parameter set and "
        "machine); a red × marks a commit where the metric moved beyond its noise.",
        needs=lambda data: data.history is not None and not data.history.empty,
        unavailable="the benchmark history (no asv results read)", section="history")
def _benchmark_history(data: ReportData, path: Path) -> None:
    history.draw_history(data.history, path)


@section("study")
def _study(data: ReportData, drawn: Drawn) -> str:
    return f"<h2>Study table</h2>\n<p>{esc(_noise_rule(len(data.kl)))}</p>\n{_study_table(data.kl)}"


@section("truths")
def _truths(data: ReportData, drawn: Drawn) -> str:
    rows = []
    for name in data.kl["case"].unique():
        case = get_case(name)
        rows.append({"case": name, "p ‖ q": f"{case.p.describe()} ‖ {case.q.describe()}",
                     "KL(p‖q)": case.truth.value, "how it was obtained": case.truth.describe(),
                     "E_p[q/p]": case.moments.mean_r.value, "E_p[(q/p)²]": case.moments.mean_r2.value,
                     "breaks": ", ".join(case.breaks) or "–", "description": case.description})
    return f"<h2>Cases and how each truth was obtained</h2>\n{_table(pd.DataFrame(rows), 'truths left')}"


@section("provenance")
def _provenance(data: ReportData, drawn: Drawn) -> str:
    rows = "".join(f"<tr><th>{esc(str(k))}</th><td>{esc(str(v))}</td></tr>" for k, v in data.provenance.items())
    return f'<h2>Provenance</h2><table class="provenance">{rows}</table>\n{_asv_link()}'


# --- the page -------------------------------------------------------------------------------------------------------------

def render(data: ReportData, out_dir: str | Path) -> Path:
    """Draw the figures of ``data`` into ``out_dir/figures/*.png`` and write the page ``out_dir/index.html``;
    returns its path."""
    out = Path(out_dir)
    fig_dir = out / "figures"
    fig_dir.mkdir(parents=True, exist_ok=True)
    drawn, shown = Drawn({}, []), []
    for sec in SECTIONS:
        if not sec.needs(data):
            drawn.not_drawn.append(sec.unavailable)
            continue
        shown.append(sec)
        for fig in (f for f in FIGURES if f.section == sec.id):
            if not fig.needs(data):
                drawn.not_drawn.append(fig.unavailable)
                continue
            fields = fig.draw(data, fig_dir / f"{fig.name}.png") or {}
            drawn.html[fig.name] = _figure(f"{fig.name}.png", fig.alt.format(**fields), len(drawn.html) + 1,
                                           fig.caption.format(**fields))
    frame = data.kl
    scope = (f"{frame['case'].nunique()} cases × {frame['estimator'].nunique()} estimators × n ∈ "
             f"{{{', '.join(map(str, sorted(frame['n'].unique())))}}}, "
             f"{', '.join(map(str, sorted(frame['replicates'].unique())))} replicates per cell.")
    body = "\n".join(f'<section id="{sec.id}">{sec.render(data, drawn)}</section>' for sec in shown)
    page = f"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><title>estbench: KL and marginal-likelihood estimator study</title>
<style>{CSS}</style></head><body>
<h1>estbench: KL and marginal-likelihood estimator study</h1>
<p>{esc(INTRO)} {esc(scope)}</p>
{body}
<script>{SORT_JS}</script>
</body></html>
"""
    path = out / "index.html"
    path.write_text(page, encoding="utf-8")
    return path
