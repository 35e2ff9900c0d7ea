r"""The course notes' three experiments on KL, computed exactly where they can be and drawn for the report.

1. :func:`fit_gaussian_to_bimodal`: fit a single Gaussian to a bimodal mixture by minimising the forward
   KL(p‖q) (mode covering, the moment-matching Gaussian) and the reverse KL(q‖p) (mode seeking, one mode).
2. :func:`autoregressive_hypothesis_spaces`: an autoregressive model with Gaussian conditionals, written in
   the order (z1, z2), has a bimodal marginal of z2 that the reverse order (z2 first, a single Gaussian)
   cannot represent: the two orders do not span the same hypothesis space.
3. :func:`entropy_table` and :func:`code_length_table`: entropy, cross-entropy and KL in bits for the
   notes' three-symbol code example, KL(p‖q) = H(p, q) − H(p).

Each experiment returns plain data (numbers, arrays, pandas frames, :class:`~reference_models.Truth`);
the ``plot_*`` functions save one PNG each, and :func:`run_all` runs every experiment for the HTML report.
"""
from __future__ import annotations

import math
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402
import seaborn as sns  # noqa: E402
import torch  # noqa: E402
from scipy import optimize, stats  # noqa: E402

from reference_models import Gaussian, GaussianMixture, exact_kl  # noqa: E402
from reference_models.cases import bimodal  # noqa: E402

from .figures import save  # noqa: E402
from .stats import positive_int  # noqa: E402

__all__ = ["fit_gaussian_to_bimodal", "plot_bimodal_fits", "autoregressive_hypothesis_spaces",
           "plot_hypothesis_spaces", "entropy_table", "code_length_table", "run_all", "FORWARD_LABEL",
           "REVERSE_LABEL"]

FORWARD_LABEL = "forward KL(p‖q): mode covering"
REVERSE_LABEL = "reverse KL(q‖p): mode seeking"


# --- 1. forward vs reverse KL: one Gaussian fitted to a bimodal mixture -----------------------------------

def _mixture_moments(p: GaussianMixture) -> tuple[float, float]:
    """Mean and variance of a 1-D mixture: μ = Σ w_k μ_k, σ² = Σ w_k (σ_k² + μ_k²) − μ²."""
    w, m, s = (t.double() for t in (p.weights, p.locs, p.scales))
    mean = float((w * m).sum())
    return mean, float((w * (s ** 2 + m ** 2)).sum()) - mean ** 2


def _fit(objective, start: tuple[float, float]) -> dict:
    """Minimise ``objective(μ, σ)`` over (μ, log σ) with BFGS (finite-difference gradients of quadrature)."""
    def f(theta):
        value = objective(float(theta[0]), math.exp(float(theta[1])))
        return value if math.isfinite(value) else 1e10  # a line-search step far outside the useful range

    res = optimize.minimize(f, [start[0], math.log(start[1])], method="BFGS", options={"gtol": 1e-6})
    mu, sigma = float(res.x[0]), math.exp(float(res.x[1]))
    return dict(mu=mu, sigma=sigma, sigma2=sigma ** 2, start=tuple(start), success=bool(res.success),
                message=str(res.message), nfev=int(res.nfev))


def fit_gaussian_to_bimodal(mixture: GaussianMixture | None = None, *,
                            forward_start: tuple[float, float] = (1.0, 1.0),
                            reverse_start: tuple[float, float] | None = None) -> dict:
    r"""Fit q = N(μ, σ²) to a 1-D mixture p by minimising each direction of KL.

    Forward, KL(p‖q) = −H(p) − E_p[log q]: q must put mass wherever p has it (mode covering), and the
    minimiser over Gaussians is moment matching, μ = E_p[x], σ² = Var_p[x] (0 and 4.25 for the default p).
    Reverse, KL(q‖p) = E_q[log q − log p]: q is punished for mass where p has none, so from a start near
    one mode it locks onto that mode (mode seeking): μ ≈ 2, σ ≈ 0.5, KL ≈ log 2 for the default p.

    Both objectives are :func:`reference_models.exact_kl` (adaptive quadrature), minimised by BFGS over
    (μ, log σ). ``reverse_start`` (μ, σ) defaults to half a unit left of p's rightmost component, σ = 1.

    Returns ``{"p", "p_description", "moment_matching": {"mu", "sigma2"}, "forward": fit, "reverse": fit,
    "table"}``, each fit a dict with ``mu, sigma, sigma2, start, success, message, nfev``, ``objective``
    (its name), ``kl`` (the Truth of the minimised objective at the optimum) and ``kl_pq``/``kl_qp``
    (KL(p‖q) and KL(q‖p) at the optimum, :class:`~reference_models.Truth` with method and error bound);
    ``table`` is a pandas frame with one row per fit.
    """
    p = bimodal() if mixture is None else mixture
    if not isinstance(p, GaussianMixture) or p.scales is None:
        raise ValueError(f"mixture must be a 1-D reference_models.GaussianMixture, got {p!r}")
    if reverse_start is None:
        k = int(torch.argmax(p.locs))
        reverse_start = (float(p.locs[k]) - 0.5, 1.0)
    for name, start in (("forward_start", forward_start), ("reverse_start", reverse_start)):
        if len(start) != 2 or not math.isfinite(start[0]) or not (start[1] > 0 and math.isfinite(start[1])):
            raise ValueError(f"{name} must be (mu, sigma) with finite mu and sigma > 0, got {start!r}")

    fits = {"forward": _fit(lambda mu, s: exact_kl(p, Gaussian(mu, s)).value, forward_start),
            "reverse": _fit(lambda mu, s: exact_kl(Gaussian(mu, s), p).value, reverse_start)}
    for key, fit in fits.items():
        q = Gaussian(fit["mu"], fit["sigma"])
        fit["kl_pq"], fit["kl_qp"] = exact_kl(p, q), exact_kl(q, p)
        fit["objective"] = "KL(p‖q)" if key == "forward" else "KL(q‖p)"
        fit["kl"] = fit["kl_pq"] if key == "forward" else fit["kl_qp"]
        fit["label"] = FORWARD_LABEL if key == "forward" else REVERSE_LABEL

    mean, var = _mixture_moments(p)
    table = pd.DataFrame([{"fit": f["label"], "μ": f["mu"], "σ": f["sigma"], "σ²": f["sigma2"],
                           "KL(p‖q) [nats]": f["kl_pq"].value, "KL(q‖p) [nats]": f["kl_qp"].value,
                           "method": f"{f['kl'].method} (error ≤ {f['kl'].error_bound:.1e})",
                           "converged": f["success"]} for f in fits.values()])
    return {"p": p, "p_description": p.describe(), "moment_matching": {"mu": mean, "sigma2": var},
            **fits, "table": table}


def plot_bimodal_fits(result: dict, path) -> Path:
    """Density of p and of both fitted Gaussians on x ∈ [−5, 5]; saves a PNG and returns its path."""
    x = torch.linspace(-5.0, 5.0, 1001, dtype=torch.float64)
    p = result["p"]
    palette = sns.color_palette("deep")
    with sns.axes_style("whitegrid"):
        fig, ax = plt.subplots(figsize=(7.5, 4.0))
        ax.fill_between(x.numpy(), p.log_prob(x).exp().numpy(), color="0.6", alpha=0.35, lw=0)
        ax.plot(x.numpy(), p.log_prob(x).exp().numpy(), color="0.25", lw=2, label=f"p = {result['p_description']}")
        for (key, ls), color in zip((("forward", "-"), ("reverse", "--")), (palette[0], palette[3])):
            fit = result[key]
            q = Gaussian(fit["mu"], fit["sigma"])
            ax.plot(x.numpy(), q.log_prob(x).exp().numpy(), ls, color=color, lw=2,
                    label=f"{fit['label']}  (μ={fit['mu']:.2f}, σ={fit['sigma']:.2f})")
        ax.set(xlim=(-5, 5), xlabel="x", ylabel="density",
               title="One Gaussian fitted to a bimodal p by minimising each direction of KL")
        ax.set_ylim(bottom=0)
        ax.legend(loc="upper left", fontsize=8, frameon=True)
        return save(fig, path)


# --- 2. autoregressive models: the order fixes the hypothesis space -----------------------------------------

COND_STD = 0.1


def autoregressive_hypothesis_spaces(n: int = 20000, seed: int = 0) -> dict:
    r"""Sample the forward model z1 ~ N(0, 1), z2 | z1 ~ N(m(z1), 0.1²), m(z1) = 1 if z1 > 0 else 0.

    Its marginal p(z2) = ½·N(0, 0.1²) + ½·N(1, 0.1²) is bimodal. The reverse order p(z2) p(z1 | z2) with
    Gaussian conditionals must model z2 first with one Gaussian N(a, b²); the maximum-likelihood one
    (the forward-KL projection of the data) is moment matching: a = mean, b = std (ddof 0) of the samples,
    exactly a = 0.5, b = √(0.25 + 0.01). The average log-likelihood gap on the samples,
    mean[log p(z2) − log N(z2; a, b²)] in nats, estimates KL(p(z2) ‖ N(a, b²)), also given exactly
    (quadrature) as ``gap_exact`` for the exact a, b.

    Returns ``{"n", "seed", "z1", "z2"`` (float64 numpy arrays), ``"a", "b", "a_exact", "b_exact",
    "loglik_bimodal", "loglik_gaussian", "loglik_gap", "gap_exact"`` (a Truth), ``"marginal"`` (the exact
    marginal, a GaussianMixture)``}``.
    """
    n = positive_int("n", n, 2)
    gen = torch.Generator().manual_seed(positive_int("seed", seed, 0))
    z1 = Gaussian(0.0, 1.0).sample(n, generator=gen)
    m = (z1 > 0).double()
    z2 = m + COND_STD * torch.randn(n, generator=gen, dtype=torch.float64)

    marginal = GaussianMixture(weights=[0.5, 0.5], locs=[0.0, 1.0], scales=[COND_STD, COND_STD])
    a, b = float(z2.mean()), float(z2.std(correction=0))
    ll_mix = float(marginal.log_prob(z2).mean())
    ll_gauss = float(Gaussian(a, b).log_prob(z2).mean())
    a_exact, b_exact = 0.5, math.sqrt(0.25 + COND_STD ** 2)
    return {"n": n, "seed": seed, "z1": z1.numpy(), "z2": z2.numpy(), "a": a, "b": b,
            "a_exact": a_exact, "b_exact": b_exact, "loglik_bimodal": ll_mix, "loglik_gaussian": ll_gauss,
            "loglik_gap": ll_mix - ll_gauss, "gap_exact": exact_kl(marginal, Gaussian(a_exact, b_exact)),
            "marginal": marginal}


def plot_hypothesis_spaces(result: dict, path, subsample: int = 2000) -> Path:
    """Left: histogram of z2 with the exact bimodal marginal and the reverse model's Gaussian; right: a
    scatter of (z1, z2) (``subsample`` points, seeded). Saves a PNG and returns its path."""
    z1, z2 = result["z1"], result["z2"]
    grid = torch.linspace(float(z2.min()) - 0.3, float(z2.max()) + 0.3, 800, dtype=torch.float64)
    exact = result["marginal"].log_prob(grid).exp().numpy()
    single = Gaussian(result["a"], result["b"]).log_prob(grid).exp().numpy()
    palette = sns.color_palette("deep")
    rng = np.random.default_rng(result["seed"])
    idx = rng.choice(len(z1), size=min(subsample, len(z1)), replace=False)
    with sns.axes_style("whitegrid"):
        fig, (left, right) = plt.subplots(1, 2, figsize=(11.5, 4.0), gridspec_kw={"width_ratios": [1.25, 1]})
        sns.histplot(x=z2, stat="density", bins=120, color="0.7", edgecolor="none", ax=left,
                     label=f"samples of z2 (n={result['n']:,})")
        left.plot(grid.numpy(), exact, color=palette[0], lw=2,
                  label="forward order: p(z2) = ½N(0, 0.1²) + ½N(1, 0.1²)")
        left.plot(grid.numpy(), single, "--", color=palette[3], lw=2,
                  label=f"reverse order: best single Gaussian N({result['a']:.2f}, {result['b']:.2f}²)")
        left.set(xlabel="z2", ylabel="density",
                 title=f"Marginal of z2 (log-likelihood gap {result['loglik_gap']:.2f} nats)")
        left.legend(loc="upper center", fontsize=8, frameon=True)
        left.set_ylim(0, 1.35 * max(exact.max(), left.get_ylim()[1]))
        hue = np.where(z1[idx] > 0, "z1 > 0: m = 1", "z1 ≤ 0: m = 0")
        sns.scatterplot(x=z1[idx], y=z2[idx], hue=hue, hue_order=["z1 ≤ 0: m = 0", "z1 > 0: m = 1"],
                        s=8, alpha=0.5, linewidth=0, palette=[palette[2], palette[1]], ax=right)
        right.set(xlabel="z1 ~ N(0, 1)", ylabel="z2 | z1 ~ N(m(z1), 0.1²)",
                  title=f"Joint samples (z1, z2), {len(idx):,} shown")
        right.legend(loc="upper left", fontsize=8, markerscale=2, frameon=True)
        fig.tight_layout()
        return save(fig, path)


# --- 3. entropy, cross-entropy and KL in bits -----------------------------------------------------------------

P_CODE = np.array([0.5, 0.25, 0.25])
Q_CODE = np.array([0.25, 0.5, 0.25])


def entropy_table(p=P_CODE, q=Q_CODE) -> pd.DataFrame:
    r"""H(p) = Σ p log2(1/p), H(p, q) = Σ p log2(1/q) = H(p) + KL(p‖q), KL(p‖q) = Σ p log2(p/q), in bits,
    by ``scipy.stats.entropy(..., base=2)``; for the notes' p = (½, ¼, ¼), q = (¼, ½, ¼): 1.5, 1.75, 0.25.
    Columns ``quantity, formula, bits``."""
    p, q = np.asarray(p, dtype=np.float64), np.asarray(q, dtype=np.float64)
    h = float(stats.entropy(p, base=2))
    kl = float(stats.entropy(p, q, base=2))
    return pd.DataFrame({
        "quantity": ["entropy H(p)", "cross-entropy H(p, q)", "KL(p‖q)"],
        "formula": ["Σ p(x) log₂ 1/p(x)", "Σ p(x) log₂ 1/q(x)", "H(p, q) − H(p)"],
        "bits": [h, h + kl, kl],
    })


def code_length_table(p=P_CODE, q=Q_CODE) -> pd.DataFrame:
    """Per symbol: p(x), q(x), the optimal code lengths −log2 p(x) and −log2 q(x) in bits (1, 2, 2 and
    2, 1, 2 for the notes' example), and prefix codewords with those lengths (0, 10, 11 and 10, 0, 11)."""
    p, q = np.asarray(p, dtype=np.float64), np.asarray(q, dtype=np.float64)
    frame = pd.DataFrame({"symbol": [chr(ord("a") + i) for i in range(len(p))], "p(x)": p, "q(x)": q,
                          "−log₂ p(x) [bits]": -np.log2(p), "−log₂ q(x) [bits]": -np.log2(q)})
    lengths_p, lengths_q = frame["−log₂ p(x) [bits]"], frame["−log₂ q(x) [bits]"]
    if np.allclose(lengths_p, np.round(lengths_p)) and np.allclose(lengths_q, np.round(lengths_q)):
        frame["code for p"] = _canonical_code(np.round(lengths_p).astype(int))
        frame["code for q"] = _canonical_code(np.round(lengths_q).astype(int))
    return frame


def _canonical_code(lengths) -> list[str]:
    """A canonical prefix code with the given integer lengths (Kraft sum ≤ 1 assumed)."""
    order = sorted(range(len(lengths)), key=lambda i: (lengths[i], i))
    words, code, prev = [""] * len(lengths), 0, 0
    for i in order:
        code <<= lengths[i] - prev
        words[i], prev = format(code, f"0{lengths[i]}b"), lengths[i]
        code += 1
    return words


# --- all of it, for the report ------------------------------------------------------------------------------------

def run_all() -> dict:
    """Run the three experiments for the report (drawn by :func:`plot_bimodal_fits` and
    :func:`plot_hypothesis_spaces`).

    Returns ``{"bimodal": {...fit result}, "ar": {...result}, "entropy": {"table": frame, "code_lengths": frame}}``.
    """
    return {"bimodal": fit_gaussian_to_bimodal(), "ar": autoregressive_hypothesis_spaces(),
            "entropy": {"table": entropy_table(), "code_lengths": code_length_table()}}
