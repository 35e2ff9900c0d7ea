"""Sequence-level KL on the trained autoregressive references (asv; lower is better): the exact variance of
the Rao-Blackwellized estimator relative to k1 and k3 per case, the measured |bias|/SE of the sequence
estimators, the gate's planted sequence bugs missed and false alarms, NADE's cached conditionals against the
naive O(D²H) form, and the time of the Rao-Blackwellized estimator."""
import os

import torch

from estimators.sequence import rao_blackwell_kl
from reference_models.autoregressive import NADE
from reference_models import case_names, get_case
from reports.catalog import ESTIMATORS, KL_FORMS, EstimatorSpec, estimator_names, exact_moments, get_estimator
from reports.gate import GateConfig, run_gate
from reports.planted_bugs import SEQUENCE_PLANTED
from reports.study import StudyConfig, run_study

SMOKE = os.environ.get("ESTBENCH_ASV_SMOKE") == "1"
REPLICATES = 500 if SMOKE else 20_000
GATE_BUDGET = 2 ** 16 if SMOKE else 2 ** 23
SEQUENCE_ESTIMATORS = tuple(name for name, spec in ESTIMATORS.items() if spec.enumerated and spec.form in KL_FORMS)
SEQUENCE_CASES = case_names(kind="sequence")
CORRECT = (*estimator_names(*KL_FORMS, unbiased=True), "k2")


def _exact_variances() -> dict:
    """{(case, estimator): exact per-sequence variance}, enumerated once per setup_cache."""
    return {(c, e): exact_moments(ESTIMATORS[e], get_case(c))["var"].value for c in SEQUENCE_CASES
            for e in SEQUENCE_ESTIMATORS}


class SequenceVariance:
    """Exact (enumerated) variance ratios: they change only when the models, cases or estimators do."""

    version = 1
    params = SEQUENCE_CASES
    param_names = ["case"]
    timeout = 600

    def setup_cache(self):
        return _exact_variances()

    def track_var_rb_over_k1(self, exact, case):
        return exact[(case, "rao_blackwell")] / exact[(case, "k1")]

    track_var_rb_over_k1.unit = "ratio"

    def track_var_rb_over_k3(self, exact, case):
        return exact[(case, "rao_blackwell")] / exact[(case, "k3")]

    track_var_rb_over_k3.unit = "ratio"


class SequenceStatistics:
    version = 1
    params = (SEQUENCE_CASES, list(SEQUENCE_ESTIMATORS))
    param_names = ["case", "estimator"]
    timeout = 900

    def setup_cache(self):
        config = StudyConfig(tuple(SEQUENCE_CASES), SEQUENCE_ESTIMATORS, (1,), REPLICATES, 0)
        return run_study(config, progress=False), _exact_variances()

    def track_abs_bias_over_se(self, cached, case, estimator):
        frame = cached[0]
        row = frame[(frame.case == case) & (frame.estimator == estimator)].iloc[0]
        return abs(row.bias) / row.bias_se if row.bias_se > 0 else 0.0

    track_abs_bias_over_se.unit = "SE"

    def track_var_measured_over_exact(self, cached, case, estimator):
        frame, exact = cached
        row = frame[(frame.case == case) & (frame.estimator == estimator)].iloc[0]
        return float(row["var"]) / exact[(case, estimator)]

    track_var_measured_over_exact.unit = "ratio"


class SequenceGate:
    version = 1
    timeout = 900

    def setup_cache(self):
        entries = ([get_estimator(n) for n in CORRECT]
                   + [EstimatorSpec(f.__name__, f, form=form) for f, form in SEQUENCE_PLANTED])
        config = GateConfig(chunk=min(2 ** 21, GATE_BUDGET), max_budget=GATE_BUDGET)
        return run_gate(entries, SEQUENCE_CASES, config).frame

    def track_planted_bugs_missed(self, frame):
        return sum(frame[(frame.estimator == f.__name__) & (frame.verdict == "caught")].empty
                   for f, _ in SEQUENCE_PLANTED)

    track_planted_bugs_missed.unit = "bugs"

    def track_false_alarms(self, frame):
        return int((frame[frame.estimator.isin(CORRECT)].verdict == "caught").sum())

    track_false_alarms.unit = "cells"


class NADEConditionals:
    """All D conditionals of n = 512 binary vectors: the cached activations a_d = a_{d−1} + W[:, d−1] x_{d−1}
    (O(DH) per example) against recomputing each a_d from scratch (O(D²H))."""

    params = ([64, 256], ["cached", "naive"])
    param_names = ["dim", "form"]
    timeout = 300

    def setup(self, dim, form):
        self.model = NADE(dim, 256)
        self.x = torch.bernoulli(torch.full((512, dim), 0.5), generator=torch.Generator().manual_seed(0))
        self.fn = self.model.conditionals if form == "cached" else self.model.conditionals_naive

    def time_conditionals(self, dim, form):
        with torch.no_grad():
            self.fn(self.x)


class RaoBlackwell:
    """The Rao-Blackwellized estimator on [B, T, V] logits (an exact next-step KL per token)."""

    params = ["64x128x50257"] if not SMOKE else ["4x16x1024"]
    param_names = ["BxTxV"]
    timeout = 300

    def setup(self, shape):
        shape = tuple(int(n) for n in shape.split("x"))
        g = torch.Generator().manual_seed(0)
        self.a = torch.randn(*shape, generator=g)
        self.b = self.a + 0.1 * torch.randn(*shape, generator=g)

    def time_rao_blackwell_kl(self, shape):
        rao_blackwell_kl(self.a, self.b)

    def peakmem_rao_blackwell_kl(self, shape):
        rao_blackwell_kl(self.a, self.b)
