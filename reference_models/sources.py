r"""Synthetic data sources with exact likelihoods, for training reference models on known ground truth.

:class:`HiddenMarkovModel` is a discrete HMM over fixed-length token sequences: hidden states
:math:`z_1 \sim \pi`, :math:`z_{t+1} \mid z_t \sim A_{z_t}`, tokens :math:`x_t \mid z_t \sim B_{z_t}`.
Its likelihood and its next-token predictive distribution are exact (forward algorithm), so a
transformer trained on its samples can be compared with it by enumeration.
"""
from __future__ import annotations

import torch
from torch import Tensor

from ._validate import positive_int
from .distributions import ReferenceModel

__all__ = ["HiddenMarkovModel"]


def _stochastic(value, name: str, shape: tuple[int, ...], dtype, device) -> Tensor:
    t = torch.as_tensor(value, dtype=dtype, device=device)
    if tuple(t.shape) != shape:
        raise ValueError(f"{name} must have shape {list(shape)}, got {list(t.shape)}")
    if not bool(torch.isfinite(t).all()) or bool((t < 0).any()):
        raise ValueError(f"{name} must be finite and non-negative")
    if not torch.allclose(t.sum(-1), torch.ones((), dtype=dtype, device=device), atol=1e-6):
        raise ValueError(f"{name} must sum to 1 along its last dimension")
    return t / t.sum(-1, keepdim=True)


class HiddenMarkovModel(ReferenceModel):
    r"""A discrete HMM over sequences of ``length`` tokens in ``[0, V)``.

    ``initial`` [S] is :math:`\pi`, ``transition`` [S, S] is :math:`A_{ij} = p(z_{t+1}=j \mid z_t=i)`,
    ``emission`` [S, V] is :math:`B_{sv} = p(x_t=v \mid z_t=s)`, ``length`` is T. Probabilities are kept in
    float64 by default.

    - ``log_prob`` runs the forward recursion :math:`\alpha_1 = \pi \odot B_{:,x_1}`,
      :math:`\alpha_{t+1} = (\alpha_t A) \odot B_{:,x_{t+1}}`, :math:`p(x) = \sum_s \alpha_T(s)` in log space.
    - ``conditionals`` runs forward filtering: with the predictive state law
      :math:`\rho_t = p(z_t \mid x_{<t})`, :math:`p(x_t = v \mid x_{<t}) = \sum_s \rho_t(s) B_{sv}`.
    """

    _anchor = "initial"

    def __init__(self, initial, transition, emission, length: int, *, dtype=torch.float64, device=None):
        length = positive_int("length", length)
        initial, emission = torch.as_tensor(initial), torch.as_tensor(emission)
        if initial.dim() != 1 or initial.numel() == 0:
            raise ValueError(f"initial must be a non-empty vector [S], got shape {list(initial.shape)}")
        s, v = initial.shape[0], emission.shape[-1] if emission.dim() else 0
        self.initial = _stochastic(initial, "initial", (s,), dtype, device)
        self.transition = _stochastic(transition, "transition", (s, s), dtype, device)
        self.emission = _stochastic(emission, "emission", (s, v), dtype, device)
        self.length = length
        self._log_pi, self._log_a, self._log_b = self.initial.log(), self.transition.log(), self.emission.log()

    @classmethod
    def random(cls, num_states: int, vocab_size: int, length: int, seed: int, *, stickiness: float = 2.5,
               scale: float = 1.5, dtype=torch.float64, device=None) -> HiddenMarkovModel:
        r"""A random HMM: :math:`A = \mathrm{softmax}(\mathrm{scale}\cdot G + \mathrm{stickiness}\cdot I)`
        and :math:`B = \mathrm{softmax}(\mathrm{scale}\cdot G')` row-wise, :math:`\pi = \mathrm{softmax}(G'')`,
        with G, G', G'' standard normal drawn from ``torch.Generator().manual_seed(seed)``. A positive
        ``stickiness`` (in nats) makes hidden states persist, so tokens carry long-range structure."""
        num_states, vocab_size = positive_int("num_states", num_states), positive_int("vocab_size", vocab_size)
        g = torch.Generator().manual_seed(seed)
        eye = torch.eye(num_states, dtype=torch.float64)
        transition = torch.softmax(scale * torch.randn(num_states, num_states, generator=g, dtype=torch.float64)
                                   + stickiness * eye, -1)
        emission = torch.softmax(scale * torch.randn(num_states, vocab_size, generator=g, dtype=torch.float64), -1)
        initial = torch.softmax(torch.randn(num_states, generator=g, dtype=torch.float64), -1)
        return cls(initial, transition, emission, length, dtype=dtype, device=device)

    @property
    def event_shape(self) -> torch.Size:
        return torch.Size([self.length])

    @property
    def num_states(self) -> int:
        return self.initial.shape[0]

    @property
    def vocab_size(self) -> int:
        return self.emission.shape[1]

    def _check(self, x) -> Tensor:
        if not isinstance(x, Tensor) or x.is_floating_point() or x.is_complex() or x.dtype == torch.bool:
            raise ValueError(f"x must be an integer tensor of token ids, got {getattr(x, 'dtype', type(x).__name__)}")
        if x.dim() != 2 or x.shape[1] != self.length:
            raise ValueError(f"x must have shape [n, {self.length}], got {list(x.shape)}")
        if x.numel() and (int(x.min()) < 0 or int(x.max()) >= self.vocab_size):
            raise ValueError(f"x holds token ids outside [0, {self.vocab_size})")
        return x.to(self.device)

    def log_prob(self, x: Tensor) -> Tensor:
        """Exact log p(x) by the forward algorithm in log space, vectorized over the batch: [n, T] -> [n]."""
        x = self._check(x)
        log_b = self._log_b.T  # [V, S]
        alpha = self._log_pi + log_b[x[:, 0]]
        for t in range(1, self.length):
            alpha = torch.logsumexp(alpha[:, :, None] + self._log_a, 1) + log_b[x[:, t]]
        return torch.logsumexp(alpha, 1)

    def conditionals(self, x: Tensor) -> Tensor:
        """Normalized next-token log-probabilities log p(x_t = v | x_<t): [n, T] -> [n, T, V]."""
        x = self._check(x)
        log_rho = self._log_pi.expand(x.shape[0], -1)  # log p(z_t | x_<t), [n, S]
        out = []
        for t in range(self.length):
            out.append(torch.logsumexp(log_rho[:, :, None] + self._log_b, 1))
            joint = log_rho + self._log_b.T[x[:, t]]
            filtered = joint - torch.logsumexp(joint, 1, keepdim=True)  # log p(z_t | x_≤t)
            log_rho = torch.logsumexp(filtered[:, :, None] + self._log_a, 1)
        return torch.stack(out, 1)

    def _sample(self, n, generator):
        z = torch.multinomial(self.initial, n, replacement=True, generator=generator)
        tokens = []
        for t in range(self.length):
            if t:
                z = torch.multinomial(self.transition[z], 1, generator=generator).squeeze(1)
            tokens.append(torch.multinomial(self.emission[z], 1, generator=generator).squeeze(1))
        return torch.stack(tokens, 1)

    def describe(self):
        return f"S={self.num_states}, V={self.vocab_size}, T={self.length}"
