"""Seaborn figures of a study frame. Each function saves one PNG and returns what its caption needs."""
from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402
import seaborn as sns  # noqa: E402
from matplotlib.ticker import LogFormatter  # noqa: E402

from reference_models import get_case  # noqa: E402

from .catalog import get_estimator  # noqa: E402
from .stats import seeded  # noqa: E402

DPI = 110
#: Relative size below which a difference is float rounding (a constant estimate has rsd ~ 1e-16, not 0).
ROUNDING = 1e-9


def _wrap(frame: pd.DataFrame) -> int:
    return min(4, frame["case"].nunique())


def save(fig, path) -> Path:
    """Save ``fig`` as a PNG at ``path`` (creating its folder), close it, and return the path."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=DPI, bbox_inches="tight")
    plt.close(fig)
    return path


def rsd_vs_n(frame: pd.DataFrame, path: Path, order: list[str]) -> list[str]:
    """rsd vs n per case (log-log); returns the cells it leaves out (not finite, or constant up to rounding)."""
    drawable = np.isfinite(frame["rsd"]) & (frame["rsd"] > ROUNDING)
    g = sns.relplot(data=frame[drawable], x="n", y="rsd", hue="estimator", hue_order=order, col="case",
                    col_order=list(frame["case"].unique()), col_wrap=_wrap(frame), kind="line", marker="o", estimator=None,
                    height=2.6, aspect=1.3, facet_kws={"sharey": False})
    g.set(xscale="log", yscale="log")
    for ax in g.axes.flat:  # plain numbers ("20", "0.5") rather than "2×10¹"
        ax.yaxis.set_major_formatter(LogFormatter())
        ax.yaxis.set_minor_formatter(LogFormatter(labelOnlyBase=False))
    g.set_titles("{col_name}")
    save(g.figure, path)
    left_out = frame[~drawable].groupby("case", sort=False)
    return [f"{case}: {', '.join(g['estimator'].unique())}" for case, g in left_out]


def _band(data: pd.DataFrame, color, label: str) -> None:
    data = data.sort_values("n")
    half = 2 * data["bias_se"] / data["truth"].abs()
    plt.plot(data["n"], data["rel_bias"], "o-", ms=3, lw=1, color=color, label=label)
    plt.fill_between(data["n"], data["rel_bias"] - half, data["rel_bias"] + half, color=color, alpha=0.2, lw=0)


def bias_vs_n(frame: pd.DataFrame, path: Path, order: list[str]) -> None:
    """Relative bias with a ±2 SE band vs n per case; symlog y so one wild cell does not flatten the rest."""
    data = frame[np.isfinite(frame["rel_bias"])]
    g = sns.FacetGrid(data, col="case", col_order=list(frame["case"].unique()), col_wrap=_wrap(frame), hue="estimator",
                      hue_order=order, height=2.6, aspect=1.3, sharey=False)
    g.map_dataframe(_band)
    for ax in g.axes.flat:
        ax.axhline(0, ls="--", lw=0.8, color="0.4")
        ax.set_xscale("log")
        ax.set_yscale("symlog", linthresh=0.02)
    g.set_titles("{col_name}")
    g.set_axis_labels("n", "relative bias")
    g.add_legend()
    save(g.figure, path)


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
    g = sns.displot(data=long, x="estimate", row="estimator", hue="estimator", stat="density", bins=150,
                    element="step", height=1.4, aspect=5, legend=False, facet_kws={"sharey": False})
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
    sns.scatterplot(data=ratios, x="case", y="variance ratio", hue="relative to", style="relative to", s=60, ax=ax)
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
            color=sns.color_palette()[: len(rows)])
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
    fig, axes = plt.subplots(1, len(cases), figsize=(3.6 * len(cases), 3.2), squeeze=False)
    palette = dict(zip(data["estimator"].unique(), sns.color_palette()))
    for ax, case in zip(axes[0], cases):
        rows = data[data["case"] == case]
        for name, g in rows.groupby("estimator", sort=False):
            ax.errorbar(g["K"], g["K·bias"], yerr=g["K·2se"], fmt="o-", ms=3, lw=1, capsize=2,
                        color=palette[name], label=name)
        lme = rows[rows["estimator"] == "log_mean_exp"].sort_values("K")
        if lme["theory_first"].notna().any():
            ax.plot(lme["K"], lme["K"] * lme["theory_first"], "k--", lw=1, label="theory, 1st order")
            ax.plot(lme["K"], lme["K"] * lme["theory_second"], "k:", lw=1.2, label="theory, 2nd order")
        ax.axhline(0, color="grey", lw=0.6)
        ax.set_xscale("log")
        ax.set_title(case, fontsize=9)
        ax.set_xlabel("K")
    axes[0][0].set_ylabel("K × (E[estimate] − log p(x))")
    axes[0][-1].legend(fontsize=7, loc="lower right")
    save(fig, path)


def sequence_variances(frame: pd.DataFrame, path: Path) -> pd.DataFrame:
    """Per-sequence variance of each estimator on each sequence case (log axis), measured by the study
    (bars) with the exact variance by enumeration (black ticks) from the frame's ``exact var`` column (NaN where
    the case does not have it)."""
    data = frame[frame["n"] == frame["n"].min()]
    order = list(data["estimator"].unique())
    cases = list(data["case"].unique())
    fig, ax = plt.subplots(figsize=(max(8, 1.1 * len(cases) * len(order) / 3), 3.8))
    sns.barplot(data=data, x="case", y="var", hue="estimator", hue_order=order, order=cases, ax=ax)
    width = 0.8 / len(order)
    for i, case in enumerate(cases):
        for j, est in enumerate(order):
            exact = data[(data["case"] == case) & (data["estimator"] == est)]["exact var"]
            if len(exact) and np.isfinite(exact.iloc[0]):
                x = i - 0.4 + width * (j + 0.5)
                ax.plot([x - width / 2, x + width / 2], [exact.iloc[0]] * 2, color="k", lw=1.5)
    ax.set_yscale("log")
    ax.set_ylabel("variance per sequence")
    ax.tick_params(axis="x", rotation=30)
    for label in ax.get_xticklabels():
        label.set_horizontalalignment("right")
    ax.legend(fontsize=7, ncol=len(order))
    save(fig, path)
    return data[["case", "estimator", "var", "exact var"]]


def loss_curves(metadata: dict[str, dict], path: Path) -> None:
    """Training loss (NLL in nats per sequence) of every committed checkpoint's recipe."""
    rows = [{"model": name, "step": s, "loss": v} for name, meta in metadata.items()
            for s, v in zip(meta["loss_curve"]["step"], meta["loss_curve"]["loss"])]
    g = sns.relplot(data=pd.DataFrame(rows), x="step", y="loss", col="model", col_wrap=min(4, len(metadata)),
                    kind="line", height=2.3, aspect=1.3, facet_kws={"sharey": False, "sharex": False})
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
    grid = sns.relplot(data, x="batch size", y="relative RMSE", hue="loss", hue_order=losses, col="case",
                       col_wrap=min(5, data["case"].nunique()), kind="line", height=2.4, aspect=1.1,
                       facet_kws={"sharey": False})
    grid.set(xscale="log", yscale="log")
    grid.set_titles("{col_name}", size=8)
    save(grid.figure, path)
