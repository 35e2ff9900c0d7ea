"""A small causal transformer over fixed-length token sequences, with exact, normalized log-probabilities.

Sequences x ∈ {0, …, V−1}^T (T = ``block_size``, no EOS) factorize as p(x) = Π_t softmax(ℓ_t)[x_t],
where the logits ℓ_t = ``conditionals(x)[:, t]`` see x_<t only. The input at position t is the embedding
of x_{t−1}, and at position 0 a learned start vector (BOS) that is not a token, so the vocabulary is
exactly the V modelled tokens; each input adds a learned position embedding. Pre-LN blocks (causal
self-attention, then a 4·d MLP with GELU) and an output head tied to the token embedding, read straight
off the residual stream: ℓ_t = h_t Eᵀ, no bias and no final LayerNorm.

Initialization (``TransformerConfig.init``), the course notes' embedding bug: "scaled" draws the token
embedding E ~ N(0, σ²) with σ = d^-½, "unit" with σ = 1. At initialization the residual stream h_t is
essentially the input embedding (the blocks' outputs are small), so the tied head scores every token by a
dot product of two embeddings: with σ = d^-½ the logits are O(1) (‖E_v‖² ≈ 1) and the initial loss is
≈ ln V; with σ = 1 the previous token's own logit is ‖E_v‖² ≈ d, the softmax is peaked on a wrong
token and the loss is ≈ d (V = 64, d = 128: ≈ 4.2 = ln V against ≈ 120). A final LayerNorm would undo
the fix: it rescales h to norm √d, so even "scaled" gives the previous token a logit ≈ √d and a loss of
≈ ln V + 3. Position embeddings and BOS are N(0, d^-1) in both inits; linear weights N(0, 0.02²),
residual projections N(0, 0.02²/(2·n_layer)), biases 0 (as in nanoGPT), all from torch's global RNG.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.distributions import Categorical

from ._validate import positive_int

__all__ = ["TransformerConfig", "CausalTransformer", "all_sequences"]

MAX_SEQUENCES = 10 ** 6
INITS = ("scaled", "unit")


def all_sequences(vocab_size: int, length: int) -> Tensor:
    """All V^T token sequences [V^T, T] (int64) in lexicographic order; V^T ≤ 10⁶."""
    positive_int("vocab_size", vocab_size)
    positive_int("length", length)
    if vocab_size ** length > MAX_SEQUENCES:
        raise ValueError(f"vocab_size**length must be <= {MAX_SEQUENCES}, got {vocab_size}**{length}")
    idx = torch.arange(vocab_size ** length)
    place = vocab_size ** torch.arange(length - 1, -1, -1)
    return idx[:, None] // place % vocab_size


@dataclass(frozen=True)
class TransformerConfig:
    vocab_size: int
    block_size: int
    n_layer: int = 2
    n_head: int = 2
    d_model: int = 32
    init: str = "scaled"

    def __post_init__(self):
        for name in ("vocab_size", "block_size", "n_layer", "n_head", "d_model"):
            positive_int(name, getattr(self, name))
        if self.d_model % self.n_head:
            raise ValueError(f"d_model must be divisible by n_head, got {self.d_model} and {self.n_head}")
        if self.init not in INITS:
            raise ValueError(f"init must be one of {INITS}, got {self.init!r}")


class _SelfAttention(nn.Module):
    def __init__(self, config: TransformerConfig):
        super().__init__()
        self.n_head = config.n_head
        self.qkv = nn.Linear(config.d_model, 3 * config.d_model)
        self.proj = nn.Linear(config.d_model, config.d_model)

    def forward(self, h: Tensor) -> Tensor:
        n, t, d = h.shape
        q, k, v = (z.view(n, t, self.n_head, d // self.n_head).transpose(1, 2)
                   for z in self.qkv(h).split(d, dim=2))
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        return self.proj(y.transpose(1, 2).reshape(n, t, d))


class _Block(nn.Module):
    def __init__(self, config: TransformerConfig):
        super().__init__()
        d = config.d_model
        self.ln1 = nn.LayerNorm(d)
        self.attn = _SelfAttention(config)
        self.ln2 = nn.LayerNorm(d)
        self.mlp = nn.Sequential(nn.Linear(d, 4 * d), nn.GELU(), nn.Linear(4 * d, d))

    def forward(self, h: Tensor) -> Tensor:
        h = h + self.attn(self.ln1(h))
        return h + self.mlp(self.ln2(h))


class CausalTransformer(nn.Module):
    """GPT-style autoregressive model of x ∈ {0..V−1}^T; see the module docstring for the architecture."""

    def __init__(self, config: TransformerConfig):
        super().__init__()
        self.config = config
        d = config.d_model
        self.tok_emb = nn.Embedding(config.vocab_size, d)
        self.pos_emb = nn.Parameter(torch.empty(config.block_size, d))
        self.bos = nn.Parameter(torch.empty(d))
        self.blocks = nn.ModuleList(_Block(config) for _ in range(config.n_layer))
        self._init_weights()

    def _init_weights(self) -> None:
        std = self.config.d_model ** -0.5
        nn.init.normal_(self.tok_emb.weight, std=1.0 if self.config.init == "unit" else std)
        nn.init.normal_(self.pos_emb, std=std)
        nn.init.normal_(self.bos, std=std)
        for block in self.blocks:
            for layer in (block.attn.qkv, block.attn.proj, block.mlp[0], block.mlp[2]):
                nn.init.normal_(layer.weight, std=0.02)
                nn.init.zeros_(layer.bias)
            for layer in (block.attn.proj, block.mlp[2]):
                nn.init.normal_(layer.weight, std=0.02 / math.sqrt(2 * self.config.n_layer))

    @staticmethod
    def parameter_formula(config: TransformerConfig) -> int:
        """V·d (tied embedding/head) + T·d (positions) + d (BOS) + L·(12d² + 13d), where a
        block has LN 2d, qkv 3d²+3d, proj d²+d, LN 2d, MLP 4d²+4d and 4d²+d."""
        d = config.d_model
        return (config.vocab_size * d + config.block_size * d + d
                + config.n_layer * (12 * d * d + 13 * d))

    def num_parameters(self) -> int:
        """Number of trainable scalars (the tied head counted once)."""
        return sum(p.numel() for p in self.parameters() if p.requires_grad)

    @property
    def device(self) -> torch.device:
        return self.bos.device

    def _check(self, x: Tensor) -> Tensor:
        if not isinstance(x, Tensor):
            raise ValueError(f"x must be a torch.Tensor, got {type(x).__name__}")
        if x.is_floating_point() or x.is_complex() or x.dtype == torch.bool:
            raise ValueError(f"x must hold integer token ids, got dtype {x.dtype}")
        T, V = self.config.block_size, self.config.vocab_size
        if x.dim() != 2 or x.shape[1] != T:
            raise ValueError(f"x must have shape [n, {T}], got {tuple(x.shape)}")
        if x.numel() and (int(x.min()) < 0 or int(x.max()) >= V):
            raise ValueError(f"x holds token ids outside [0, {V})")
        return x.long()

    def _logits(self, prefix: Tensor) -> Tensor:
        """Logits [n, t+1, V] for positions 0..t from a prefix x_<t+1 of t < T tokens."""
        n, t = prefix.shape
        start = self.bos.expand(n, 1, self.config.d_model)
        h = torch.cat([start, self.tok_emb(prefix)], dim=1) + self.pos_emb[:t + 1]
        for block in self.blocks:
            h = block(h)
        return h @ self.tok_emb.weight.T

    def conditionals(self, x: Tensor) -> Tensor:
        """Logits [n, T, V]: position t gives the distribution of x_t given x_<t."""
        return self._logits(self._check(x)[:, :-1])

    def log_prob(self, x: Tensor) -> Tensor:
        """Exact log p(x) = Σ_t log softmax(ℓ_t)[x_t], shape [n]."""
        x = self._check(x)
        return Categorical(logits=self._logits(x[:, :-1]), validate_args=False).log_prob(x).sum(-1)

    @torch.no_grad()
    def sample(self, n: int, generator: torch.Generator | None = None, temperature: float = 1.0) -> Tensor:
        """Ancestral samples [n, T] (int64), one forward pass per position; ``temperature`` τ samples from
        softmax(ℓ_t/τ) (τ = 1 is the distribution ``log_prob`` scores)."""
        n = positive_int("n", n)
        if not (isinstance(temperature, (int, float)) and temperature > 0 and math.isfinite(temperature)):
            raise ValueError(f"temperature must be a positive finite number, got {temperature!r}")
        x = torch.empty(n, 0, dtype=torch.long, device=self.device)
        for _ in range(self.config.block_size):
            probs = torch.softmax(self._logits(x)[:, -1] / temperature, dim=-1)
            x = torch.cat([x, torch.multinomial(probs, 1, generator=generator)], dim=1)
        return x
