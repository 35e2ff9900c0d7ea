r"""Sequence-level KL cases: pairs of autoregressive models with the exact KL by enumeration.

An autoregressive model here is anything with ``conditionals(x)`` (the next-step distribution at every
position: Bernoulli logits ``[n, D]`` for binary models, logits ``[n, T, V]`` for token models) and
``log_prob(x)``: the trained FVSBN, NADE, MADE and transformer checkpoints, the HMM source, and a Bayesian
network read in topological order. A case draws sequences x ~ p and hands the estimators what RLHF code
has: the per-token log-probs of the sampled tokens under p and q, a mask (1 = real token), and the
next-step logits of both models for the Rao-Blackwellized estimator.

Its truth is an exact sum over every sequence (≤ 10⁶ of them) in float64,

    KL(p‖q) = Σ_x p(x) Σ_t m_t(x) (log p(x_t | x_<t) − log q(x_t | x_<t)),

with ``m_t`` the mask (all ones, or up to and including the first end-of-sequence token, in which case
the sum is the KL between the two distributions of variable-length sequences). The token-level ratio
moments that per-token estimators' expectations need are enumerated alongside, with
r_t = q(x_t | x_<t)/p(x_t | x_<t): ``mean_log_r2`` = E_p[Σ_t m_t (log r_t)²],
``mean_r`` = 1 + E_p[Σ_t m_t (r_t − 1)] (1 exactly when q's support lies inside p's at every prefix),
``mean_r2`` = E_p[Σ_t m_t r_t²]. So a per-token estimator summed over the sequence has the same
expectation formulas as on a single-step case (k3: KL + mean_r − 1). Any other exact moment of an
estimator is a weighted sum over :meth:`SequenceKLCase.enumeration`.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from functools import lru_cache
from typing import Callable, ClassVar

import torch
from torch import Tensor, nn

from estimators.sequence import bernoulli_token_log_probs, categorical_token_log_probs

from .bayesnet import DiscreteBayesNet
from .cases import DEFAULT_TAGS, RatioCase
from .registry import register_case
from .transformer import all_sequences
from .truth import RatioMoments, Truth

__all__ = ["SequenceSample", "SequenceTable", "SequenceKLCase", "Tempered", "TopK", "BayesNetAR",
           "enumerated_logits", "sequence_table", "sequence_moments", "expectation", "enumerated_truth"]

_BATCH = 2 ** 15  # sequences per enumeration batch


@dataclass(frozen=True)
class SequenceSample:
    """What an estimator may see of n sampled sequences: per-token log-probs [n, T] of the sampled tokens
    under p and q, the mask [n, T] (bool, 1 = a real token), and both models' next-step logits ([n, T, V], or
    Bernoulli logits [n, D]). As in RLHF code, positions after the end hold the models' log-probs of whatever
    tokens are there: only the mask says they do not count."""

    log_p: Tensor
    log_q: Tensor
    mask: Tensor
    logits_p: Tensor
    logits_q: Tensor


def _token_log_probs(logits: Tensor, x: Tensor) -> Tensor:
    """log p(x_t | x_<t) of the given tokens: Bernoulli logits [n, D] or categorical logits [n, T, V]."""
    if logits.dim() == 2:
        return bernoulli_token_log_probs(logits, x)
    return categorical_token_log_probs(logits, x.long())


class Tempered(nn.Module):
    """The token model with every next-step distribution at temperature τ: softmax(logits/τ)."""

    def __init__(self, model: nn.Module, temperature: float):
        super().__init__()
        if not temperature > 0:
            raise ValueError(f"temperature must be positive, got {temperature}")
        self.model, self.temperature = model, float(temperature)

    def transform(self, logits: Tensor) -> Tensor:
        return logits / self.temperature

    def conditionals(self, x: Tensor) -> Tensor:
        return self.transform(self.model.conditionals(x))


class TopK(nn.Module):
    """The token model with every next-step distribution truncated to its k most likely tokens."""

    def __init__(self, model: nn.Module, k: int):
        super().__init__()
        if k < 1:
            raise ValueError(f"k must be ≥ 1, got {k}")
        self.model, self.k = model, int(k)

    def transform(self, logits: Tensor) -> Tensor:
        kth = logits.topk(self.k, dim=-1).values[..., -1:]
        return logits.masked_fill(logits < kth, -math.inf)

    def conditionals(self, x: Tensor) -> Tensor:
        return self.transform(self.model.conditionals(x))


class BayesNetAR(nn.Module):
    """A binary Bayesian network read as an autoregressive model in its (topological) node order:
    p(x_d = 1 | x_<d) = p(x_d = 1 | parents(d)), the row of d's table picked by its parents' values."""

    def __init__(self, net: DiscreteBayesNet):
        super().__init__()
        if any(k != 2 for k in net.cards):
            raise ValueError("BayesNetAR needs binary nodes")
        if any(p >= d for d, ps in enumerate(net.parents) for p in ps):
            raise ValueError("BayesNetAR needs the nodes in topological order (every parent before its child)")
        self.net, self.dim = net, len(net.cards)

    def conditionals(self, x: Tensor) -> Tensor:
        cols = []
        for d, (ps, cpt) in enumerate(zip(self.net.parents, self.net.cpts)):
            row = cpt[tuple(x[:, p].long() for p in ps)] if ps else cpt.expand(x.shape[0], 2)
            cols.append(torch.log(row[:, 1]) - torch.log(row[:, 0]))
        return torch.stack(cols, -1).to(x.dtype if x.is_floating_point() else torch.float64)


@dataclass(frozen=True)
class SequenceTable:
    """Every sequence of a case with what the estimators see of it (float64): ``states`` [S, T], per-token
    log-probs under p and q [S, T] (0 on the states p cannot produce), the mask, both models' next-step
    logits, and the cumulative probability of the states under p, ``cdf`` [S], for exact inverse-CDF sampling."""

    states: Tensor
    log_p: Tensor
    log_q: Tensor
    mask: Tensor
    logits_p: Tensor
    logits_q: Tensor
    log_mass: Tensor  # log p(x) of every (unmasked, full-length) state
    cdf: Tensor


@dataclass(frozen=True, eq=False)
class SequenceKLCase(RatioCase):
    """A named pair of autoregressive models ``p`` and ``q`` with every sequence enumerated in ``table``."""

    kind: ClassVar[str] = "sequence"

    name: str
    p: nn.Module
    q: nn.Module
    moments: RatioMoments
    description: str
    tags: tuple[str, ...]
    length: int
    binary: bool  # Bernoulli conditionals [n, D]; else categorical [n, T, vocab]
    vocab: int
    eos: int | None  # token that ends a sequence (masked after it), categorical models only
    table: SequenceTable

    @property
    def finite_support(self) -> bool:
        return True

    @property
    def diagnose_tails(self) -> bool:
        """Finite, but a rare sequence can carry a ratio q/p of 10³ or more (k3 of the whole-sequence ratio on
        the Bayesian-network cases has variance 10³ × its mean): the CLT is checked, not assumed."""
        return True

    @property
    def event_numel(self) -> int:
        """Elements per sequence: its tokens times the logits drawn for each."""
        return self.length * (1 if self.binary else self.vocab)

    @property
    def device(self) -> torch.device:
        """Where the table lives (and so where a generator for :meth:`draw` lives)."""
        return self.table.cdf.device

    def draw(self, size: int, generator: torch.Generator | None = None,
             dtype: torch.dtype | None = None) -> SequenceSample:
        """``size`` sequences x ~ p, exactly: inverse-CDF sampling over the enumerated sequences (the same law as
        ancestral sampling through the conditionals, without n·T forward passes), in ``dtype`` (float64 by
        default)."""
        t, dtype = self.table, dtype or torch.float64
        u = 1.0 - torch.rand(size, generator=generator, dtype=torch.float64)  # (0, 1]: never a zero-mass state
        idx = torch.searchsorted(t.cdf, u * t.cdf[-1]).clamp_max(t.cdf.numel() - 1)
        return SequenceSample(t.log_p[idx].to(dtype), t.log_q[idx].to(dtype), t.mask[idx],
                              t.logits_p[idx].to(dtype), t.logits_q[idx].to(dtype))

    def enumeration(self) -> tuple[SequenceSample, Tensor]:
        """Every enumerated sequence as a float64 :class:`SequenceSample` [S, ...], with its probability p(x)
        [S] in float64 (0 on the states p cannot produce), so that Σ_x p(x) f(x) is any exact expectation."""
        t = self.table
        return SequenceSample(t.log_p, t.log_q, t.mask, t.logits_p, t.logits_q), torch.exp(t.log_mass)


def _mask(x: Tensor, eos: int | None) -> Tensor:
    """1 up to and including the first ``eos`` token."""
    if eos is None:
        return torch.ones(x.shape, dtype=torch.bool)
    ended_before = torch.cumsum((x == eos).long(), -1) - (x == eos).long()
    return ended_before == 0


@lru_cache(maxsize=16)
def enumerated_logits(model: nn.Module, length: int, vocab: int, binary: bool) -> Tensor:
    """The model's next-step logits at every sequence of ``all_sequences(vocab, length)`` in float64. A token model's
    logits at x depend on the prefix x_<T only, so they are computed once per prefix (V^(T−1) passes) and
    repeated for the V last tokens; a wrapper (temperature, top-k) transforms its model's table."""
    if hasattr(model, "transform"):
        return model.transform(enumerated_logits(model.model, length, vocab, binary))
    with torch.no_grad():
        if binary:
            states = all_sequences(2, length).double()
            return torch.cat([model.conditionals(b).double() for b in states.split(_BATCH)])
        prefixes = torch.cat([all_sequences(vocab, length - 1), torch.zeros(vocab ** (length - 1), 1, dtype=torch.long)],
                             1)
        table = torch.cat([model.conditionals(b).double() for b in prefixes.split(_BATCH)])
        return table.repeat_interleave(vocab, 0)


def sequence_table(p, q, length: int, binary: bool, vocab: int = 2, eos: int | None = None) -> SequenceTable:
    """Enumerate every sequence of the pair (at most 10⁶: ``all_sequences`` says so otherwise)."""
    states = all_sequences(vocab, length)
    if binary:
        states = states.double()
    logits_p, logits_q = (enumerated_logits(m, length, vocab, binary) for m in (p, q))
    mask = _mask(states, eos)
    full_p = _token_log_probs(logits_p, states)
    log_mass = full_p.sum(-1)
    live = log_mass > -math.inf  # states p can produce; the others never enter a sum or a draw
    log_p = torch.where(live[:, None], full_p, 0.0)
    log_q = torch.where(live[:, None], _token_log_probs(logits_q, states), 0.0)
    return SequenceTable(states, log_p, log_q, mask, logits_p, logits_q, log_mass,
                         torch.cumsum(torch.exp(log_mass), 0))


def expectation(w: Tensor, v: Tensor) -> float:
    """Σ_x w(x) v(x) over an enumeration with weights w = p(x): the states with w = 0 never contribute, so a NaN
    or inf of v there is ignored."""
    return float((w * torch.where(w > 0, v, 0.0)).sum())


def enumerated_truth(w: Tensor, value: float, note: str) -> Truth:
    """A value summed over an enumeration with weights ``w``, bounded by how far their total is from 1."""
    return Truth(value, "enumeration", abs(float(w.sum()) - 1.0) * max(1.0, abs(value)) + 1e-12, note)


def sequence_moments(t: SequenceTable) -> RatioMoments:
    """The exact token-level moments of the module docstring, as sums over the enumerated sequences weighted by
    p(x), in float64."""
    w = torch.exp(t.log_mass)
    log_r = torch.where(t.mask, t.log_q - t.log_p, 0.0)
    r = torch.exp(log_r)
    expect = lambda v: expectation(w, v)
    mass = float(w.sum())
    if abs(mass - 1.0) > 1e-6:
        raise ValueError(f"p is not normalized over the {w.numel()} sequences: total mass {mass:.9f}")
    how = f"{w.numel()} sequences in float64"
    truth = lambda value, note: enumerated_truth(w, value, note)

    return RatioMoments(
        kl=truth(expect(-log_r.sum(-1)), how),
        reverse_kl=Truth(math.nan, "not defined",
                         note="a per-token reverse estimator summed along sequences drawn from p targets no "
                              "sequence-level KL(q‖p)"),
        mean_log_r2=truth(expect((log_r ** 2).sum(-1)), how + ", per-token (log r_t)² summed"),
        mean_r=truth(1.0 + expect(torch.where(t.mask, r - 1, 0.0).sum(-1)), how + ": 1 + E_p[Σ_t (r_t − 1)]"),
        mean_r2=truth(expect(torch.where(t.mask, r * r, 0.0).sum(-1)), how + ", per-token r_t² summed"))


@lru_cache(maxsize=None)
def _trained(name: str) -> nn.Module:
    """A committed checkpoint in float64 (the ground truth is computed in float64)."""
    from .train import load_checkpoint

    return load_checkpoint(name)[0].double().eval()


@lru_cache(maxsize=None)
def _sources():
    from .train import bayesnet_source, hmm_source

    return bayesnet_source(), hmm_source()


def _bn(q: str):
    bn, _ = _sources()
    return BayesNetAR(bn), _trained(q)


def _shape_of(p, binary: bool) -> tuple[int, int]:
    """(length, vocab) of a model, read off its conditionals on one sequence."""
    if binary:
        return int(p.dim), 2
    inner = getattr(p, "model", p)
    length = inner.length if hasattr(inner, "length") else inner.config.block_size
    vocab = p.conditionals(torch.zeros(1, length, dtype=torch.long)).shape[-1]
    return int(length), int(vocab)


def _register(name: str, pair: Callable[[], tuple], tokens: str, eos: int | None, description: str) -> None:
    """Register a sequence case: ``pair()`` builds (p, q), ``tokens`` is "binary" or "tokens"; the case enumerates
    every sequence once, when first asked for."""
    def build() -> SequenceKLCase:
        p, q = pair()
        binary = tokens == "binary"
        length, vocab = _shape_of(p, binary)
        table = sequence_table(p, q, length, binary, vocab, eos)
        return SequenceKLCase(name, p, q, sequence_moments(table), description, DEFAULT_TAGS, length, binary, vocab,
                              eos, table)

    register_case(name, build, kind="sequence", tags=DEFAULT_TAGS, description=description)


_register("seq-bn-vs-fvsbn", lambda: _bn("fvsbn-bn"), "binary", None,
          "a known Bayesian network (the data source) ‖ the FVSBN trained on its samples: KL(data ‖ model)")
_register("seq-bn-vs-made", lambda: _bn("made-bn"), "binary", None,
          "the Bayesian network ‖ the MADE trained on its samples")
_register("seq-nade-vs-fvsbn-digits", lambda: (_trained("nade-digits"), _trained("fvsbn-digits")), "binary", None,
          "NADE ‖ FVSBN, both trained on binarized 4×4 scikit-learn digits: two model families as policy and "
          "reference")
_register("seq-nade-digits-steps", lambda: (_trained("nade-digits"), _trained("nade-digits@100")), "binary", None,
          "NADE on digits ‖ the same NADE early in training (a policy drifting from its reference)")
_register("seq-hmm-vs-transformer", lambda: (_sources()[1], _trained("transformer-hmm")), "tokens", None,
          "the hidden Markov source ‖ the transformer trained on its samples: KL(source ‖ model)")
_register("seq-transformer-steps", lambda: (_trained("transformer-hmm"), _trained("transformer-hmm@200")), "tokens",
          None, "the transformer ‖ itself early in training (policy ‖ reference, as in RLHF)")
_register("seq-transformer-temperature",
          lambda: (Tempered(_trained("transformer-hmm"), 0.7), _trained("transformer-hmm")), "tokens", None,
          "the transformer sampled at temperature 0.7 ‖ at temperature 1")
_register("seq-transformer-eos", lambda: (_trained("transformer-hmm"), _trained("transformer-hmm@200")), "tokens", 0,
          "as seq-transformer-steps, with token 0 ending a sequence: variable lengths, masked after the end")
_register("seq-transformer-top-k", lambda: (TopK(_trained("transformer-hmm"), 2), _trained("transformer-hmm")),
          "tokens", None,
          "the transformer truncated to its top-2 tokens ‖ untruncated: q has mass outside p's support")
