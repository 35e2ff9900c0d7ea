"""What each cell of a study says about its estimator, by one stated test rule.

A cell (case, estimator, n) measures the mean of its replicate estimates with a standard error SE. Its bias
against the exact target is at *noise* level when |bias| ≤ z·SE + rounding, with z = Φ⁻¹(1 − α/2m) for the m
cells of one table (Bonferroni, :func:`reports.stats.critical_z`): every unbiased cell of the table reads as
noise with probability at least 1 − α, α = :data:`ALPHA`. A cell whose case breaks one of the estimator's
assumptions (:meth:`~reports.catalog.EstimatorSpec.assumptions_broken`: q's mass outside p's support biases
k3-type estimators; E_p[(q/p)²] = ∞ makes their SE meaningless) is *case* whatever its z: its bias belongs to
the case, not to the estimator. Any other cell is *biased where its assumptions hold*.
"""
from __future__ import annotations

import numpy as np
import pandas as pd

from reference_models import get_case

from . import stats
from .catalog import get_estimator

__all__ = ["ALPHA", "ROUNDING", "NOISE", "BIASED", "CASE", "critical_z", "at_noise", "assumptions", "verdicts"]

#: The false-alarm rate of one table: the chance that any unbiased cell in it reads as biased.
ALPHA = 0.01
#: Relative size below which a difference is float rounding (a constant estimate has rsd ~ 1e-16, not 0).
ROUNDING = 1e-9
NOISE, BIASED, CASE = "noise", "biased", "case breaks assumption"


def critical_z(cells: int) -> float:
    """z = Φ⁻¹(1 − α/2m) for a table of ``cells`` cells (two-sided, Bonferroni, α = :data:`ALPHA`)."""
    return stats.critical_z(ALPHA, cells)


def at_noise(bias, se, scale, z_crit: float) -> np.ndarray:
    """|bias| ≤ z_crit·se + ROUNDING·|scale|, elementwise (False where any of them is not finite)."""
    bias, se, scale = (np.asarray(v, dtype=float) for v in (bias, se, scale))
    with np.errstate(invalid="ignore"):
        return np.abs(bias) <= z_crit * se + ROUNDING * np.abs(scale)


def assumptions(frame: pd.DataFrame) -> pd.Series:
    """For each row of a KL or sequence study frame, the assumptions of its estimator that its case breaks
    (:meth:`~reports.catalog.EstimatorSpec.assumptions_broken`, "; "-joined; "" for none). Unlike the frame's
    ``breaks`` column (the ratio-based estimators' only) it names the support for the clamped variants of k3."""
    return pd.Series(["; ".join(get_estimator(e).assumptions_broken(get_case(c)))
                      for c, e in zip(frame["case"], frame["estimator"])], index=frame.index, name="breaks")


def verdicts(frame: pd.DataFrame) -> pd.Series:
    """:data:`NOISE`, :data:`BIASED` or :data:`CASE` for each row of a KL or sequence study frame (its
    ``case``, ``estimator``, ``bias``, ``bias_se`` and ``truth`` columns), by the rule of the module docstring."""
    noise = at_noise(frame["bias"], frame["bias_se"], frame["truth"], critical_z(len(frame)))
    broken = assumptions(frame) != ""
    return pd.Series(np.where(broken, CASE, np.where(noise, NOISE, BIASED)), index=frame.index, name="verdict")
