r"""Gradient cases: a policy p_θ, a fixed reference q and a behaviour policy p_old that samples, with the exact
gradients ∇θ KL(p_θ‖q) and ∇θ KL(q‖p_θ).

RLHF code uses a KL estimate as a loss; whether the loss is right is a question about E_{x~p_old}[∇θ loss(x)],
which should equal ∇θ KL(p_θ‖q). The gradients here are exact, with how they were obtained:

- **Gaussians**, θ = (μ, log σ) of a diagonal p, closed form:
  ∂KL(p‖q)/∂μ = (μ − μ_q)/σ_q², ∂KL(p‖q)/∂log σ = σ²/σ_q² − 1;
  ∂KL(q‖p)/∂μ = (μ − μ_q)/σ², ∂KL(q‖p)/∂log σ = 1 − (σ_q² + (μ − μ_q)²)/σ².
- **Categorical bandits** (one token, T = 1), θ = the logits: ∇KL(p‖q) = p ⊙ (log p − log q − KL(p‖q)),
  ∇KL(q‖p) = p − q.
- **Sequences**, θ = every parameter of a trained autoregressive network (NADE, transformer): autograd through
  the enumerated sums KL(p‖q) = Σ_x p(x) Σ_t m_t log(p_t/q_t) and KL(q‖p) = Σ_x q(x) Σ_t m_t log(q_t/p_t) in
  float64 (``tests/test_gradient_cases.py`` checks them against central finite differences).

A gate cannot compare a D-dimensional mean gradient at once, so each case fixes K orthonormal directions u_k
(Gram–Schmidt of ∇KL(p‖q), ∇KL(q‖p) and seeded random vectors): u_0 is the true gradient's direction. A loss
that depends on θ only through the sampled tokens' log p_θ(x_t | x_<t) has the directional derivative

    ∇θ loss(x) · u_k = Σ_t ∂loss/∂log p_t · (∇θ log p_θ(x_t | x_<t) · u_k),

and the second factor, ``jvp`` [T, K], is tabulated once over the enumeration (forward-mode autograd) or
computed from x in closed form, so a gate draws from a table and never runs the model. ``targets`` holds the
projections t_k = g · u_k of each candidate the expected gradient may follow: ``"kl"`` (∇KL(p‖q)),
``"reverse_kl"`` (∇KL(q‖p)) and ``"zero"``.

Off-policy cases sample from p_old ≠ p_θ, as PPO/GRPO reuse rollouts for several updates: the policy at a
temperature τ (logits/τ; for a Gaussian σ·√τ), and ``log_p_old`` is then the behaviour's log-prob.
"""
from __future__ import annotations

import hashlib
import math
from dataclasses import dataclass, field
from functools import lru_cache
from typing import Callable, ClassVar

import torch
from torch import Tensor

from .registry import register_case
from .truth import Truth

__all__ = ["GradientSample", "GradientCase", "directions", "gaussian_gradients", "bandit_gradients",
           "sequence_log_probs", "sequence_gradients"]

DIRECTIONS = 6  # u_0 = ∇KL(p‖q), u_1 = the rest of ∇KL(q‖p), four random
OFF_POLICY_TEMPERATURE = 1.25
GRADIENT_TAGS = ("gate", "report")


@dataclass(frozen=True)
class GradientSample:
    """What a loss sees of n samples x ~ p_old, per token [n, T]: log p_θ, log q, log p_old and the mask; and what
    the gate needs to project its gradient, ``jvp`` [n, T, K] = ∇θ log p_θ(x_t | x_<t) · u_k."""

    log_p: Tensor
    log_q: Tensor
    log_p_old: Tensor
    mask: Tensor
    jvp: Tensor

    def to(self, dtype: torch.dtype) -> "GradientSample":
        """The log-probs in ``dtype`` (as a loss is handed them); the mask and ``jvp`` (float64) unchanged."""
        return GradientSample(self.log_p.to(dtype), self.log_q.to(dtype), self.log_p_old.to(dtype), self.mask,
                              self.jvp)


def directions(grads: dict[str, Tensor], k: int, seed: str) -> Tensor:
    """K orthonormal directions [K, D]: Gram–Schmidt (QR) of ∇KL(p‖q), ∇KL(q‖p) and random normal vectors
    seeded from ``seed``; u_0 points along ∇KL(p‖q)."""
    d = grads["kl"].numel()
    stable = int.from_bytes(hashlib.blake2b(seed.encode(), digest_size=8).digest(), "little") & (2 ** 63 - 1)
    rand = torch.randn(d, k - 2, generator=torch.Generator().manual_seed(stable), dtype=torch.float64)
    q, r = torch.linalg.qr(torch.cat([grads["kl"][:, None], grads["reverse_kl"][:, None], rand], 1))
    return (q * torch.sign(torch.diagonal(r))).T  # signs fixed so that u_0 · ∇KL(p‖q) > 0


@dataclass(frozen=True, eq=False)
class GradientCase:
    """A named (p_θ, q, p_old) with the exact gradients ``grads`` (name → [D] float64), the directions ``u``
    [K, D] and a ``source`` that draws float64 :class:`GradientSample` s: ``source(size, generator)``."""

    kind: ClassVar[str] = "gradient"

    name: str
    description: str
    tags: tuple[str, ...]
    off_policy: bool
    length: int
    kl: Truth  # KL(p‖q)
    grads: dict[str, Tensor]
    how: str  # how the gradients were obtained
    u: Tensor
    source: Callable[[int, torch.Generator | None], GradientSample] = field(repr=False)
    device: torch.device = torch.device("cpu")

    @property
    def truth(self) -> Truth:
        """‖∇θ KL(p‖q)‖, the scale a relative gradient bias is measured against."""
        return Truth(float(self.grads["kl"].norm()), self.kl.method, note=self.how)

    @property
    def event_numel(self) -> int:
        return self.length

    @property
    def targets(self) -> dict[str, Tensor]:
        """Each candidate's projections [K] on the directions: ∇KL(p‖q), ∇KL(q‖p), and zero."""
        return {**{name: self.u @ g for name, g in self.grads.items()}, "zero": torch.zeros(self.u.shape[0],
                                                                                             dtype=torch.float64)}

    def draw(self, size: int, generator: torch.Generator | None = None,
             dtype: torch.dtype | None = None) -> GradientSample:
        """``size`` samples x ~ p_old, exactly; log-probs in ``dtype`` (float64 by default)."""
        return self.source(size, generator).to(dtype or torch.float64)

    def enumeration(self) -> tuple[GradientSample, Tensor] | None:
        """Every state as a float64 :class:`GradientSample` with its probability under p_old [S], so that
        Σ_x p_old(x) f(x) is an exact expectation; None where the case is continuous (Gaussians)."""
        if not isinstance(self.source, _Table):
            return None
        t = self.source
        return GradientSample(t.log_p, t.log_q, t.log_p_old, t.mask, t.jvp), t.cdf_old.diff(prepend=t.cdf_old.new_zeros(1))


# --- Gaussians ---------------------------------------------------------------------------------------------------

def gaussian_gradients(mu: Tensor, log_sigma: Tensor, mu_q: Tensor, sigma_q: Tensor) -> dict[str, Tensor]:
    """The closed forms of the module docstring, θ = (μ, log σ) concatenated."""
    s2, q2, diff = torch.exp(2 * log_sigma), sigma_q ** 2, mu - mu_q
    return {"kl": torch.cat([diff / q2, s2 / q2 - 1]), "reverse_kl": torch.cat([diff / s2, 1 - (q2 + diff ** 2) / s2])}


def _gaussian_kl(mu, sigma, mu_q, sigma_q) -> float:
    return float((torch.log(sigma_q / sigma) + (sigma ** 2 + (mu - mu_q) ** 2) / (2 * sigma_q ** 2) - 0.5).sum())


def _gaussian_case(name, description, mu, sigma, mu_q, sigma_q, temperature=None) -> GradientCase:
    mu, sigma, mu_q, sigma_q = (torch.as_tensor(v, dtype=torch.float64).reshape(-1) for v in (mu, sigma, mu_q, sigma_q))
    sigma_old = sigma * math.sqrt(temperature or 1.0)
    grads = gaussian_gradients(mu, torch.log(sigma), mu_q, sigma_q)
    u = directions(grads, DIRECTIONS, name)
    d = mu.numel()

    def log_normal(x, m, s):
        return (-0.5 * ((x - m) / s) ** 2 - torch.log(s) - 0.5 * math.log(2 * math.pi)).sum(-1, keepdim=True)

    def source(size: int, generator) -> GradientSample:
        x = mu + sigma_old * torch.randn(size, d, generator=generator, dtype=torch.float64)
        z = (x - mu) / sigma
        score = torch.cat([z / sigma, z * z - 1], -1)  # ∇_(μ, log σ) log p(x)
        return GradientSample(log_normal(x, mu, sigma), log_normal(x, mu_q, sigma_q), log_normal(x, mu, sigma_old),
                              torch.ones(size, 1, dtype=torch.bool), (score @ u.T)[:, None, :])

    kl = Truth(_gaussian_kl(mu, sigma, mu_q, sigma_q), "closed form")
    return GradientCase(name, description, GRADIENT_TAGS, temperature is not None, 1, kl, grads,
                        "closed form, θ = (μ, log σ)", u, source)


# --- tables: categorical bandits and enumerated sequences -------------------------------------------------------------

@dataclass(frozen=True)
class _Table:
    """Every state [S] with its per-token log p_θ, log q, log p_old, mask, jvp [S, T(, K)]; drawn from p_old."""

    log_p: Tensor
    log_q: Tensor
    log_p_old: Tensor
    mask: Tensor
    jvp: Tensor
    cdf_old: Tensor = field(init=False)

    def __post_init__(self):
        mass = torch.exp(self.log_p_old.sum(-1))  # every token: a state's own mass, not its masked sequence's
        object.__setattr__(self, "cdf_old", torch.cumsum(mass, 0))

    def __call__(self, size: int, generator) -> GradientSample:
        u = 1.0 - torch.rand(size, generator=generator, dtype=torch.float64)  # (0, 1]: never a zero-mass state
        i = torch.searchsorted(self.cdf_old, u * self.cdf_old[-1]).clamp_max(self.cdf_old.numel() - 1)
        return GradientSample(self.log_p[i], self.log_q[i], self.log_p_old[i], self.mask[i], self.jvp[i])


def bandit_gradients(logits: Tensor, logits_q: Tensor) -> dict[str, Tensor]:
    """∇_a KL(softmax a ‖ q) = p ⊙ (log p − log q − KL), ∇_a KL(q ‖ softmax a) = p − q."""
    lp, lq = torch.log_softmax(logits, -1), torch.log_softmax(logits_q, -1)
    p, q = lp.exp(), lq.exp()
    kl = (p * (lp - lq)).sum()
    return {"kl": p * (lp - lq - kl), "reverse_kl": p - q}


def _bandit_case(name, description, logits, logits_q, temperature=None) -> GradientCase:
    lp, lq = torch.log_softmax(logits, -1), torch.log_softmax(logits_q, -1)
    grads = bandit_gradients(logits, logits_q)
    u = directions(grads, DIRECTIONS, name)
    jvp = u.T - (lp.exp() @ u.T)  # ∇_a log p(x) · u = u_x − p · u, every x
    lp_old = torch.log_softmax(logits / (temperature or 1.0), -1)
    col = lambda v: v[:, None]
    table = _Table(col(lp), col(lq), col(lp_old), torch.ones(lp.numel(), 1, dtype=torch.bool), jvp[:, None, :])
    kl = Truth(float((lp.exp() * (lp - lq)).sum()), "closed form", note=f"a sum over {lp.numel()} tokens")
    return GradientCase(name, description, GRADIENT_TAGS, temperature is not None, 1, kl, grads,
                        "closed form, θ = the logits", u, table)


def prefix_index(length: int, vocab: int) -> Tensor:
    """The id [S, T] of the prefix x_<t of every enumerated state (lexicographic order) and position t: the
    prefixes of length t are numbered after the Σ_{t'<t} V^t' shorter ones, in the order of their states."""
    t = torch.arange(length)
    offsets = torch.cumsum(vocab ** t, 0) - vocab ** t
    return offsets + torch.arange(vocab ** length)[:, None] // vocab ** (length - t)


def policy_logits(case) -> tuple[Tensor, Tensor]:
    """θ, the policy's next-step logits at every prefix ([P] Bernoulli logits or [P, V]), and the prefix id
    [S, T] of every state and position (:func:`prefix_index`)."""
    t = case.table
    idx = prefix_index(case.length, 2 if case.binary else case.vocab)
    width = () if case.binary else (case.vocab,)
    theta = torch.zeros(int(idx.max()) + 1, *width, dtype=torch.float64)
    theta[idx.reshape(-1)] = t.logits_p.reshape(-1, *width)
    return theta, idx


def sequence_log_probs(case, theta: Tensor, idx: Tensor) -> Tensor:
    """log p_θ(x_t | x_<t) [S, T] of every enumerated state when the next-step logits at prefix i are θ[i]."""
    from estimators.sequence import bernoulli_token_log_probs, categorical_token_log_probs

    states = case.table.states
    if case.binary:
        return bernoulli_token_log_probs(theta[idx], states)
    return categorical_token_log_probs(theta[idx], states.long())


def sequence_kls(case, log_p: Tensor) -> tuple[Tensor, Tensor]:
    """KL(p_θ‖q) and KL(q‖p_θ) by enumeration from the per-token table ``log_p`` [S, T]: the states' masses from
    every token, the log-ratios summed over the mask (a masked sequence's mass is that of its completions)."""
    m, lq = case.table.mask, case.table.log_q
    ratio = torch.where(m, log_p - lq, 0.0).sum(-1)
    return (torch.exp(log_p.sum(-1)) * ratio).sum(), -(torch.exp(lq.sum(-1)) * ratio).sum()


def sequence_gradients(case, theta: Tensor, idx: Tensor) -> dict[str, Tensor]:
    """∇θ KL(p‖q) and ∇θ KL(q‖p), flattened: reverse-mode autograd through :func:`sequence_kls` in float64."""
    theta = theta.clone().requires_grad_(True)
    kl_pq, kl_qp = sequence_kls(case, sequence_log_probs(case, theta, idx))
    return {"kl": torch.autograd.grad(kl_pq, theta, retain_graph=True)[0].reshape(-1),
            "reverse_kl": torch.autograd.grad(kl_qp, theta)[0].reshape(-1)}


@lru_cache(maxsize=None)
def _sequence_policy(seq_case: str):
    """The sequence case, its exact gradients, directions (seeded by its name) and ``jvp`` table: shared by the
    on- and off-policy gradient cases built on it."""
    from .registry import get_case

    case = get_case(seq_case, kind="sequence")
    theta, idx = policy_logits(case)
    grads = sequence_gradients(case, theta, idx)
    u = directions(grads, DIRECTIONS, seq_case)
    log_p = lambda th: sequence_log_probs(case, th, idx)
    jvp = torch.stack([torch.func.jvp(log_p, (theta,), (uk.view_as(theta),))[1] for uk in u], -1)
    return case, grads, u, jvp, theta.shape[0]


def _sequence_case(name, description, seq_case: str, temperature=None) -> GradientCase:
    from .sequence_cases import _token_log_probs

    case, grads, u, jvp, prefixes = _sequence_policy(seq_case)
    t = case.table
    lp_old = t.log_p if temperature is None else _token_log_probs(t.logits_p / temperature, t.states)
    table = _Table(t.log_p, t.log_q, lp_old, t.mask, jvp)
    return GradientCase(name, description, GRADIENT_TAGS, temperature is not None, case.length, case.truth, grads,
                        f"autograd through the enumeration of {t.states.shape[0]} sequences in float64, θ = p's "
                        f"next-step logits at each of its {prefixes} prefixes", u, table)


def _register(name: str, build: Callable[[str, str], GradientCase], description: str) -> None:
    register_case(name, lambda: build(name, description), kind="gradient", tags=GRADIENT_TAGS,
                  description=description)


_OFF = f"; sampled off-policy from p at temperature {OFF_POLICY_TEMPERATURE}"
for _suffix, _tau in (("", None), ("-off", OFF_POLICY_TEMPERATURE)):
    _register(f"grad-gauss-3d{_suffix}", lambda n, d, tau=_tau: _gaussian_case(
        n, d, [0.5, -0.3, 0.0], [1.0, 0.7, 1.3], [0.0, 0.0, 0.2], [0.9, 0.8, 1.2], tau),
              "diagonal Gaussians in 3-D, q narrower than 2σ_p² (E_p[(q/p)²] < ∞), θ = (μ, log σ) of p"
              + (_OFF if _tau else ""))
    _register(f"grad-bandit-50k{_suffix}", lambda n, d, tau=_tau: _bandit_case(n, d, *_vocab_pair("vocab-50k"), tau),
              "one token of the vocab-50k pair (GPT-2-sized vocabulary), θ = p's logits" + (_OFF if _tau else ""))
    for _seq, _what in (("nade-digits-steps", "NADE on digits ‖ itself early in training, 16 binary tokens"),
                        ("transformer-steps", "the transformer ‖ itself early in training, 8 tokens of 5"),
                        ("transformer-eos", "as grad-transformer-steps, token 0 ending a sequence (masked after)")):
        _register(f"grad-{_seq}{_suffix}", lambda n, d, seq=_seq, tau=_tau: _sequence_case(n, d, f"seq-{seq}", tau),
                  f"{_what}, θ = p's next-step logits at every prefix" + (_OFF if _tau else ""))


def _vocab_pair(kl_case: str) -> tuple[Tensor, Tensor]:
    """The normalized logits of a registered categorical KL case's p and q."""
    from .registry import get_case

    case = get_case(kl_case, kind="kl")
    return case.p.logits, case.q.logits
