"""Statistics tracked over commits (asv track_, lower is better): bias in standard errors, relative
standard deviation and RMSE of every estimator on every case at n = 1000, seed 0; the control variate's
variance relative to k3; and the gate's planted bugs missed and false alarms."""
import os

from reference_models import case_names
from reports.catalog import KL_FORMS, EstimatorSpec, estimator_names, get_estimator
from reports.gate import GateConfig, run_gate
from reports.planted_bugs import PLANTED
from reports.study import StudyConfig, run_study

#: The per-sample estimators (the sequence-only forms are tracked in bench_sequences).
PER_SAMPLE = estimator_names("token")
CORRECT = (*estimator_names(*KL_FORMS, unbiased=True), "k2")
N, SEED = 1000, 0
#: ESTBENCH_ASV_SMOKE=1 (CI's dry run) shrinks the work so that a broken benchmark fails fast; the numbers
#: it gives are not comparable with a normal run's.
SMOKE = os.environ.get("ESTBENCH_ASV_SMOKE") == "1"
REPLICATES = 20 if SMOKE else 200
GATE_BUDGET = 2 ** 16 if SMOKE else 2 ** 22


def _cell(frame, case, estimator):
    rows = frame[(frame.case == case) & (frame.estimator == estimator)]
    if rows.empty:
        raise NotImplementedError(f"{estimator} has no finite target on {case}")
    return rows.iloc[0]


class EstimatorStatistics:
    version = 1
    params = (case_names(kind="kl"), PER_SAMPLE)
    param_names = ["case", "estimator"]
    timeout = 600

    def setup_cache(self):
        return run_study(StudyConfig(tuple(case_names(kind="kl")), tuple(PER_SAMPLE), (N,), REPLICATES, SEED),
                         progress=False)

    def setup(self, frame, case, estimator):
        _cell(frame, case, estimator)

    def track_abs_bias_over_se(self, frame, case, estimator):
        row = _cell(frame, case, estimator)
        return abs(row.bias) / row.bias_se if row.bias_se > 0 else 0.0

    track_abs_bias_over_se.unit = "SE"

    def track_rsd(self, frame, case, estimator):
        return float(_cell(frame, case, estimator).rsd)

    track_rsd.unit = "std / |KL|"

    def track_rmse(self, frame, case, estimator):
        return float(_cell(frame, case, estimator).rmse)

    track_rmse.unit = "nats"


class ControlVariate:
    version = 1
    params = case_names(kind="kl")
    param_names = ["case"]
    timeout = 600

    def setup_cache(self):
        return run_study(StudyConfig(tuple(case_names(kind="kl")), ("k3", "k1_cv"), (N,), REPLICATES, SEED), progress=False)

    def setup(self, frame, case):
        k3 = _cell(frame, case, "k3")["var"]
        if not k3 > 0:
            raise NotImplementedError(f"k3's variance is zero on {case}")
        self.ratio = float(_cell(frame, case, "k1_cv")["var"] / k3)

    def track_var_cv_over_k3(self, frame, case):
        return self.ratio

    track_var_cv_over_k3.unit = "ratio"


class Gate:
    """The gate measured both ways, at a 2^22-element cap per cell (the default cap is 2^26)."""

    version = 1
    timeout = 900

    def setup_cache(self):
        entries = [get_estimator(n) for n in CORRECT] + [EstimatorSpec(f.__name__, f) for f in PLANTED]
        config = GateConfig(chunk=min(2 ** 21, GATE_BUDGET), max_budget=GATE_BUDGET)
        return run_gate(entries, case_names(kind="kl"), config).frame

    def track_planted_bugs_missed(self, frame):
        return sum(frame[(frame.estimator == f.__name__) & (frame.verdict == "caught")].empty for f in PLANTED)

    track_planted_bugs_missed.unit = "bugs"

    def track_false_alarms(self, frame):
        correct = frame[frame.estimator.isin(CORRECT)]
        return int((correct.verdict == "caught").sum())

    track_false_alarms.unit = "cells"
