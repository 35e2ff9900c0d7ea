"""Autoregressive models of binary vectors x ∈ {0,1}^D with exact, normalized log-probabilities.

Each model factorizes p(x) = Π_d p(x_d | x_<d) with Bernoulli conditionals whose logits ℓ_d come from
``conditionals(x)`` (logits [n, D], indexed by dimension d), so

    log p(x) = Σ_d x_d·ℓ_d − softplus(ℓ_d).

Normalization holds by construction: each conditional is a proper Bernoulli and ℓ_d sees only the
dimensions before d in the model's ``ordering`` (identity except for MADE). Sampling is ancestral:
sequential over the D dimensions, vectorized over the batch, through an explicit ``torch.Generator``.
Parameters are float32 and initialized from torch's global RNG, as in ``torch.nn``; ``.double()`` gives
float64 log-probabilities.

- ``FVSBN``: ℓ_d = b_d + Σ_{j<d} W_dj x_j (logistic regression on the prefix).
- ``NADE``: one hidden layer per conditional with the shared matrix W, a_d = c + W_{:,<d} x_<d,
  ℓ_d = b_d + V_d·σ(a_d); the a_d are a cumulative sum over d, O(D·H) per example.
- ``MADE``: an MLP whose weights are masked by connectivity degrees so that ℓ_d depends on x_<d only.
"""
from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.distributions import Bernoulli

from ._validate import positive_int

__all__ = ["BinaryAutoregressive", "FVSBN", "NADE", "MADE"]



class BinaryAutoregressive(nn.Module):
    """Base class: ``log_prob``, ``sample`` and ``num_parameters`` from a subclass's ``conditionals``."""

    def __init__(self, dim: int, ordering: Sequence[int] | None = None):
        super().__init__()
        self.dim = positive_int("dim", dim)
        self.ordering = tuple(range(dim)) if ordering is None else tuple(int(d) for d in ordering)
        if sorted(self.ordering) != list(range(dim)):
            raise ValueError(f"ordering must be a permutation of range({dim}), got {ordering!r}")

    @property
    def dtype(self) -> torch.dtype:
        return next(self.parameters()).dtype

    @property
    def device(self) -> torch.device:
        return next(self.parameters()).device

    def _check(self, x: Tensor) -> Tensor:
        if not isinstance(x, Tensor):
            raise ValueError(f"x must be a torch.Tensor, got {type(x).__name__}")
        if x.dim() != 2 or x.shape[1] != self.dim:
            raise ValueError(f"x must have shape [n, {self.dim}], got {tuple(x.shape)}")
        if not bool(((x == 0) | (x == 1)).all()):
            raise ValueError("x must hold only 0s and 1s")
        return x.to(self.dtype)

    def conditionals(self, x: Tensor) -> Tensor:
        """Bernoulli logits [n, D]: entry d is logit p(x_d = 1 | the dimensions before d in the ordering)."""
        raise NotImplementedError

    def log_prob(self, x: Tensor) -> Tensor:
        """Exact log p(x) = Σ_d x_d·ℓ_d − softplus(ℓ_d), shape [n]."""
        x = self._check(x)
        return Bernoulli(logits=self.conditionals(x), validate_args=False).log_prob(x).sum(-1)

    @torch.no_grad()
    def sample(self, n: int, generator: torch.Generator | None = None) -> Tensor:
        """Ancestral samples [n, D] of 0/1 in the parameters' dtype: D passes of ``conditionals``."""
        x = torch.zeros(positive_int("n", n), self.dim, dtype=self.dtype, device=self.device)
        for d in self.ordering:
            x[:, d] = torch.bernoulli(torch.sigmoid(self.conditionals(x)[:, d]), generator=generator)
        return x

    def num_parameters(self) -> int:
        """Number of trainable scalars."""
        return sum(p.numel() for p in self.parameters() if p.requires_grad)


class FVSBN(BinaryAutoregressive):
    """Fully visible sigmoid belief network: ℓ_d = b_d + Σ_{j<d} W_dj x_j.

    W is stored as its D(D−1)/2 strictly-lower-triangular entries, so it has D + D(D−1)/2 = D(D+1)/2
    parameters.
    """

    def __init__(self, dim: int):
        super().__init__(dim)
        rows, cols = torch.tril_indices(dim, dim, offset=-1)
        self.register_buffer("_rows", rows, persistent=False)
        self.register_buffer("_cols", cols, persistent=False)
        self.bias = nn.Parameter(torch.zeros(dim))
        self.weight = nn.Parameter(torch.randn(rows.numel()) * dim ** -0.5)

    @staticmethod
    def parameter_formula(dim: int) -> int:
        return dim + dim * (dim - 1) // 2

    def weight_matrix(self) -> Tensor:
        """The strictly lower-triangular W [D, D]."""
        w = self.weight.new_zeros(self.dim, self.dim)
        return w.index_put((self._rows, self._cols), self.weight)

    def conditionals(self, x: Tensor) -> Tensor:
        return self.bias + self._check(x) @ self.weight_matrix().T


class NADE(BinaryAutoregressive):
    """Neural autoregressive density estimator (Larochelle & Murray, 2011) with H sigmoid hidden units:

        a_d = c + W[:, :d] x_<d,   ℓ_d = b_d + V[d]·σ(a_d),

    W [H, D] shared by all conditionals, c [H], V [D, H], b [D]: 2DH + H + D parameters.
    """

    def __init__(self, dim: int, hidden: int):
        super().__init__(dim)
        self.hidden = positive_int("hidden", hidden)
        self.W = nn.Parameter(torch.randn(hidden, dim) * dim ** -0.5)
        self.c = nn.Parameter(torch.zeros(hidden))
        self.V = nn.Parameter(torch.randn(dim, hidden) * hidden ** -0.5)
        self.b = nn.Parameter(torch.zeros(dim))

    @staticmethod
    def parameter_formula(dim: int, hidden: int) -> int:
        return 2 * dim * hidden + hidden + dim

    def _logit(self, a: Tensor, d: int) -> Tensor:
        return self.b[d] + torch.sigmoid(a) @ self.V[d]

    def conditionals(self, x: Tensor) -> Tensor:
        """Logits with a_d cached as the cumulative sum a_{d+1} = a_d + W[:, d] x_d: O(D·H) per example."""
        x = self._check(x)
        a, logits = self.c.expand(x.shape[0], self.hidden), []
        for d in range(self.dim):
            logits.append(self._logit(a, d))
            a = a + x[:, d, None] * self.W[:, d]
        return torch.stack(logits, dim=1)

    def conditionals_naive(self, x: Tensor) -> Tensor:
        """The same logits, each a_d recomputed from scratch: O(D²·H) per example (the speedup baseline)."""
        x = self._check(x)
        return torch.stack([self._logit(self.c + x[:, :d] @ self.W[:, :d].T, d) for d in range(self.dim)], dim=1)

    @torch.no_grad()
    def sample(self, n: int, generator: torch.Generator | None = None) -> Tensor:
        """Ancestral samples [n, D], drawing x_d and then updating a ← a + W[:, d] x_d: O(D·H) per sample."""
        x = torch.zeros(positive_int("n", n), self.dim, dtype=self.dtype, device=self.device)
        a = self.c.expand(n, self.hidden)
        for d in range(self.dim):
            x[:, d] = torch.bernoulli(torch.sigmoid(self._logit(a, d)), generator=generator)
            a = a + x[:, d, None] * self.W[:, d]
        return x


class _MaskedLinear(nn.Linear):
    """y = x (W ⊙ M)ᵀ + b with a fixed 0/1 mask M; masked-out entries of W get zero gradient."""

    def __init__(self, mask: Tensor):
        super().__init__(mask.shape[1], mask.shape[0])
        self.register_buffer("mask", mask.to(self.weight.dtype))

    def forward(self, x: Tensor) -> Tensor:
        return F.linear(x, self.weight * self.mask, self.bias)


class MADE(BinaryAutoregressive):
    """Masked autoencoder for distribution estimation (Germain et al., 2015), ReLU hidden layers.

    Input d has degree m(d) = its 1-based position in ``ordering`` (``ordering[k]`` is the dimension
    generated at step k; default identity). Hidden unit degrees are drawn uniformly from
    {min degree of the previous layer, …, D−1} with a generator seeded by ``seed``. A hidden unit of
    degree m sees inputs/units of degree ≤ m; output d sees hidden units of degree < m(d). Hence ℓ_d
    depends only on the dimensions before d in the ordering.

    Parameters: every entry of each dense weight matrix counts, masked-out ones included (they are
    stored and trainable, with zero gradient): Σ_l (n_{l−1}·n_l + n_l) over layer sizes (D, *hidden, D).
    """

    def __init__(self, dim: int, hidden_sizes: Sequence[int], ordering: Sequence[int] | None = None,
                 seed: int = 0):
        super().__init__(dim, ordering)
        if dim < 2:
            raise ValueError(f"dim must be >= 2 for MADE (hidden degrees lie in 1..dim-1), got {dim}")
        self.hidden_sizes = tuple(positive_int("hidden_sizes entries", h) for h in hidden_sizes)
        g = torch.Generator().manual_seed(seed)
        degree_in = torch.empty(dim, dtype=torch.long)
        degree_in[list(self.ordering)] = torch.arange(1, dim + 1)
        degrees = [degree_in]
        for h in self.hidden_sizes:
            degrees.append(torch.randint(int(degrees[-1].min()), dim, (h,), generator=g))
        masks = [later[:, None] >= earlier[None, :] for earlier, later in zip(degrees[:-1], degrees[1:])]
        masks.append(degree_in[:, None] > degrees[-1][None, :])
        self.layers = nn.ModuleList(_MaskedLinear(m) for m in masks)

    @staticmethod
    def parameter_formula(dim: int, hidden_sizes: Sequence[int]) -> int:
        sizes = [dim, *hidden_sizes, dim]
        return sum(a * b + b for a, b in zip(sizes[:-1], sizes[1:]))

    def conditionals(self, x: Tensor) -> Tensor:
        h = self._check(x)
        for layer in self.layers[:-1]:
            h = torch.relu(layer(h))
        return self.layers[-1](h)
