"""Sequence-level KL cases built on the trained autoregressive references: exact truth by enumeration,
exact sampling, and the gate on them.

False alarms: the chi-square test has α = 1e-3; the gate run has its own family-wise α = 1e-4 over all
its cells (Bonferroni, see reports.gate); the study's variance checks use |z| ≤ 4 on each of 36 cells
(≤ 36 × 6.3e-5 = 2.3e-3 in all, a normal approximation of the sample variance). Seeds are fixed.
"""
import math

import pytest
import torch
from scipy import stats

from reference_models import case_names, get_case
from estimators.sequence import bernoulli_token_log_probs, categorical_token_log_probs
from reference_models.train import hmm_source, kl_source_model, load_checkpoint
from reports.catalog import ESTIMATORS, KL_FORMS, EstimatorSpec, estimator_names, exact_moments, get_estimator
from reports.gate import CAUGHT, HOLDS, UNVERIFIABLE, GateConfig, run_gate
from reports.planted_bugs import PLANTED, SEQUENCE_PLANTED
from reports.study import StudyConfig, run_study

CASES = case_names(kind="sequence")
ENUMERATED = tuple(name for name, spec in ESTIMATORS.items() if spec.enumerated and spec.form in KL_FORMS)


@pytest.mark.parametrize("name", CASES)
def test_truth_is_an_exact_enumeration(name):
    case = get_case(name)
    assert case.truth.method == "enumeration" and case.truth.error_bound < 1e-9
    assert 0 < case.truth.value < math.inf
    live = torch.nonzero(case.table.log_mass > -math.inf).squeeze(-1)
    rows = live[torch.randint(0, live.numel(), (64,), generator=torch.Generator().manual_seed(0))]
    x = case.table.states[rows]
    with torch.no_grad():  # the table (prefix trick, repeated rows) against the models on whole sequences
        for model, column in ((case.p, case.table.log_p), (case.q, case.table.log_q)):
            logits = model.conditionals(x).double()
            direct = (bernoulli_token_log_probs(logits, x) if case.binary
                      else categorical_token_log_probs(logits, x.long()))
            assert torch.allclose(column[rows], direct, atol=1e-10, rtol=0)


def test_transformer_truth_matches_the_chain_rule_sum_over_the_prefix_tree():
    """Two independent exact computations of KL(HMM ‖ transformer): the case's full enumeration and the
    training module's chain-rule sum over prefixes."""
    case = get_case("seq-hmm-vs-transformer")
    model = load_checkpoint("transformer-hmm")[0].double()
    assert abs(case.truth.value - kl_source_model(hmm_source(), model)) < 1e-9


def test_top_k_policy_breaks_support_and_its_k1_is_its_rao_blackwellization():
    """Against its own untruncated model, a top-k policy's per-token log-ratio is −log Z_t(prefix) for both
    kept tokens, so k1 equals the Rao-Blackwellized estimate exactly; k3's support assumption fails."""
    case = get_case("seq-transformer-top-k")
    assert not case.support_ok and "support" in case.breaks
    k1, rb = (exact_moments(ESTIMATORS[name], case)["var"].value for name in ("k1", "rao_blackwell"))
    assert k1 == pytest.approx(rb, rel=1e-10)


def test_draws_are_exact_samples_from_p():
    """Chi-square of the drawn states of a 16-pixel model against p(x) over the 200 likeliest states
    (the rest pooled), α = 1e-3."""
    case = get_case("seq-nade-digits-steps")
    t = case.table
    n = 200_000
    g = torch.Generator().manual_seed(1)
    u = 1.0 - torch.rand(n, generator=g, dtype=torch.float64)
    idx = torch.searchsorted(t.cdf, u * t.cdf[-1])
    sample = case.draw(n, torch.Generator().manual_seed(1), dtype=torch.float64)
    assert torch.equal(sample.log_p, t.log_p[idx])  # draw() is this inverse CDF
    probs = torch.exp(t.log_mass)
    top = torch.topk(probs, 200).indices
    counts = torch.bincount(idx, minlength=probs.numel()).double()
    observed = torch.cat([counts[top], (n - counts[top].sum()).reshape(1)])
    expected = n * torch.cat([probs[top], (1 - probs[top].sum()).reshape(1)])
    assert stats.chisquare(observed.numpy(), expected.numpy()).pvalue > 1e-3


def test_enumeration_weights_every_sequence_and_gives_the_exact_moments():
    """The enumeration is the table with p(x) as weights (0 where p cannot go), its weighted k1 sum is the KL,
    and :func:`exact_moments` of k1 is that mean with its variance."""
    case = get_case("seq-transformer-top-k")
    sample, w = case.enumeration()
    assert case.kind == "sequence" and w.dtype == torch.float64 and sample.log_p.shape == case.table.log_p.shape
    assert bool((w[case.table.log_mass == -math.inf] == 0).all()) and abs(float(w.sum()) - 1) < 1e-9
    exact = exact_moments(ESTIMATORS["k1"], case)
    assert exact["mean"].value == pytest.approx(case.truth.value, rel=1e-12)
    assert exact["var"].value > 0 and exact["m4"].value > 0 and exact_moments(ESTIMATORS["k1"], case) is exact


@pytest.fixture(scope="module")
def sequence_gate():
    entries = ([get_estimator(n) for n in estimator_names(*KL_FORMS)] + [EstimatorSpec("user_k1", get_estimator("k1").fn)]
               + [EstimatorSpec(f.__name__, f) for f in PLANTED]
               + [EstimatorSpec(f.__name__, f, form=form) for f, form in SEQUENCE_PLANTED])
    return run_gate(entries, CASES, GateConfig(seed=0, max_budget=2 ** 23))


def test_gate_holds_every_unbiased_estimator_on_every_sequence_case(sequence_gate):
    frame = sequence_gate.frame
    for name in [*estimator_names(*KL_FORMS, unbiased=True), "k2", "user_k1"]:
        assert sequence_gate.holds(name), sequence_gate.caught(name).to_string()
    for name in ("k1", "k2", "rao_blackwell"):  # light enough tails for a z-test on every case
        rows = frame[frame.estimator == name]
        assert (rows.verdict == HOLDS).all(), rows.to_string()
    # the k3 forms are held to their exact expectation, which differs from the KL only on the top-k case;
    # where their exact kurtosis asks for more samples than the cap (the Bayesian-network cases, and seq_k3
    # on the binary models) they are unverifiable
    k3 = frame[frame.estimator.isin(["k3", "seq_k3"]) & (frame.case != "seq-transformer-top-k")]
    assert k3.verdict.isin([HOLDS, UNVERIFIABLE]).all(), k3.to_string()
    assert (k3[k3.case.str.contains("transformer")].verdict == HOLDS).all(), k3.to_string()


def test_gate_catches_the_planted_bugs_on_sequences(sequence_gate):
    """Every planted bug but two is caught on some sequence case. The two are wrong only for log-probs
    far from 0 (bf16 rounding, exp underflow), as whole-sequence log-probs are; per-token log-probs of a
    5-token vocabulary are never there, and both are caught on the KL cases (tests/test_gate.py)."""
    frame = sequence_gate.frame
    harmless_per_token = {"k3_low_precision", "naive_ratio"}
    names = [f.__name__ for f in PLANTED if f.__name__ not in harmless_per_token]
    names += [f.__name__ for f, _ in SEQUENCE_PLANTED]
    missed = [n for n in names if not (frame[frame.estimator == n].verdict == CAUGHT).any()]
    assert not missed, missed
    # the user's k1 applied per token and summed is the unbiased sequence k1: never caught, and held wherever
    # its tail passes the k̂ check (all but the digit-model pairs, where a rare image has a huge log-ratio)
    user = frame[frame.estimator == "user_k1"]
    assert (user.verdict != CAUGHT).all() and (user.verdict == HOLDS).sum() >= 6, user.to_string()


@pytest.mark.parametrize("seed", range(10))
def test_no_false_alarm_on_sequences(seed):
    """Ten more independent gate runs of the unbiased estimators on small budgets (≤ 10 × 1e-4 = 0.1%)."""
    entries = [get_estimator(n) for n in ("k1", "k2", "k3", "seq_k3", "rao_blackwell")]
    result = run_gate(entries, CASES, GateConfig(seed=seed + 1, chunk=2 ** 16, max_budget=2 ** 16))
    assert result.holds(), result.caught().to_string()


def test_leave_one_out_control_variate_across_tokens_is_biased(sequence_gate):
    """A leave-one-out λ is unbiased across i.i.d. samples, not across the tokens of one sequence: λ₋ₜ depends
    on later tokens, which depend on x_t. The built-in is therefore skipped on sequences, with the reason."""
    frame = sequence_gate.frame
    cv = frame[frame.estimator == "k1_cv"]
    assert (cv.verdict == "skipped").all() and cv.reason.str.contains("mixes the samples").all()


def test_study_variances_match_the_exact_ones():
    """Per-sequence variance measured over 20,000 replicates (n = 1) against the exact enumeration. The
    sample variance of R draws has standard error √((μ₄ − σ⁴)/R) with the exact 4th central moment μ₄;
    |z| ≤ 4 per cell."""
    config = StudyConfig(tuple(CASES), ENUMERATED, ns=(1,), replicates=20_000, seed=0)
    frame = run_study(config, progress=False)
    assert len(frame) == len(CASES) * len(ENUMERATED)
    for row in frame.itertuples():
        exact = exact_moments(ESTIMATORS[row.estimator], get_case(row.case))
        var, m4 = exact["var"].value, exact["m4"].value
        se = math.sqrt(max(m4 - var ** 2, 0.0) / row.replicates)
        assert abs(row.var - var) <= 4 * se + 1e-12, (row.case, row.estimator, row.var, var, se)
