"""Planted gradient bugs: plausible wrong KL losses that the gradient gate must catch.

Each has the loss contract's signature ``f(log_p, log_q, log_p_old, mask) -> loss[B]`` and is a small edit of
a correct form in ``estimators.kl_losses`` (REINFORCE with the importance weight w = Π_t p_t/p_old,t, the
return to go, whole-sequence k2). From the command line: ``estbench gate --grad reports.grad_bugs:sign_flipped``.
"""
import torch

from estimators.kl import k1, k3
from estimators.kl_losses import k1_reward_to_go, k2_sequence_loss, log_weight, masked_sum


def _k1(log_p, log_q, mask):
    return masked_sum(k1(log_p, log_q), mask)


def detach_swapped(log_p, log_q, log_p_old, mask):
    """sg(w)·Σ ℓ_t: the weight detached and the reward not, the wrong way round (E[∇] = E_p[∇log p] = 0)."""
    return torch.exp(log_weight(log_p, log_p_old, mask)).detach() * _k1(log_p, log_q, mask)


def weight_inverted(log_p, log_q, log_p_old, mask):
    """w⁻¹ = p_old/p instead of p/p_old: equal to 1 on-policy, with the opposite gradient."""
    return torch.exp(-log_weight(log_p, log_p_old, mask)) * _k1(log_p, log_q, mask).detach()


def weight_clipped(log_p, log_q, log_p_old, mask):
    """w clipped to [0.8, 1.2] as PPO clips its ratio: exact on-policy, biased where the weight leaves the clip."""
    w = torch.exp(log_weight(log_p, log_p_old, mask))
    return torch.where((w > 0.8) & (w < 1.2), w, w.detach()) * _k1(log_p, log_q, mask).detach()


def sign_flipped(log_p, log_q, log_p_old, mask):
    """REINFORCE with the KL as a reward to maximize: −Σ log p_t · sg(Σ ℓ_t) follows −∇KL."""
    return -masked_sum(log_p, mask) * _k1(log_p, log_q, mask).detach()


def to_go_off_by_one(log_p, log_q, log_p_old, mask):
    """The return from the next token on, Σ_t log p_t · sg(Σ_{t'>t} ℓ_t'): each token's own KL is lost."""
    kl = torch.where(mask, k1(log_p, log_q), 0.0).detach()
    after = kl.flip(-1).cumsum(-1).flip(-1) - kl
    return masked_sum(log_p * after, mask)


def mask_ignored(log_p, log_q, log_p_old, mask):
    """k1_reward_to_go over every position, the padding after the end of a sequence included."""
    return k1_reward_to_go(log_p, log_q, log_p_old, torch.ones_like(mask))


def token_mean(log_p, log_q, log_p_old, mask):
    """Whole-sequence k2 divided by the number of tokens (a per-token mean where the sum is meant)."""
    return k2_sequence_loss(log_p, log_q, log_p_old, mask) / mask.sum(-1).clamp_min(1)


def half_scale(log_p, log_q, log_p_old, mask):
    """(Σ ℓ_t)²/4: the k2 loss with a stray factor ½ (half the gradient)."""
    return k2_sequence_loss(log_p, log_q, log_p_old, mask) / 2


def k3_in_reward(log_p, log_q, log_p_old, mask):
    """REINFORCE with k3 as the reward, Σ log p_t · sg(Σ k3_t): value-unbiased, gradient-biased (A Comedy of
    Estimators, arXiv 2512.21852)."""
    return masked_sum(log_p, mask) * masked_sum(k3(log_p, log_q), mask).detach()


PLANTED = [detach_swapped, weight_inverted, weight_clipped, sign_flipped, to_go_off_by_one, mask_ignored, token_mean,
           half_scale, k3_in_reward]
