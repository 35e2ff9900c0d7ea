"""The benchmark history without asv's page: every ``track_`` metric that asv saved (the statistics and the
throughput ratios), by commit, read from asv's results and drawn with seaborn, with the commits where a metric
moved beyond its noise.

The rule: a series is one metric with one set of parameters on one machine, in commit-date order. Its noise is the
robust standard deviation of its commit-to-commit steps, 1.4826 × their median absolute deviation. A commit is
flagged when its step exceeds :data:`NOISE_FACTOR` × that noise and :data:`RELATIVE_FLOOR` of the previous value;
a series needs :data:`MIN_STEPS` steps before anything is flagged. Seeded statistics repeat exactly on unchanged
code, so their noise is 0 and any change beyond the floor is flagged; throughput ratios vary between runs, and
only a step well beyond that variation is.
"""
from __future__ import annotations

import itertools
import json
import math
from pathlib import Path

import numpy as np
import pandas as pd

#: The project's asv configuration, beside the packages in a checkout (absent where estbench is installed alone).
ASV_CONF = Path(__file__).resolve().parents[1] / "asv.conf.json"
NOISE_FACTOR = 4.0
RELATIVE_FLOOR = 1e-6
MIN_STEPS = 3
COLUMNS = ["machine", "commit", "date", "benchmark", "params", "value"]


def asv_dir(key: str, default: str, conf: Path | None = None) -> Path | None:
    """The folder asv.conf.json (default: :data:`ASV_CONF`) names under ``key``, or None without one."""
    conf = conf or ASV_CONF
    if not conf.is_file():
        return None
    return conf.parent / json.loads(conf.read_text(encoding="utf-8")).get(key, default)


def _empty(note: str) -> pd.DataFrame:
    frame = pd.DataFrame(columns=COLUMNS)
    frame.attrs["note"] = note
    return frame


def load_history(results_dir: Path | None = None) -> pd.DataFrame:
    """Every ``track_`` value in asv's results (default: the ``results_dir`` of :data:`ASV_CONF`), one row per
    machine, commit, benchmark and parameter combination, in commit-date order, with the ``moved`` flag of
    :func:`flag_moves`. Without results the frame is empty and ``attrs["note"]`` says why in one line."""
    results_dir = results_dir or asv_dir("results_dir", ".asv/results")
    if results_dir is None:
        return _empty("No benchmark history: estbench is installed without its repository (no asv.conf.json).")
    try:
        from asv.results import iter_results
    except ImportError:
        return _empty("No benchmark history: asv is not installed (pip install -e '.[dev]').")
    rows = []
    for result in iter_results(str(results_dir)) if results_dir.is_dir() else ():
        for key in result.get_all_result_keys():
            if not key.rsplit(".", 1)[-1].startswith("track_"):
                continue
            params = result.get_result_params(key)
            for combo, value in zip(itertools.product(*params), result.get_result_value(key, params)):
                if value is not None and math.isfinite(value):
                    rows.append({"machine": result.params.get("machine", "?"), "commit": result.commit_hash,
                                 "date": pd.to_datetime(result.date, unit="ms"), "benchmark": key,
                                 "params": ", ".join(map(str, combo)), "value": float(value)})
    if not rows:
        return _empty(f"No benchmark history yet: no track_ results in {results_dir} (run `asv run`).")
    return flag_moves(pd.DataFrame(rows).sort_values(["date", "commit"], kind="stable", ignore_index=True))


def flag_moves(history: pd.DataFrame) -> pd.DataFrame:
    """Add ``step`` (change from the series' previous commit), ``noise`` (1.4826 × MAD of the series' steps) and
    ``moved`` (the rule of this module) to a history frame in commit-date order."""
    series = history.groupby(["machine", "benchmark", "params"], sort=False)["value"]
    step = series.diff()
    noise = step.abs().groupby([history["machine"], history["benchmark"], history["params"]]).transform(
        lambda s: 1.4826 * float(np.nanmedian((s - np.nanmedian(s)).abs())) if s.notna().sum() else np.nan)
    steps = series.transform(lambda s: len(s) - 1)
    moved = ((steps >= MIN_STEPS) & (step.abs() > NOISE_FACTOR * noise)
             & (step.abs() > RELATIVE_FLOOR * series.shift().abs()))
    return history.assign(step=step, noise=noise, moved=moved.fillna(False).astype(bool))


def draw_history(history: pd.DataFrame, path: Path, max_panels: int = 24) -> None:
    """One panel per track_ metric (the ``max_panels`` with the most flagged commits first): each series over
    its median against commit order, flagged commits marked with a red cross."""
    import seaborn as sns

    from .figures import save

    order = {c: i for i, c in enumerate(dict.fromkeys(history["commit"]))}
    frame = history.assign(**{"commit #": history["commit"].map(order),
                              "value / median": history["value"] / history.groupby(
                                  ["machine", "benchmark", "params"])["value"].transform("median")})
    ranked = frame.groupby("benchmark")["moved"].sum().sort_values(ascending=False, kind="stable")
    frame = frame[frame["benchmark"].isin(ranked.index[:max_panels])]
    frame = frame.assign(metric=frame["benchmark"].str.replace(r"^bench_", "", regex=True))
    grid = sns.relplot(frame, x="commit #", y="value / median", col="metric", hue="params", units="machine",
                       estimator=None, kind="line", marker="o", col_wrap=4, height=2.2, aspect=1.5,
                       legend=False, facet_kws={"sharey": False})
    for metric, ax in grid.axes_dict.items():
        moved = frame[(frame["metric"] == metric) & frame["moved"]]
        ax.scatter(moved["commit #"], moved["value / median"], marker="x", color="red", s=60, zorder=5)
        ax.set_title(metric, fontsize=8)
    grid.figure.suptitle("asv track_ metrics by commit (red ×: moved beyond its noise)", y=1.01)
    save(grid.figure, path)
