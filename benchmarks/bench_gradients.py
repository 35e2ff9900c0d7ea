"""KL losses' gradients (asv; lower is better): each built-in loss's measured relative gradient bias
‖E[∇loss] − ∇KL‖/‖∇KL‖ (within the gate's six directions) per gradient case, the gradient gate's planted
bugs missed, its false alarms on the three correct forms, and the time of one gate run on one loss."""
import os

from reference_models import case_names
from reports.catalog import EstimatorSpec, estimator_names, get_estimator
from reports.gate import GateConfig
from reports.grad_bugs import PLANTED
from reports.grad_gate import run_grad_gate

SMOKE = os.environ.get("ESTBENCH_ASV_SMOKE") == "1"
CASES = case_names(kind="gradient", tag="gate")[:2] if SMOKE else case_names(kind="gradient", tag="gate")
SMALL = GateConfig(chunk=2 ** 14, max_budget=2 ** 14)
CORRECT = ("is_reinforce", "is_k2_sequence", "is_k3_sequence")


class GradientBias:
    version = 1
    params = (estimator_names("loss"), CASES)
    param_names = ["loss", "case"]
    timeout = 1800

    def setup_cache(self):
        return run_grad_gate([get_estimator(n) for n in estimator_names("loss")], CASES,
                             SMALL if SMOKE else GateConfig(chunk=2 ** 19, max_budget=2 ** 22)).frame

    def track_relative_gradient_bias(self, frame, loss, case):
        return float(frame[(frame.estimator == loss) & (frame.case == case)].rel_bias.iloc[0])

    track_relative_gradient_bias.unit = "relative bias"


class GradientGate:
    version = 1
    timeout = 1800

    def setup_cache(self):
        specs = [get_estimator(n) for n in CORRECT] + [EstimatorSpec(f.__name__, f, form="loss") for f in PLANTED]
        return run_grad_gate(specs, CASES, SMALL if SMOKE else GateConfig(chunk=2 ** 19)).frame

    def track_planted_bugs_missed(self, frame):
        return sum(frame[(frame.estimator == f.__name__) & (frame.verdict == "caught")].empty for f in PLANTED)

    track_planted_bugs_missed.unit = "bugs"

    def track_false_alarms(self, frame):
        return int((frame[frame.estimator.isin(CORRECT)].verdict == "caught").sum())

    track_false_alarms.unit = "cells"


class GradientGateTime:
    """One loss through the gradient gate on its default cases, at the gate's pilot size per cell."""

    timeout = 900

    def setup(self):
        self.spec = [get_estimator("is_reinforce")]
        run_grad_gate(self.spec, CASES, SMALL)  # builds (and caches) the cases outside the timing

    def time_gate_one_loss(self):
        run_grad_gate(self.spec, CASES, SMALL)
