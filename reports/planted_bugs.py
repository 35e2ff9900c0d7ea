"""Planted bugs: plausible wrong KL estimators that the gate must catch.

Each has the contract's signature f(log_p, log_q) -> per-sample estimates of KL(p||q), x ~ p. They are
also usable from the command line: ``estbench gate --kl reports.planted_bugs:k3_wrong_direction``.
"""
import math

import torch

from estimators.kl import k1, k2, k3, reverse_kl


def k3_wrong_direction(log_p, log_q):
    """k3 with r = p/q instead of q/p."""
    return k3(log_q, log_p)


def k3_missing_minus_one(log_p, log_q):
    """exp(log r) - log r: forgets the -1."""
    lr = log_q - log_p
    return torch.exp(lr) - lr


def k3_missing_log_term(log_p, log_q):
    """r - 1 alone: the control variate without k1."""
    return torch.expm1(log_q - log_p)


def k1_sign_flipped(log_p, log_q):
    """log r instead of -log r."""
    return -k1(log_p, log_q)


def k3_low_precision(log_p, log_q):
    """Log-probs rounded to bfloat16 before the ratio (sequence log-probs near -150 lose ~1 nat)."""
    return k3(log_p.bfloat16(), log_q.bfloat16()).to(log_p.dtype)


def k3_tight_clamp(log_p, log_q):
    """k3 clamped to [0, 5], a tighter version of the production clamps."""
    return k3(log_p, log_q).clamp(0.0, 5.0)


def k3_small_multiplicative_bias(log_p, log_q):
    """5% too large."""
    return 1.05 * k3(log_p, log_q)


def k1_in_bits(log_p, log_q):
    """log2 instead of natural log."""
    return k1(log_p, log_q) / math.log(2)


def k2_as_kl(log_p, log_q):
    """k2 passed off as an unbiased KL estimator."""
    return k2(log_p, log_q)


def reverse_as_forward(log_p, log_q):
    """the reverse-KL estimator used for the forward KL (wrong direction)."""
    return reverse_kl(log_p, log_q)


def naive_ratio(log_p, log_q):
    """exp(log q)/exp(log p): underflows to 0/0 for log-densities far below -100."""
    r = torch.exp(log_q) / torch.exp(log_p)
    return r - 1 - torch.log(r)


def k3_additive_offset(log_p, log_q):
    """k3 + 1e-3: invisible on large KLs, 10x the truth on the near-identical pair."""
    return k3(log_p, log_q) + 1e-3


def k1_batch_mean(log_p, log_q):
    """returns the batch mean instead of per-sample estimates (wrong shape)."""
    return k1(log_p, log_q).mean()


PLANTED = [k3_wrong_direction, k3_missing_minus_one, k3_missing_log_term, k1_sign_flipped, k3_low_precision,
           k3_tight_clamp, k3_small_multiplicative_bias, k1_in_bits, k2_as_kl, reverse_as_forward, naive_ratio,
           k3_additive_offset, k1_batch_mean]


# --- Sequence-level bugs, in the forms of reports.catalog: f(log_p, log_q, mask) or f(logits_p, logits_q, mask).
def sequence_k1_ignoring_mask(log_p, log_q, mask):
    """Σ_t (log p − log q) over every position, padding included."""
    return (log_p - log_q).sum(-1)


def sequence_k1_token_mean(log_p, log_q, mask):
    """The mean over tokens instead of the sum (a per-token KL passed off as the sequence KL)."""
    m = mask.to(log_p.dtype)
    return ((log_p - log_q) * m).sum(-1) / m.sum(-1)


def sequence_k3_of_mean_log_ratio(log_p, log_q, mask):
    """k3 of the mean per-token log-ratio: neither per-token nor sequence-level k3."""
    m = mask.to(log_p.dtype)
    lr = ((log_q - log_p) * m).sum(-1) / m.sum(-1)
    return torch.expm1(lr) - lr


def rao_blackwell_reversed(logits_p, logits_q, mask):
    """The exact next-step KL in the wrong direction, KL(q(·|x_<t) ‖ p(·|x_<t)) summed."""
    from .catalog import ESTIMATORS

    return ESTIMATORS["rao_blackwell"].fn(logits_q, logits_p, mask)


def rao_blackwell_last_step_only(logits_p, logits_q, mask):
    """Only the last position's exact KL (an off-by-the-sequence reduction)."""
    from .catalog import ESTIMATORS

    keep = torch.zeros_like(mask)
    keep[..., -1] = True
    return ESTIMATORS["rao_blackwell"].fn(logits_p, logits_q, keep & mask)


#: (function, form) of the sequence-level planted bugs.
SEQUENCE_PLANTED = [(sequence_k1_ignoring_mask, "sequence"), (sequence_k1_token_mean, "sequence"),
                    (sequence_k3_of_mean_log_ratio, "sequence"), (rao_blackwell_reversed, "logits"),
                    (rao_blackwell_last_step_only, "logits")]
