"""The HTML report of a study: one self-contained page (inline CSS and JS, no network) with PNG figures
in ``figures/`` beside it."""
from __future__ import annotations

import html
from pathlib import Path

import pandas as pd

from reference_models import get_case
from reference_models.bayesnet import parameter_table

from . import experiments, figures, throughput
from .catalog import ESTIMATORS, exact_moments, get_estimator
from .study import COLUMNS

__all__ = ["write_report"]

TABLE_COLUMNS = ["case", "estimator", "n", "truth", "mean", "bias", "bias_se", "rel_bias", "rsd", "rmse",
                 "frac_negative", "nonfinite", "truth_method"]
esc = html.escape

CSS = """
body { font-family: system-ui, sans-serif; max-width: 1400px; margin: 2em auto; padding: 0 1em; color: #222; }
figure { margin: 1.5em 0; } figure img { max-width: 100%; } figcaption { font-size: 0.9em; color: #444; }
table { border-collapse: collapse; font-size: 0.85em; }
th, td { padding: 2px 8px; border-bottom: 1px solid #ddd; text-align: right; white-space: nowrap; }
th { background: #f0f0f0; cursor: pointer; } th.sorted-asc::after { content: " ▲"; } th.sorted-desc::after { content: " ▼"; }
.table-wrap { overflow: auto; max-height: 70vh; border: 1px solid #ccc; }
table.study { font-size: 12px; } table.study th { position: sticky; top: 0; z-index: 1; }
table.provenance th, table.provenance td, table.left td, table.left th { text-align: left; white-space: normal; }
.waiting { color: #777; font-style: italic; }
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

CAPTIONS = {
    "rsd": "Relative standard deviation of one per-sample estimate, rsd = √var / |truth|, with var = n × the "
           "variance of the replicate means. For i.i.d. estimators rsd does not depend on n, so lines are flat up "
           "to noise, and the samples needed for a given relative error scale as rsd². When q is close to p, k1's "
           "rsd grows like √(2 / KL) while k2's and k3's stay near √2. Where a case breaks an estimator's "
           "finite-variance assumption (see above) its rsd is noise that grows with n, not a property.",
    "bias": "Relative bias (mean − truth) / |truth| with a ±2 standard-error band; the dashed line is zero and the "
            "y axis is linear within ±0.02 and logarithmic beyond. An unbiased estimator's band covers zero in "
            "about 95% of cells. k2 is biased by design (it targets E[(log r)²]/2); k3-type estimators are biased "
            "by E_p[r] − 1 where q has mass outside p's support; on infinite-variance cases the bias is noise.",
    "dist": "Single-sample estimates on one case. k1 = −log r is negative whenever q(x) > p(x), often about half "
            "the time when q is close to p, and only its mean is right; k3 adds r − 1, which has mean zero, and "
            "is never negative; k2 is never negative but biased.",
    "cv": "Variance of the leave-one-out control variate k1 + λ̂(r − 1) relative to k1 and to k3 (λ = 1) at the "
          "largest n, per case. Below 1 it helps. Its variance ratios mean nothing on cases that break the "
          "support or finite-variance assumptions (listed above).",
    "clamp": "The production clamps on the heavy-ratio case, where |log r| > 20 with probability ≈ 4%: verl's "
             "low_var_kl and OpenRLHF's k3 cap each estimate at 10, which removes a quarter of the KL; k3 itself "
             "is unbiased there. Bars: ±2 standard errors.",
}


def _table(frame: pd.DataFrame, css_class: str) -> str:
    return frame.to_html(index=False, border=0, classes=f"{css_class} sortable", na_rep="–",
                         float_format=lambda v: f"{v:.4g}")


def _figure(name: str, alt: str, number: int, caption: str) -> str:
    return (f'<figure><img src="figures/{name}" alt="{esc(alt)}">'
            f"<figcaption>Figure {number}. {esc(caption)}</figcaption></figure>")


def _summary(frame: pd.DataFrame) -> pd.DataFrame:
    present = set(frame["estimator"])
    refs = {ref: frame[frame["estimator"] == ref].set_index(["case", "n"])["var"] for ref in ("k1", "k3")
            if ref in present}
    refs = {ref: v[v > 0] for ref, v in refs.items()}  # a constant reference (uniform-support) has no ratio
    rows = []
    for name, g in frame.groupby("estimator", sort=False):
        consistent = g["bias"].abs() <= 4 * g["bias_se"] + figures.ROUNDING * g["truth"].abs()
        abs_rel = g["rel_bias"].abs().dropna()
        worst = g.loc[abs_rel.idxmax()] if len(abs_rel) else None
        row = {"estimator": name, "definition": ESTIMATORS[name].label if name in ESTIMATORS else "",
               "cells with |bias| ≤ 4·SE": f"{int(consistent.sum())} / {len(g)}",
               "worst |rel_bias|": "–" if worst is None
               else f"{abs(worst['rel_bias']):.4g} ({worst['case']}, n = {worst['n']})",
               "median rsd": g["rsd"].median()}
        for ref, ref_var in refs.items():
            row[f"median var / var({ref})"] = (g.set_index(["case", "n"])["var"] / ref_var).dropna().median()
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


def _truths(frame: pd.DataFrame) -> pd.DataFrame:
    rows = []
    for name in frame["case"].unique():
        case = get_case(name)
        rows.append({"case": name, "p ‖ q": f"{case.p.describe()} ‖ {case.q.describe()}",
                     "KL(p‖q)": case.truth.value, "how it was obtained": case.truth.describe(),
                     "E_p[q/p]": case.moments.mean_r.value, "E_p[(q/p)²]": case.moments.mean_r2.value,
                     "breaks": ", ".join(case.breaks) or "–", "description": case.description})
    return pd.DataFrame(rows)


def _seed_experiments(fig_dir: Path, first_number: int) -> str:
    """The course notes' experiments: fits of a Gaussian to a bimodal mixture, autoregressive
    hypothesis spaces, and entropy / cross-entropy / KL in bits."""
    results = experiments.run_all(fig_dir)
    bimodal, ar, entropy = results["bimodal"], results["ar"], results["entropy"]
    fits = bimodal["table"]
    ar_caption = (f"Forward autoregressive model z1 ~ N(0,1), z2 | z1 ~ N(1[z1 > 0], 0.1²): the marginal of z2 "
                  f"is bimodal. A reverse-order model with Gaussian conditionals must model z2 first with one "
                  f"Gaussian; its best fit N({ar['a']:.3f}, {ar['b']:.3f}²) loses {ar['loglik_gap']:.3f} nats per "
                  f"sample (exactly {ar['gap_exact'].value:.4f}, by quadrature): the two orders have different "
                  "hypothesis spaces.")
    fit_caption = ("A Gaussian fitted to the bimodal mixture p by minimising the forward KL(p‖q) covers both modes "
                   "(moment matching: μ = 0, σ² = 4.25), by minimising the reverse KL(q‖p) it picks one mode "
                   "(KL ≈ log 2). Every KL is exact (quadrature).")
    return f"""<section id="seeds"><h2>The course notes' experiments</h2>
{_figure(bimodal["figure"].name, "forward and reverse KL fits of a Gaussian to a bimodal mixture", first_number,
         fit_caption)}
<div class="table-wrap">{_table(fits, "fits left")}</div>
{_figure(ar["figure"].name, "forward and reverse autoregressive hypothesis spaces", first_number + 1, ar_caption)}
<h3>Entropy, cross-entropy and KL in bits (p = (½, ¼, ¼), q = (¼, ½, ¼))</h3>
<div class="table-wrap">{_table(entropy["table"], "entropy left")}</div>
<div class="table-wrap">{_table(entropy["code_lengths"], "codes left")}</div></section>"""


def _throughput(estimators: list[str], seed: int) -> str:
    """Time per estimator on 10⁶ float32 log-prob pairs, a whole study and the vocabulary KL, each against its floor."""
    tables = throughput.throughput_tables([(e, get_estimator(e).fn) for e in estimators], seed)
    est, study, vocab = tables["estimators"], tables["study"], tables["vocabulary KL"]
    return f"""<section id="throughput"><h2>Throughput on this machine</h2>
<p>Best of three runs, timed in this process. The floor of an estimator is one exp and one log pass over as
many elements; the floor of a whole study is drawing its samples plus that pass (float64 is the dtype its
ground-truth models draw in; float32 is shown for reference); the floor of the exact vocabulary KL is one read
of both logit tensors. Ratios to the floor do not depend on the machine; asv tracks them over commits.</p>
<div class="table-wrap">{_table(est, "speed left")}</div>
<div class="table-wrap">{_table(study, "study left")}</div>
<div class="table-wrap">{_table(vocab, "vocab left")}</div></section>"""


SEQUENCE_INTRO = (
    "Pairs of trained autoregressive models (FVSBN, NADE, MADE on binarized 4×4 scikit-learn digits and on "
    "samples of a known Bayesian network; a small transformer on a hidden Markov source) and the sources "
    "themselves. Every sequence is enumerated (2¹⁴–5⁸ of them), so the sequence KL and the exact variance of "
    "each per-sequence estimator are known; sequences are drawn exactly from p by inverse CDF over that "
    "enumeration. Per-token estimators (k1, k2, k3 and the clamped variants) are summed over the tokens of a "
    "sequence as RLHF code does; seq_k3 is k3 of the whole-sequence ratio; rao_blackwell sums the exact "
    "next-step KL at each sampled prefix (Amini, Vieira & Cotterell 2025).")

MARGINAL_INTRO = (
    "log Â with Â = (1/K) Σ w_k, w = p(x, z)/q(z|x), z ~ q, is the IWAE bound: Â is unbiased for p(x) but "
    "E[log Â] ≤ log p(x) (Jensen). The delta method predicts the bias −μ₂/(2K) to first order and adds "
    "(μ₃/(3μ³) − 3μ₂²/(4μ⁴))/K² to second (Nowozin 2018), with μ₂, μ₃ the exact central moments of the "
    "normalized weight w/p(x) (closed form for log-normal weights and Gaussian pairs, finite sums for discrete "
    "latents). The jackknife removes the 1/K term (order 1) and the 1/K² term (order 2). Biases are measured "
    "with the control variate Â/p(x) − 1, whose mean is exactly 0, so that their standard errors are small.")

CAPTIONS_MORE = {
    "seqvar": "Variance of one per-sequence estimate on each sequence case (log axis): the study's measurement "
              "(bars, n = 1) and the exact value by enumeration (black ticks). Where a bar falls far below its tick "
              "the per-sequence estimate is heavy-tailed (k3 and seq_k3 on the Bayesian-network cases: a rare "
              "sequence has a huge ratio q/p), and a few thousand replicates rarely see the tail. At the sequence "
              "level k3 can be far noisier than k1. The Rao-Blackwellized estimator "
              "is never negative and is below k1 on every case here (it need not be in general: the exact "
              "difference is Σ_t E[Var(k1_t | x_<t) + 2 Cov(k1_t, KL still to come | x_<t)]). On the top-k case, "
              "k1 and rao_blackwell coincide: both kept tokens have the same log-ratio −log Z_t(prefix).",
    "loss": "Training loss (negative log-likelihood, nats per sequence, averaged over blocks of steps) of every "
            "committed checkpoint's seeded recipe (`estbench train` retrains them).",
    "marginal": "K × bias of log Â (log_mean_exp) and of the jackknifes against K, one panel per case, ±2 SE. "
                "The delta method's first-order prediction is the flat dashed line −μ₂/2; the dotted line adds the "
                "second-order term. The jackknifes' K × bias goes to 0.",
}


def _sequence_section(seq: pd.DataFrame, fig_dir: Path, first_number: int) -> str:
    from reference_models.train import checkpoint_names, load_checkpoint

    figures.sequence_variances(seq, fig_dir / "sequence_variance.png")
    figures.loss_curves({n: load_checkpoint(n)[1] for n in checkpoint_names() if "@" not in n},
                        fig_dir / "loss_curves.png")
    rows = []
    for name in seq["case"].unique():
        case = get_case(name)
        v = {k: exact_moments(ESTIMATORS[k], case)["var"].value for k in ("k1", "k3", "seq_k3", "rao_blackwell")}
        measured = seq[seq["case"] == name].set_index("estimator")["var"]
        ratio = lambda a, b, src: src[a] / src[b] if a in src and b in src and src[b] > 0 else float("nan")
        rows.append({"case": name, "KL": case.truth.value, "how": case.truth.describe(),
                     "var k1": v["k1"], "var k3": v["k3"], "var seq_k3": v["seq_k3"], "var RB": v["rao_blackwell"],
                     "RB/k1 exact": ratio("rao_blackwell", "k1", v), "RB/k3 exact": ratio("rao_blackwell", "k3", v),
                     "RB/k1 measured": ratio("rao_blackwell", "k1", measured),
                     "RB/k3 measured": ratio("rao_blackwell", "k3", measured),
                     "breaks": ", ".join(case.breaks) or "–", "description": case.description})
    return f"""<section id="sequences"><h2>Sequence-level KL on trained autoregressive models</h2>
<p>{esc(SEQUENCE_INTRO)}</p>
{_figure("sequence_variance.png", "per-sequence variance of k1, k3 and Rao-Blackwellized KL per case", first_number,
         CAPTIONS_MORE["seqvar"])}
<div class="table-wrap">{_table(pd.DataFrame(rows), "seqtruth left")}</div>
<h3>Sequence study</h3>
<div class="table-wrap">{_table(seq[TABLE_COLUMNS], "study")}</div>
{_figure("loss_curves.png", "training loss curves of the reference checkpoints", first_number + 1,
         CAPTIONS_MORE["loss"])}</section>"""


def _marginal_section(marginal: pd.DataFrame, fig_dir: Path, first_number: int) -> str:
    ratios = figures.marginal_bias_vs_k(marginal, fig_dir / "marginal_bias_vs_k.png")
    wide = marginal.pivot_table(index=["case", "K"], columns="estimator", values="bias_cv").reset_index()
    for jk in ("jackknife1", "jackknife2"):
        if jk in wide:
            wide[f"|bias| / |bias {jk}|"] = wide["log_mean_exp"].abs() / wide[jk].abs()
    top = marginal[marginal["estimator"] == "log_mean_exp"]
    top = top[top["K"] == top["K"].max()][["case", "K", "khat", "ess"]]
    return f"""<section id="marginal"><h2>Marginal likelihoods: the bias of log-of-mean</h2>
<p>{esc(MARGINAL_INTRO)}</p>
{_figure("marginal_bias_vs_k.png", "K times the bias of log-of-mean and the jackknifes vs K with theory",
         first_number, CAPTIONS_MORE["marginal"])}
<h3>Measured bias of log Â over the second-order prediction</h3>
<div class="table-wrap">{_table(ratios, "ratios left")}</div>
<h3>Bias (control-variate estimate) of each estimator, and the jackknife's reduction</h3>
<div class="table-wrap">{_table(wide, "jack left")}</div>
<h3>Weight diagnostics at the largest K (one estimate)</h3>
<p>Pareto k̂ of the weights' tail (PSIS): below 0.5 the estimate is reliable, 0.5–0.7 slow to converge, above
0.7 not to be trusted; ESS is Kish's effective sample size (Σw)²/Σw².</p>
<div class="table-wrap">{_table(top, "diag left")}</div>
<h3>Free parameters of discrete models (the course notes' examples)</h3>
<div class="table-wrap">{_table(parameter_table(), "params left")}</div></section>"""


def write_report(frame: pd.DataFrame, out_dir: str | Path, meta: dict[str, str], seed: int = 0,
                 sequence_frame: pd.DataFrame | None = None, marginal_frame: pd.DataFrame | None = None) -> Path:
    """Write ``out_dir/index.html`` and its figures ``out_dir/figures/*.png`` for a study frame of
    :func:`reports.study.run_study` on KL cases, with the sections of a sequence-case study frame and a
    marginal study frame (:func:`reports.marginal_study.run_marginal_study`) when given; ``meta`` (name ->
    text) is printed as provenance, ``seed`` seeds the per-sample figure. Returns the page's path."""
    missing = [c for c in COLUMNS if c not in frame.columns]
    if missing or frame.empty:
        raise ValueError(f"frame must be a non-empty study frame; missing columns: {missing}")
    out = Path(out_dir)
    fig_dir = out / "figures"
    fig_dir.mkdir(parents=True, exist_ok=True)
    order = list(frame["estimator"].unique())
    cases = list(frame["case"].unique())

    not_drawn = figures.rsd_vs_n(frame, fig_dir / "rsd_vs_n.png", order)
    figures.bias_vs_n(frame, fig_dir / "rel_bias_vs_n.png", order)
    blocks = [_figure("rsd_vs_n.png", "relative standard deviation vs n, one panel per case", 1,
                      CAPTIONS["rsd"] + (" Not drawn (a constant estimate, rsd = 0 up to rounding, or not "
                                         "finite): " + "; ".join(not_drawn) + "." if not_drawn else "")),
              _figure("rel_bias_vs_n.png", "relative bias vs n with a 2-SE band, one panel per case", 2,
                      CAPTIONS["bias"])]
    waiting = []
    shown = [e for e in ("k1", "k2", "k3") if e in order]
    if shown:
        case = "gauss-shift-0.1" if "gauss-shift-0.1" in cases else cases[0]
        negative = figures.per_sample_distribution(case, shown, seed, fig_dir / "per_sample.png")
        fractions = ", ".join(f"{k}: {v:.1%}" for k, v in negative.items())
        blocks.append(_figure("per_sample.png", f"histogram of single-sample estimates on {case}", len(blocks) + 1,
                              f"{CAPTIONS['dist']} Fraction of negative estimates here: {fractions}."))
    if "k1_cv" in order and {"k1", "k3"} & set(order):
        figures.variance_ratio(frame, "k1_cv", [e for e in ("k1", "k3") if e in order],
                               fig_dir / "cv_variance.png")
        blocks.append(_figure("cv_variance.png", "variance ratio of the control variate per case",
                              len(blocks) + 1, CAPTIONS["cv"]))
    else:
        waiting.append("control-variate variance reduction (needs k1_cv and k1 or k3 in the study)")
    clamped = [e for e in ("k3", "verl_low_var_kl", "openrlhf_k3") if e in order]
    if "heavy-ratio" in cases and len(clamped) > 1:
        figures.clamp_bias(frame, "heavy-ratio", clamped, fig_dir / "clamp_bias.png")
        blocks.append(_figure("clamp_bias.png", "relative bias of the clamped variants on heavy-ratio",
                              len(blocks) + 1, CAPTIONS["clamp"]))
    else:
        waiting.append("the production clamps' bias (needs the heavy-ratio case and a clamped variant)")
    number = len(blocks) + 1
    sequences = ""
    if sequence_frame is not None and not sequence_frame.empty:
        sequences, number = _sequence_section(sequence_frame, fig_dir, number), number + 2
    else:
        waiting.append("Rao-Blackwellized KL on the sequence cases (no sequence case in this study)")
    marginal = ""
    if marginal_frame is not None and not marginal_frame.empty:
        marginal, number = _marginal_section(marginal_frame, fig_dir, number), number + 1
    else:
        waiting.append("log-of-mean bias vs K (no marginal study)")

    seeds = _seed_experiments(fig_dir, first_number=number)
    speed = _throughput(order, seed)
    replicates = ", ".join(map(str, sorted(frame["replicates"].unique())))
    scope = (f"{len(cases)} cases × {len(order)} estimators × n ∈ "
             f"{{{', '.join(map(str, sorted(frame['n'].unique())))}}}, {replicates} replicates per cell.")
    broken = _broken(frame)
    provenance = "".join(f"<tr><th>{esc(str(k))}</th><td>{esc(str(v))}</td></tr>" for k, v in meta.items())
    asv = Path(".asv/html/index.html")
    asv_link = (f'<p><a href="{esc(asv.resolve().as_uri())}">asv history of the benchmarks</a></p>'
                if asv.exists() else "<p>No asv history here yet (run <code>asv run</code> and "
                                     "<code>asv publish</code> to make one).</p>")
    page = f"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><title>estbench: KL and marginal-likelihood estimator study</title>
<style>{CSS}</style></head><body>
<h1>estbench: KL and marginal-likelihood estimator study</h1>
<p>{esc(INTRO)} {esc(scope)}</p>
<section id="summary"><h2>Summary per estimator</h2>
<p>Cells consistent with the truth (|bias| ≤ 4·SE, give or take float rounding), the worst relative bias,
the median rsd, and the median variance relative to k1's and k3's on the same (case, n). Click a header to
sort.</p>
<div class="table-wrap">{_table(_summary(frame), "summary left")}</div></section>
<section id="broken"><h2>Broken assumptions</h2>
{"<ul>" + "".join(f"<li>{item}</li>" for item in broken) + "</ul>" if broken else "<p>None.</p>"}</section>
<section id="figures"><h2>Figures</h2>
{"".join(blocks)}
{f'<p class="waiting">Not drawn: {esc("; ".join(waiting))}.</p>' if waiting else ""}</section>
{sequences}
{marginal}
{seeds}
{speed}
<section id="study"><h2>Study table</h2>
<div class="table-wrap">{_table(frame[TABLE_COLUMNS], "study")}</div></section>
<section id="truths"><h2>Cases and how each truth was obtained</h2>
<div class="table-wrap">{_table(_truths(frame), "truths left")}</div></section>
<section id="provenance"><h2>Provenance</h2><table class="provenance">{provenance}</table>
{asv_link}</section>
<script>{SORT_JS}</script>
</body></html>
"""
    path = out / "index.html"
    path.write_text(page, encoding="utf-8")
    return path
