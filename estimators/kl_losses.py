r"""KL losses as RLHF code writes them: ``f(log_p, log_q, log_p_old, mask) -> loss[B]``, one loss per sequence.

``log_p`` [B, T] are the policy's log-probs of the sampled tokens and carry the gradient; ``log_q`` (the
reference) and ``log_p_old`` (the behaviour policy that sampled the tokens; equal in value to ``log_p``
on-policy) are constants; ``mask`` [B, T] is True on real tokens. What matters is the expected gradient
E_{x~p_old}[∇θ loss(x)], which should be ∇θ KL(p_θ‖q): ``estbench gate --grad`` measures it. Notation:
ℓ_t = log p_t − log q_t (per-token k1), r_t = q_t/p_t, w = Π_t p_t/p_old,t (the sequence importance weight),
sg(·) = stop-gradient (``detach``), all sums over the mask. On-policy, what each one's gradient follows
(derivations in the docstrings; the gate's measurements in the README):

- ``k1_loss`` Σ ℓ_t: E[∇] = E[Σ_t ∇log p_t] = 0, whatever q is;
- ``k2_loss`` Σ ℓ_t²/2 and ``k3_k2_straight_through``: ∇KL exactly at T = 1, but only the per-token part on
  sequences (it misses the KL of the tokens still to come);
- ``k3_loss``, ``low_var_kl_loss`` Σ (r_t − 1 − log r_t): at T = 1, ∇KL(q‖p), the *other* direction;
- ``k1_reward_*``: REINFORCE with −k1 as a reward; unbiased with the return to go or the whole sequence;
- ``k2_sequence_loss`` (Σ ℓ_t)²/2: equal to REINFORCE on-policy, biased off-policy;
- ``is_*``: the importance-weighted forms; ``is_reinforce``, ``is_k2_sequence`` and ``is_k3_sequence`` are
  unbiased on- and off-policy.
"""
from __future__ import annotations

import functools

import torch
from torch import Tensor

from .kl import k1, k2, k3, verl_low_var_kl

__all__ = ["masked_sum", "log_weight", "k1_loss", "k2_loss", "k3_loss", "low_var_kl_loss", "k3_k2_straight_through", "k1_reward_per_token",
           "k1_reward_to_go", "k1_reward_sequence", "k2_sequence_loss", "is_k3_detached", "is_k3_token",
           "is_reinforce", "is_k2_sequence", "is_k3_sequence"]


def _loss(fn):
    """Check a loss's arguments (ValueErrors that name them): tensors of one shape [B, T], float log-probs and a bool
    mask."""
    @functools.wraps(fn)
    def checked(log_p: Tensor, log_q: Tensor, log_p_old: Tensor, mask: Tensor) -> Tensor:
        args = dict(log_p=log_p, log_q=log_q, log_p_old=log_p_old, mask=mask)
        for name, v in args.items():
            if not isinstance(v, Tensor):
                raise ValueError(f"{name} must be a torch.Tensor, got {type(v).__name__}")
            if v.shape != log_p.shape or v.dim() != 2:
                raise ValueError(f"{name} must have the shape [B, T] of log_p {tuple(log_p.shape)}, got {tuple(v.shape)}")
            if (name == "mask") != (v.dtype == torch.bool) or (name != "mask" and not v.is_floating_point()):
                raise ValueError(f"{name} must be {'bool' if name == 'mask' else 'a float tensor'}, got {v.dtype}")
        return fn(log_p, log_q, log_p_old, mask)
    return checked


def masked_sum(v: Tensor, mask: Tensor) -> Tensor:
    """Σ_t over real tokens (a padded value never reaches the sum, even a NaN)."""
    return torch.where(mask, v, torch.zeros((), dtype=v.dtype, device=v.device)).sum(-1)


def log_weight(log_p: Tensor, log_p_old: Tensor, mask: Tensor) -> Tensor:
    """log w = Σ_t (log p_t − log p_old,t): the sequence importance weight, differentiable through log p."""
    return masked_sum(log_p - log_p_old, mask)


@_loss
def k1_loss(log_p, log_q, log_p_old, mask):
    """Σ_t ℓ_t as a loss (verl ``kl_loss_type="k1"``/"kl", TRL and GRPO with k1): E[∇] = E[Σ_t ∇log p_t] = 0."""
    return masked_sum(k1(log_p, log_q), mask)


@_loss
def k2_loss(log_p, log_q, log_p_old, mask):
    """Σ_t ℓ_t²/2 (verl "mse"/"k2"): ∇ = Σ_t ℓ_t ∇log p_t, REINFORCE without the future tokens' KL (Liu et al.
    2025: gradient-equivalent to k1 in the reward only at T = 1)."""
    return masked_sum(k2(log_p, log_q), mask)


@_loss
def k3_loss(log_p, log_q, log_p_old, mask):
    """Σ_t (r_t − 1 − log r_t), Schulman's k3 as a loss (GRPO, TRL ``GRPOTrainer``, verl "low_var_kl" without
    its clamp): ∇ = Σ_t (1 − r_t) ∇log p_t, whose expectation at T = 1 is −Σ_v q_v ∇log p_v = ∇KL(q‖p)
    (verl PR #2953)."""
    return masked_sum(k3(log_p, log_q), mask)


@_loss
def low_var_kl_loss(log_p, log_q, log_p_old, mask):
    """verl's ``low_var_kl`` as a loss: k3 per token, clamped to [−10, 10] (``kl_penalty`` in
    verl/trainer/ppo/core_algos.py)."""
    return masked_sum(verl_low_var_kl(log_p, log_q), mask)


@_loss
def k3_k2_straight_through(log_p, log_q, log_p_old, mask):
    """OpenRLHF PR #1101: the value of k3 with the gradient of k2, k2 + sg(k3 − k2) per token."""
    value, grad = k3(log_p, log_q), k2(log_p, log_q)
    return masked_sum(grad + (value - grad).detach(), mask)


@_loss
def k1_reward_per_token(log_p, log_q, log_p_old, mask):
    """REINFORCE with a per-token coefficient: Σ_t log p_t · sg(ℓ_t) (the token's own KL as its reward, no
    return): unbiased at T = 1, misses the future tokens' KL on sequences."""
    return masked_sum(log_p * k1(log_p, log_q).detach(), mask)


@_loss
def k1_reward_to_go(log_p, log_q, log_p_old, mask):
    """REINFORCE with −k1 in the reward and the return to go, Σ_t log p_t · sg(Σ_{t'≥t} ℓ_t') (PPO's KL
    reward with γ = 1): unbiased on-policy (Comedy of Estimators, arXiv 2512.21852)."""
    kl = torch.where(mask, k1(log_p, log_q), 0.0).detach()
    to_go = kl.flip(-1).cumsum(-1).flip(-1)
    return masked_sum(log_p * to_go, mask)


@_loss
def k1_reward_sequence(log_p, log_q, log_p_old, mask):
    """REINFORCE with the whole sequence's k1, (Σ_t log p_t) · sg(Σ_t ℓ_t): unbiased on-policy."""
    return masked_sum(log_p, mask) * masked_sum(k1(log_p, log_q), mask).detach()


@_loss
def k2_sequence_loss(log_p, log_q, log_p_old, mask):
    """(Σ_t ℓ_t)²/2 on the whole sequence: ∇ = (Σ_t ℓ_t) ∇log p(x), REINFORCE exactly on-policy; off-policy
    it lacks the weight w."""
    return masked_sum(k1(log_p, log_q), mask) ** 2 / 2


@_loss
def is_k3_detached(log_p, log_q, log_p_old, mask):
    """Per-token k3 times the detached per-token ratio sg(p_t/p_old,t) (the off-policy weight of OpenRLHF PR
    #1309)."""
    return masked_sum(torch.exp(log_p - log_p_old).detach() * k3(log_p, log_q), mask)


@_loss
def is_k3_token(log_p, log_q, log_p_old, mask):
    """DeepSeek-V3.2's "unbiased KL" (slime PR #1004): per-token (p_t/p_old,t) · k3_t, the ratio not detached."""
    return masked_sum(torch.exp(log_p - log_p_old) * k3(log_p, log_q), mask)


@_loss
def is_reinforce(log_p, log_q, log_p_old, mask):
    """w · sg(Σ_t ℓ_t), w not detached: ∇ = w Σ_t ℓ_t ∇log p(x), and E_{p_old}[w f] = E_p[f]: unbiased on- and
    off-policy."""
    return torch.exp(log_weight(log_p, log_p_old, mask)) * masked_sum(k1(log_p, log_q), mask).detach()


@_loss
def is_k2_sequence(log_p, log_q, log_p_old, mask):
    """sg(w) · (Σ_t ℓ_t)²/2: the whole-sequence k2 reweighted to p: unbiased on- and off-policy."""
    return torch.exp(log_weight(log_p, log_p_old, mask)).detach() * k2_sequence_loss(log_p, log_q, log_p_old, mask)


@_loss
def is_k3_sequence(log_p, log_q, log_p_old, mask):
    """w · Σ_t k3_t with w not detached: any estimate f_θ with E_p[f_θ] = KL(p_θ‖q) for every θ has
    ∇E_{p_old}[w f_θ] = ∇KL, so this is unbiased on- and off-policy (where q's support lies inside p's)."""
    return torch.exp(log_weight(log_p, log_p_old, mask)) * masked_sum(k3(log_p, log_q), mask)
