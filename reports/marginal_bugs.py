"""Planted bugs: plausible wrong marginal-likelihood estimators that the marginal gate must catch.

Each has the contract's signature f(log_w[..., K]) -> log p̂[...]; from the command line:
``estbench gate --marginal reports.marginal_bugs:missing_log_k``.
"""
import math

import torch

from estimators.marginal import log_mean_exp


def naive_log_mean_exp(log_w):
    """log(mean(exp(log w))) without the max shift: 0 or inf outside about ±700."""
    return torch.log(torch.exp(log_w).mean(-1))


def missing_log_k(log_w):
    """logsumexp without the -log K: the log of the sum, not of the mean."""
    return torch.logsumexp(log_w, -1)


def log_k_plus_one(log_w):
    """divides by K + 1 (an off-by-one in the count): too low by log(1 + 1/K)."""
    return torch.logsumexp(log_w, -1) - math.log(log_w.shape[-1] + 1)


def elbo_as_marginal(log_w):
    """the mean of the log-weights (the ELBO) reported as log p(x)."""
    return log_w.mean(-1)


def lse_divided_by_k(log_w):
    """logsumexp / K: the mean taken in log space."""
    return torch.logsumexp(log_w, -1) / log_w.shape[-1]


def max_only(log_w):
    """the max shift alone, its log-sum-exp term forgotten."""
    return log_w.amax(-1)


def median_weight(log_w):
    """the log of the median weight: low by s²/2 on log-normal weights."""
    return log_w.median(-1).values


def off_by_constant(log_w):
    """log_mean_exp + 0.005 (a stray smoothing constant): inside the range check's tolerance."""
    return log_mean_exp(log_w) + 0.005


def float16_cast(log_w):
    """log-weights rounded to float16 first: spacing 8 at -1e4, 0.5 at 1e3."""
    return log_mean_exp(log_w.half().to(log_w.dtype))


def jackknife_loo_over_k(log_w):
    """a first-order jackknife whose leave-one-out means divide by K, not K - 1: high by about 1 nat."""
    k = log_w.shape[-1]
    lse = torch.logsumexp(log_w, -1, keepdim=True)
    loo = lse + torch.log1p(-torch.exp(log_w - lse)) - math.log(k)
    return k * (lse.squeeze(-1) - math.log(k)) - (k - 1) * loo.mean(-1)


def delta_correction_wrong_sign(log_w):
    """log_mean_exp plus its plug-in delta-method correction with the sign flipped: twice as biased."""
    k = log_w.shape[-1]
    v = torch.exp(log_w - log_w.amax(-1, keepdim=True))
    rel_var = v.var(-1) / v.mean(-1) ** 2
    return log_mean_exp(log_w) - rel_var / (2 * k)


def per_sample_output(log_w):
    """log w - log K, never reduced over K (wrong shape)."""
    return log_w - math.log(log_w.shape[-1])


def wrong_dim(log_w):
    """log-mean-exp over the first dimension instead of the last."""
    return torch.logsumexp(log_w, 0) - math.log(log_w.shape[0])


PLANTED = [naive_log_mean_exp, missing_log_k, log_k_plus_one, elbo_as_marginal, lse_divided_by_k, max_only,
           median_weight, off_by_constant, float16_cast, jackknife_loo_over_k, delta_correction_wrong_sign,
           per_sample_output, wrong_dim]
