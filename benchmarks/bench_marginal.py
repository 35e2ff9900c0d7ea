"""Marginal likelihoods (asv; lower is better): the measured bias of log-of-mean against the delta method's
second-order prediction, |measured / theory − 1|, at several K; the jackknife's remaining |bias| relative to
plain log-of-mean at K = 64; the marginal gate's planted bugs missed and false alarms; and the time of
log-of-mean and the jackknifes over K."""
import os

import torch

from reports.catalog import EstimatorSpec, get_estimator
from reports.marginal_bugs import PLANTED
from reports.marginal_gate import run_marginal_gate
from reports.study import StudyConfig, run_study

SMOKE = os.environ.get("ESTBENCH_ASV_SMOKE") == "1"
REPLICATES = 200 if SMOKE else 20_000
CASES = ("lognormal-0.5", "lognormal-1", "lg-posterior-1.2")
CORRECT = ("log_mean_exp", "jackknife1", "jackknife2")
KS = [32, 256, 1024]


class LogMeanBias:
    version = 1
    params = (CASES, KS)
    param_names = ["case", "K"]
    timeout = 900

    def setup_cache(self):
        return run_study(StudyConfig(CASES, ("log_mean_exp",), tuple(KS), REPLICATES, 0), progress=False)

    def track_bias_over_theory_error(self, frame, case, K):
        row = frame[(frame.case == case) & (frame.estimator == "log_mean_exp") & (frame.K == K)].iloc[0]
        return abs(row.bias_cv / row.theory_second - 1)

    track_bias_over_theory_error.unit = "relative error"


class Jackknife:
    """|bias of the jackknife| / |bias of log-of-mean| at K = 64 (their biases measured with the control
    variate Â/p(x) − 1)."""

    version = 1
    params = (CASES, ["jackknife1", "jackknife2"])
    param_names = ["case", "order"]
    timeout = 900

    def setup_cache(self):
        return run_study(StudyConfig(CASES, CORRECT, (64,), REPLICATES, 1), progress=False)

    def track_jackknife_bias_over_plain(self, frame, case, order):
        rows = frame[frame.case == case].set_index("estimator")["bias_cv"]
        return abs(rows[order] / rows["log_mean_exp"])

    track_jackknife_bias_over_plain.unit = "ratio"


class MarginalGate:
    version = 1
    timeout = 600

    def setup_cache(self):
        specs = [get_estimator(n) for n in CORRECT] + [EstimatorSpec(f.__name__, f, form="log_weights") for f in PLANTED]
        return run_marginal_gate(specs).frame

    def track_planted_bugs_missed(self, frame):
        return sum(frame[(frame.estimator == f.__name__) & (frame.verdict == "caught")].empty for f in PLANTED)

    track_planted_bugs_missed.unit = "bugs"

    def track_false_alarms(self, frame):
        correct = frame[frame.estimator.isin(CORRECT)]
        return int((correct.verdict == "caught").sum())

    track_false_alarms.unit = "checks"


class LogMeanThroughput:
    """1000 estimates of K weights each."""

    params = ([10 ** 3, 10 ** 4] if SMOKE else [10 ** 3, 10 ** 4, 10 ** 5], list(CORRECT))
    param_names = ["K", "estimator"]
    timeout = 600

    def setup(self, K, estimator):
        self.log_w = torch.randn(10 if SMOKE else 1000, K, generator=torch.Generator().manual_seed(0),
                                 dtype=torch.float64)
        self.fn = get_estimator(estimator).fn

    def time_estimate(self, K, estimator):
        self.fn(self.log_w)
