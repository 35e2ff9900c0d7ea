"""asv benchmarks of the KL estimators: throughput (time_) and statistics (track_, lower is better)."""
import torch

from estimators import kl
from reports.study import StudyConfig, run_study


class KLEstimatorTime:
    """Per-sample estimators on 10⁶ float32 log-prob pairs."""

    params = ["k1", "k2", "k3", "k1_control_variate", "verl_low_var_kl"]
    param_names = ["estimator"]

    def setup(self, name):
        g = torch.Generator().manual_seed(0)
        self.log_p = -torch.rand(10 ** 6, generator=g) * 5
        self.log_q = self.log_p + 0.1 * torch.randn(10 ** 6, generator=g)
        self.fn = getattr(kl, name)

    def time_estimator(self, name):
        self.fn(self.log_p, self.log_q)


class KLStatistics:
    """Relative standard deviation of each estimator on Schulman's cases, n = 1000, seed 0."""

    version = 1
    params = (["gauss-shift-0.1", "gauss-shift-1"], ["k1", "k2", "k3", "k1_cv"])
    param_names = ["case", "estimator"]
    unit = "std / KL"

    def setup(self, case, estimator):
        frame = run_study(StudyConfig((case,), (estimator,), (1000,), 200, seed=0), progress=False)
        self.row = frame.iloc[0]

    def track_rsd(self, case, estimator):
        return float(self.row.rsd)

    def track_abs_bias_over_se(self, case, estimator):
        return abs(float(self.row.bias)) / float(self.row.bias_se)
    track_abs_bias_over_se.unit = "SE"
