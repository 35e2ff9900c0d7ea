"""Seaborn figures of a study frame. Each function saves one PNG and returns what its caption needs."""
from __future__ import annotations

import math
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402
import seaborn as sns  # noqa: E402
from matplotlib.lines import Line2D  # noqa: E402
from matplotlib.ticker import LogFormatter, SymmetricalLogLocator  # noqa: E402

from reference_models import get_case  # noqa: E402

from .catalog import ESTIMATORS, get_estimator  # noqa: E402
from .cells import ROUNDING  # noqa: E402
from .stats import seeded  # noqa: E402

DPI = 110
#: Seaborn's colour-blind-safe palette (10 colours): one per estimator, in the catalog's order, in every figure.
PALETTE = sns.color_palette("colorblind")
#: Panels per row of a small-multiples figure, and the size of one panel (inches).
COLUMNS, PANEL = 4, (3.4, 2.6)
#: The symlog bias axis: linear within ±LINTHRESH, at most SYMLOG_TICKS labelled decades.
LINTHRESH, SYMLOG_TICKS = 0.02, 6


def color_of(name: str) -> tuple[float, float, float]:
    """The colour of estimator ``name`` in every figure: its place in the catalog among the estimators of its
    kind (KL values, log-marginals or KL losses: never drawn together) on :data:`PALETTE`."""
    kind = lambda s: s.form if s.form in ("log_weights", "loss") else "kl"
    family = [n for n, s in ESTIMATORS.items() if kind(s) == kind(get_estimator(name))]
    return PALETTE[family.index(name) % len(PALETTE)]


def colors(names) -> dict[str, tuple[float, float, float]]:
    """{name: :func:`color_of` (name)}, a seaborn ``palette``."""
    return {name: color_of(name) for name in names}


def _legend(fig, names) -> None:
    """One legend for the whole figure, right of its panels: a marker in each estimator's colour."""
    handles = [Line2D([], [], color=color_of(n), marker="o", ls="", label=n) for n in names]
    fig.legend(handles=handles, title="estimator", loc="center left", bbox_to_anchor=(1.0, 0.5), frameon=False)


def wrap(count: int, columns: int = COLUMNS) -> int:
    """Panels per row for ``count`` panels: at most ``columns``, and about as many rows as columns, so that a
    figure of a few panels and a legend stays within 3:1."""
    return max(1, min(columns, round(math.sqrt(count))))


def panels(count: int, columns: int = COLUMNS, size: tuple[float, float] = PANEL):
    """A figure of ``count`` panels, :func:`wrap` of them per row (no empty panel left over); returns (fig, axes)."""
    columns = wrap(count, columns)
    rows = -(-count // columns)
    fig, grid = plt.subplots(rows, columns, figsize=(size[0] * columns, size[1] * rows), squeeze=False)
    axes = list(grid.flat)
    for ax in axes[count:]:
        ax.remove()
    return fig, axes[:count]


def tick_labels(axis) -> list[tuple[bool, float, object]]:
    """(minor, location, label) of each tick label a drawn ``axis`` shows: inside its view, visible, with text."""
    low, high = sorted(axis.get_view_interval())
    slack = 1e-9 * max(abs(low), abs(high))
    shown = []
    for minor, locs, ticks in ((False, axis.get_majorticklocs(), axis.get_major_ticks),
                               (True, axis.get_minorticklocs(), axis.get_minor_ticks)):
        for loc, tick in zip(locs, ticks(len(locs))):
            if low - slack <= loc <= high + slack and tick.label1.get_visible() and tick.label1.get_text():
                shown.append((minor, float(loc), tick.label1))
    return shown


def declutter_ticks(fig) -> None:
    """Hide each tick label that would overlap (within 1 px) one already kept, keeping major labels before
    minor ones, 0 first, then the largest |value|: a symlog axis over many decades crowds its labels near 0,
    a log axis over a decade or two its minor labels."""
    fig.canvas.draw()
    renderer = fig.canvas.get_renderer()
    for ax in fig.axes:
        for axis in (ax.xaxis, ax.yaxis):
            kept = []
            for minor, loc, label in sorted(tick_labels(axis), key=lambda t: (t[0], t[1] != 0, -abs(t[1]))):
                box = label.get_window_extent(renderer).padded(1)
                if any(box.overlaps(k) for k in kept):
                    label.set_visible(False)
                else:
                    kept.append(box)


def save(fig, path) -> Path:
    """Hide the tick labels that would overlap others (:func:`declutter_ticks`), save ``fig`` as a PNG at ``path``
    (creating its folder), close it, and return the path."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    declutter_ticks(fig)
    fig.savefig(path, dpi=DPI, bbox_inches="tight")
    plt.close(fig)
    return path


def rsd_vs_n(frame: pd.DataFrame, path: Path, order: list[str]) -> list[str]:
    """rsd vs n per case (log-log); returns the cells it leaves out (not finite, or constant up to rounding)."""
    drawable = np.isfinite(frame["rsd"]) & (frame["rsd"] > ROUNDING)
    cases = list(frame[drawable]["case"].unique())  # a case with nothing to draw gets no (empty) panel
    g = sns.relplot(data=frame[drawable], x="n", y="rsd", hue="estimator", hue_order=order, palette=colors(order),
                    col="case", col_order=cases, col_wrap=wrap(len(cases)), kind="line", marker="o",
                    estimator=None, height=PANEL[1], aspect=PANEL[0] / PANEL[1], facet_kws={"sharey": False})
    g.set(xscale="log", yscale="log")
    for ax in g.axes.flat:  # plain numbers ("20", "0.5") rather than "2×10¹"
        ax.yaxis.set_major_formatter(LogFormatter())
        ax.yaxis.set_minor_formatter(LogFormatter(labelOnlyBase=False))
    g.set_titles("{col_name}")
    save(g.figure, path)
    left_out = frame[~drawable].groupby("case", sort=False)
    return [f"{case}: {', '.join(g['estimator'].unique())}" for case, g in left_out]


def bias_vs_n(frame: pd.DataFrame, path: Path, order: list[str]) -> None:
    """Relative bias ± 2 SE vs n, one panel per case; at each n the estimators stand side by side (dodged), so
    that no two intervals overlap; symlog y so one wild cell does not flatten the rest."""
    data = frame[np.isfinite(frame["rel_bias"])]
    cases = list(data["case"].unique())
    names = [e for e in order if e in set(data["estimator"])]
    ns = sorted(data["n"].unique())
    width = 0.8 / len(names)
    fig, axes = panels(len(cases))
    for ax, case in zip(axes, cases):
        rows = data[data["case"] == case]
        for j, name in enumerate(names):
            g = rows[rows["estimator"] == name]
            x = [ns.index(n) + (j - (len(names) - 1) / 2) * width for n in g["n"]]
            ax.errorbar(x, g["rel_bias"], yerr=2 * g["bias_se"] / g["truth"].abs(), fmt="o", ms=3, elinewidth=1.4,
                        color=color_of(name), label=name)
        ax.axhline(0, ls="--", lw=0.8, color="0.4")
        for between in range(1, len(ns)):
            ax.axvline(between - 0.5, color="0.85", lw=0.8)
        ax.set_yscale("symlog", linthresh=LINTHRESH)
        locator = SymmetricalLogLocator(linthresh=LINTHRESH, base=10)
        locator.set_params(numticks=SYMLOG_TICKS)
        ax.yaxis.set_major_locator(locator)
        ax.set_xticks(range(len(ns)), [str(n) for n in ns])
        ax.set_title(case, fontsize=10)
    for ax in axes[-wrap(len(cases)):]:
        ax.set_xlabel("n")
    for ax in axes[::wrap(len(cases))]:
        ax.set_ylabel("relative bias")
    fig.tight_layout()
    _legend(fig, names)
    save(fig, path)


def per_sample_distribution(case_name: str, estimators: list[str], seed: int, path: Path,
                            size: int = 2 ** 16) -> dict[str, float]:
    """Histogram of single-sample estimates on one case; returns each estimator's fraction below zero."""
    case = get_case(case_name)
    log_p, log_q = case.draw(size, seeded(seed, "figure", case_name, device=case.device))
    values = {name: get_estimator(name).fn(log_p, log_q).double().numpy() for name in estimators}
    negative = {name: float((v < 0).mean()) for name, v in values.items()}
    lo, hi = np.quantile(np.concatenate(list(values.values())), [0.002, 0.998])
    long = pd.concat([pd.DataFrame({"estimate": v[(v >= lo) & (v <= hi)],
                                    "estimator": f"{name} ({negative[name]:.0%} < 0)"})
                      for name, v in values.items()])
    labels = {f"{name} ({negative[name]:.0%} < 0)": color_of(name) for name in values}
    g = sns.displot(data=long, x="estimate", row="estimator", hue="estimator", palette=labels, stat="density",
                    bins=150, element="step", height=1.6, aspect=4, legend=False, facet_kws={"sharey": False})
    for ax in g.axes.flat:
        ax.axvline(case.truth.value, color="k", lw=1, ls="--")
        ax.axvline(0, color="0.5", lw=0.8)
    g.set_titles("{row_name}")
    g.figure.suptitle(f"{case_name}: one-sample estimates (dashed: the exact KL = {case.truth.value:.4g})", y=1.02)
    save(g.figure, path)
    return negative


def variance_ratio(frame: pd.DataFrame, estimator: str, references: list[str], path: Path) -> pd.DataFrame:
    """var(estimator) / var(reference) per case at the largest n, as points on a log axis."""
    top = frame[frame["n"] == frame["n"].max()].set_index(["case", "estimator"])["var"]
    cases = [c for c in frame["case"].unique() if (c, estimator) in top.index]
    rows = [{"case": c, "relative to": ref, "variance ratio": top[(c, estimator)] / top[(c, ref)]}
            for c in cases for ref in references if (c, ref) in top.index and top[(c, ref)] > 0]
    ratios = pd.DataFrame(rows)
    fig, ax = plt.subplots(figsize=(8, 3.4))
    sns.scatterplot(data=ratios, x="case", y="variance ratio", hue="relative to", palette=colors(references),
                    style="relative to", s=60, ax=ax)
    ax.set_yscale("log")
    ax.axhline(1, color="k", lw=0.8)
    ax.tick_params(axis="x", rotation=45)
    for label in ax.get_xticklabels():
        label.set_horizontalalignment("right")
    ax.set_title(f"variance of {estimator} relative to {', '.join(references)} (n = {frame['n'].max()}); "
                 "below 1 it helps")
    save(fig, path)
    return ratios


def clamp_bias(frame: pd.DataFrame, case_name: str, estimators: list[str], path: Path) -> pd.DataFrame:
    """Relative bias ± 2 SE of the clamped production variants and k3 on one case, at the largest n."""
    rows = frame[(frame["case"] == case_name) & frame["estimator"].isin(estimators)]
    rows = rows[rows["n"] == rows["n"].max()]
    fig, ax = plt.subplots(figsize=(6, 2.8))
    ax.barh(rows["estimator"], rows["rel_bias"], xerr=2 * rows["bias_se"] / rows["truth"].abs(),
            color=[color_of(e) for e in rows["estimator"]])
    ax.axvline(0, color="k", lw=0.8)
    ax.set_xlabel("relative bias")
    ax.set_title(f"{case_name} (KL = {rows['truth'].iloc[0]:.4g}), n = {rows['n'].iloc[0]}")
    save(fig, path)
    return rows[["estimator", "rel_bias", "bias_se"]]


def marginal_bias_vs_k(frame: pd.DataFrame, path: Path) -> None:
    """K × bias of every estimator of a marginal study frame (log-of-mean, the jackknifes) vs K, one panel per
    case, with log-of-mean's delta-method theory to first order (−μ₂/2, flat) and second order; the measured bias
    uses the control variate Â/p(x) − 1 (``bias_cv``), ±2 SE."""
    data = frame.copy()
    data["K·bias"] = data["K"] * data["bias_cv"]
    data["K·2se"] = 2 * data["K"] * data["bias_cv_se"]
    cases = list(data["case"].unique())
    fig, axes = panels(len(cases), columns=3, size=(3.6, 3.2))
    for ax, case in zip(axes, cases):
        rows = data[data["case"] == case]
        for name, g in rows.groupby("estimator", sort=False):
            ax.errorbar(g["K"], g["K·bias"], yerr=g["K·2se"], fmt="o-", ms=3, lw=1, capsize=2,
                        color=color_of(name), label=name)
        lme = rows[rows["estimator"] == "log_mean_exp"].sort_values("K")
        if lme["theory_first"].notna().any():
            ax.plot(lme["K"], lme["K"] * lme["theory_first"], "k--", lw=1, label="theory, 1st order")
            ax.plot(lme["K"], lme["K"] * lme["theory_second"], "k:", lw=1.2, label="theory, 2nd order")
        ax.axhline(0, color="grey", lw=0.6)
        ax.set_xscale("log")
        ax.set_title(case, fontsize=9)
        ax.set_xlabel("K")
    for ax in axes[::wrap(len(cases), 3)]:
        ax.set_ylabel("K × (E[estimate] − log p(x))")
    fig.tight_layout()
    handles, labels = axes[0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="center left", bbox_to_anchor=(1.0, 0.5), frameon=False)
    save(fig, path)


def sequence_variances(frame: pd.DataFrame, path: Path) -> pd.DataFrame:
    """Per-sequence variance of each estimator on each sequence case (log axis), one panel per case: measured
    by the study (bars) with the exact variance by enumeration (black ticks) from the frame's ``exact var``
    column (NaN where the case does not have it)."""
    data = frame[frame["n"] == frame["n"].min()]
    order = list(data["estimator"].unique())
    cases = list(data["case"].unique())
    fig, axes = panels(len(cases), size=(3.0, 2.4))
    for ax, case in zip(axes, cases):
        rows = data[data["case"] == case].set_index("estimator").reindex(order)
        ax.bar(range(len(order)), rows["var"], color=[color_of(e) for e in order], width=0.8)
        exact = rows["exact var"].to_numpy(dtype=float)
        shown = np.isfinite(exact)
        ax.hlines(exact[shown], np.arange(len(order))[shown] - 0.4, np.arange(len(order))[shown] + 0.4,
                  color="k", lw=1.5)
        ax.set_yscale("log")
        ax.set_xticks([])
        ax.set_title(case, fontsize=9)
    for ax in axes[::wrap(len(cases))]:
        ax.set_ylabel("variance per sequence")
    fig.tight_layout()
    _legend(fig, order)
    save(fig, path)
    return data[["case", "estimator", "var", "exact var"]]


def loss_curves(metadata: dict[str, dict], path: Path) -> None:
    """Training loss (NLL in nats per sequence) of every committed checkpoint's recipe."""
    rows = [{"model": name, "step": s, "loss": v} for name, meta in metadata.items()
            for s, v in zip(meta["loss_curve"]["step"], meta["loss_curve"]["loss"])]
    g = sns.relplot(data=pd.DataFrame(rows), x="step", y="loss", col="model", col_wrap=wrap(len(metadata)),
                    kind="line", height=PANEL[1], aspect=PANEL[0] / PANEL[1],
                    facet_kws={"sharey": False, "sharex": False})
    g.set_titles("{col_name}")
    save(g.figure, path)


def gradient_angles(frame: pd.DataFrame, path: Path) -> None:
    """Heatmap of the angle (degrees) between each loss's measured expected gradient and ∇KL(p‖q), loss × case;
    blank where the cell has no measurement (a finding, or an unverifiable tail)."""
    angle = frame.assign(angle=np.degrees(np.arccos(frame["cos_kl"].clip(-1, 1))))
    angle.loc[angle["verdict"] == "unverifiable", "angle"] = np.nan
    table = angle.pivot(index="estimator", columns="case", values="angle").reindex(
        index=frame["estimator"].unique(), columns=frame["case"].unique())
    fig, ax = plt.subplots(figsize=(1.0 + 0.75 * table.shape[1], 0.9 + 0.38 * table.shape[0]))
    sns.heatmap(table, annot=True, fmt=".0f", cmap="viridis", vmin=0, vmax=90, ax=ax,
                cbar_kws={"label": "angle to ∇KL(p‖q), degrees"})
    ax.set(xlabel="", ylabel="")
    ax.tick_params(axis="x", labelrotation=40)
    plt.setp(ax.get_xticklabels(), ha="right")
    save(fig, path)


def gradient_error_vs_batch(frame: pd.DataFrame, losses: list[str], path: Path) -> None:
    """Relative RMSE of a batch-mean gradient vs the batch size B, sqrt(bias² + grad_var/B), one panel per case,
    bias² the measured ‖m − t‖²/‖g‖² less its noise grad_var/N."""
    batch = np.logspace(0, 6, 25)
    rows = []
    for r in frame[frame["estimator"].isin(losses) & np.isfinite(frame["grad_var"])].itertuples():
        bias2 = max(r.rel_bias ** 2 - r.grad_var / r.n, 0.0)
        rows += [{"case": r.case, "loss": r.estimator, "batch size": b, "relative RMSE": np.sqrt(bias2 + r.grad_var / b)}
                 for b in batch]
    data = pd.DataFrame(rows)
    grid = sns.relplot(data, x="batch size", y="relative RMSE", hue="loss", hue_order=losses, palette=colors(losses),
                       col="case", col_wrap=min(COLUMNS, data["case"].nunique()), kind="line", height=PANEL[1],
                       aspect=PANEL[0] / PANEL[1], facet_kws={"sharey": False})
    grid.set(xscale="log", yscale="log")
    grid.set_titles("{col_name}", size=8)
    save(grid.figure, path)
