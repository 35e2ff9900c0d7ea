r"""Discrete Bayesian networks: categorical variables on a DAG with conditional probability tables (CPTs).

:math:`p(x) = \prod_i p(x_i \mid x_{\mathrm{pa}(i)})`. Exact log-mass of full assignments, ancestral
sampling, exact marginals by variable elimination (one ``torch.einsum``, contraction path by opt_einsum),
enumeration of the joint (exact KL by summation), and a latent-variable view that splits the nodes into
observed x and hidden z with exact p(x, z), p(x), p(z | x) and p(z).

Free-parameter counts (seed 000, Q3), n variables, K_i outcomes each:

- a joint table with no independence assumed: :math:`\prod_i K_i - 1`;
- mutually independent variables: :math:`\sum_i (K_i - 1)`;
- a network: :math:`\sum_i (K_i - 1) \prod_{j \in \mathrm{pa}(i)} K_j` (K_i − 1 free entries per parent state);
- an order-m Markov chain, K outcomes each, n > m: :math:`(K^m - 1) + (n - m)(K - 1)K^m`. The first m
  variables form an unrestricted joint, :math:`\sum_{i \le m} (K - 1)K^{i-1} = K^m - 1` (telescoping the
  seed's first sum); each of the n − m later variables has m parents, so K^m rows of K − 1 free entries.
  m = 0 gives the independent count, m = n − 1 the full joint.
"""
from __future__ import annotations

import math
from numbers import Integral
from typing import Sequence

import torch
from torch import Tensor
from torch.distributions import Categorical

from ._validate import positive_int
from .distributions import ReferenceModel

__all__ = ["DiscreteBayesNet", "full_joint_parameters", "independent_parameters", "markov_chain_parameters",
           "parameter_table"]

MAX_STATES = 2 ** 22  # largest enumeration (joint states or hidden configurations) we build
_TOL = 1e-9  # CPT rows must sum to 1 within this


def _is_int(k) -> bool:
    return isinstance(k, Integral) and not isinstance(k, bool)


def _check_cards(cards) -> tuple[int, ...]:
    cards = tuple(cards)
    if not cards or not all(_is_int(k) and k >= 2 for k in cards):
        raise ValueError(f"cards must be a non-empty sequence of ints >= 2, got {cards!r}")
    return tuple(int(k) for k in cards)


def _check_chain(length, card, order) -> None:
    positive_int("length", length)
    positive_int("card", card, minimum=2)
    if not (_is_int(order) and 0 <= order < length):
        raise ValueError(f"order must be an int in [0, length) = [0, {length}), got {order!r}")


def _check_parents(parents, n: int) -> tuple[tuple[int, ...], ...]:
    parents = tuple(tuple(ps) for ps in parents)
    if len(parents) != n:
        raise ValueError(f"parents must give one sequence per node ({n}), got {len(parents)}")
    for i, ps in enumerate(parents):
        if not all(_is_int(p) and 0 <= p < n and p != i for p in ps) or len(set(ps)) != len(ps):
            raise ValueError(f"parents[{i}] must be distinct node indices in [0, {n}) other than {i}, got {ps!r}")
    return tuple(tuple(int(p) for p in ps) for ps in parents)


def _topological_order(parents: tuple[tuple[int, ...], ...]) -> tuple[int, ...]:
    order, placed = [], set()
    while len(order) < len(parents):
        ready = [i for i, ps in enumerate(parents) if i not in placed and placed.issuperset(ps)]
        if not ready:
            stuck = sorted(set(range(len(parents))) - placed)
            raise ValueError(f"parents must describe an acyclic graph; nodes {stuck} lie on or below a cycle")
        order += ready
        placed.update(ready)
    return tuple(order)


def _strides(cards: Sequence[int]) -> Tensor:
    """C-order strides: the last variable varies fastest."""
    return torch.tensor([math.prod(cards[j + 1:]) for j in range(len(cards))], dtype=torch.long)


def _enumerate(cards: Sequence[int]) -> Tensor:
    """All joint states of variables with these cardinalities, [∏K, len(cards)], in C order."""
    total = math.prod(cards)
    if total > MAX_STATES:
        raise ValueError(f"{total:,} states exceed the enumeration limit of {MAX_STATES:,}")
    return torch.arange(total)[:, None] // _strides(cards) % torch.tensor(cards, dtype=torch.long)


def full_joint_parameters(cards: Sequence[int]) -> int:
    """∏K_i − 1: a full joint table (one normalization constraint)."""
    return math.prod(_check_cards(cards)) - 1


def independent_parameters(cards: Sequence[int]) -> int:
    """Σ(K_i − 1): mutually independent variables."""
    return sum(k - 1 for k in _check_cards(cards))


def markov_chain_parameters(length: int, card: int, order: int) -> int:
    """(K^m − 1) + (n − m)(K − 1)K^m for an order-m chain of n variables with K outcomes (0 <= m < n)."""
    _check_chain(length, card, order)
    return card ** order - 1 + (length - order) * (card - 1) * card ** order


def parameter_table(length: int = 10, card: int = 2, order: int = 2):
    """The seed's worked examples (Q3 A, B, C) for n = length variables of K = card outcomes, as a
    DataFrame with columns example, formula, count."""
    import pandas as pd

    _check_chain(length, card, order)
    cards = [card] * length
    n, k, m = length, card, order
    return pd.DataFrame([
        (f"(A) joint of n={n} variables, K={k}, no independence", "∏K_i − 1", full_joint_parameters(cards)),
        (f"(B) n={n} mutually independent variables, K={k}", "Σ(K_i − 1)", independent_parameters(cards)),
        (f"(C) order-{m} Markov chain, n={n}, K={k}", "(K^m − 1) + (n − m)(K − 1)K^m",
         markov_chain_parameters(length, card, order)),
    ], columns=["example", "formula", "count"])


class DiscreteBayesNet(ReferenceModel):
    """A DAG over categorical nodes: node i takes values in [0, cards[i]), has parents ``parents[i]`` (any
    node order; a topological one is computed) and CPT ``cpts[i]`` of shape ``[*cards[parents[i]], cards[i]]``,
    p(x_i | x_pa(i)) along the last axis (float64, rows renormalized after a 1e-9 sum check).

    ``hidden`` names the latent nodes z of the latent-variable view; the rest, in index order, are the
    observed x (``self.observed``); z columns follow the order of ``hidden``.
    """

    def __init__(self, cards: Sequence[int], parents: Sequence[Sequence[int]], cpts: Sequence[Tensor],
                 names: Sequence[str] | None = None, hidden: Sequence[int] = ()):
        self.cards = _check_cards(cards)
        n = len(self.cards)
        self.parents = _check_parents(parents, n)
        self.order = _topological_order(self.parents)
        if len(cpts) != n:
            raise ValueError(f"cpts must give one table per node ({n}), got {len(cpts)}")
        tables = []
        for i, cpt in enumerate(cpts):
            t = torch.as_tensor(cpt, dtype=torch.float64)
            shape = tuple(self.cards[p] for p in self.parents[i]) + (self.cards[i],)
            if tuple(t.shape) != shape:
                raise ValueError(f"cpts[{i}] must have shape {shape} (cards of parents {self.parents[i]}, then "
                                 f"cards[{i}]), got {tuple(t.shape)}")
            if not bool(torch.isfinite(t).all()) or bool((t < 0).any()):
                raise ValueError(f"cpts[{i}] must hold finite probabilities >= 0")
            if bool(((t.sum(-1) - 1).abs() > _TOL).any()):
                raise ValueError(f"cpts[{i}] must sum to 1 along its last axis within {_TOL:g} (a float64 table; "
                                 f"got {getattr(cpt, 'dtype', type(cpt).__name__)})")
            tables.append(t / t.sum(-1, keepdim=True))
        self.cpts = tuple(tables)
        names = tuple(f"X{i}" for i in range(n)) if names is None else tuple(names)
        if len(names) != n or len(set(names)) != n or not all(isinstance(s, str) for s in names):
            raise ValueError(f"names must be {n} distinct strings, got {names!r}")
        self.names = names
        self.hidden = self._check_nodes(hidden, "hidden")
        self.observed = tuple(i for i in range(n) if i not in self.hidden)
        if not self.observed:
            raise ValueError("hidden must leave at least one node observed")
        self._card_tensor = torch.tensor(self.cards, dtype=torch.long)
        self._parent_index = [torch.tensor(ps, dtype=torch.long) for ps in self.parents]
        self._parent_stride = [_strides([self.cards[p] for p in ps]) for ps in self.parents]
        rows = [t.reshape(-1, t.shape[-1]) for t in self.cpts]  # [∏K_parents, K_i]
        self._log_rows = [r.log() for r in rows]
        cum = [r.cumsum(-1) for r in rows]
        self._cdfs = [c / c[:, -1:] for c in cum]  # last entry exactly 1

    # --- constructors ---------------------------------------------------------------------------------

    @classmethod
    def random(cls, cards: Sequence[int], parents: Sequence[Sequence[int]], seed: int,
               concentration: float = 1.0, **kwargs) -> "DiscreteBayesNet":
        """CPT rows drawn iid from Dirichlet(concentration·1) with a generator seeded by ``seed``;
        ``kwargs`` (names, hidden) go to the constructor."""
        cards = _check_cards(cards)
        parents = _check_parents(parents, len(cards))
        if not (isinstance(concentration, (int, float)) and math.isfinite(concentration) and concentration > 0):
            raise ValueError(f"concentration must be a finite number > 0, got {concentration!r}")
        g = torch.Generator().manual_seed(seed)
        cpts = []
        for i, ps in enumerate(parents):
            alpha = torch.full([*(cards[p] for p in ps), cards[i]], float(concentration), dtype=torch.float64)
            gamma = torch._standard_gamma(alpha, generator=g)  # Dirichlet = normalized Gamma(α, 1) draws
            cpts.append(gamma / gamma.sum(-1, keepdim=True))
        return cls(cards, parents, cpts, **kwargs)

    @classmethod
    def markov_chain(cls, length: int, card: int, order: int, seed: int, concentration: float = 1.0,
                     **kwargs) -> "DiscreteBayesNet":
        """An order-m chain X_0 → … → X_{n-1}: node i's parents are X_{max(0, i−m)}, …, X_{i−1};
        random Dirichlet CPTs as in :meth:`random`."""
        _check_chain(length, card, order)
        parents = [tuple(range(max(0, i - order), i)) for i in range(length)]
        return cls.random([card] * length, parents, seed, concentration, **kwargs)

    # --- the reference-model contract ------------------------------------------------------------------

    @property
    def event_shape(self) -> torch.Size:
        return torch.Size([len(self.cards)])

    @property
    def dtype(self) -> torch.dtype:
        return torch.float64

    @property
    def device(self) -> torch.device:
        return self.cpts[0].device

    def num_parameters(self) -> int:
        """Σ_i (K_i − 1)·∏_{j ∈ pa(i)} K_j."""
        return sum((self.cards[i] - 1) * math.prod(self.cards[p] for p in ps) for i, ps in enumerate(self.parents))

    def _sample(self, n, generator):
        """Ancestral sampling: inverse CDF of each node's CPT row given its sampled parents."""
        u = torch.rand((len(self.cards), n, 1), generator=generator, dtype=torch.float64)
        x = torch.zeros(n, len(self.cards), dtype=torch.long)
        for i in self.order:
            x[:, i] = torch.searchsorted(self._cdfs[i][self._row(x, i)], u[i], right=True)[:, 0]
        return x

    def _row(self, x: Tensor, i: int) -> Tensor:
        """Index of node i's CPT row selected by the parent values in full assignments x[..., N]."""
        return (x[..., self._parent_index[i]] * self._parent_stride[i]).sum(-1)

    def _log_joint(self, x: Tensor) -> Tensor:
        """Σ_i log p(x_i | x_pa(i)) for full assignments x[..., N] -> [...]."""
        return sum(self._log_rows[i][self._row(x, i), x[..., i]] for i in range(len(self.cards)))

    def log_prob(self, x: Tensor) -> Tensor:
        """Exact log p(x) of full assignments x[n, N] -> [n]."""
        x = self._check_values(x, range(len(self.cards)), "x")
        if x.dim() != 2:
            raise ValueError(f"x must have shape [n, {len(self.cards)}], got {tuple(x.shape)}")
        return self._log_joint(x)

    def enumerate_states(self) -> Tensor:
        """All ∏K_i joint states, LongTensor [∏K_i, N], last node fastest (ValueError beyond 2**22)."""
        return _enumerate(self.cards)

    def joint_table(self) -> Tensor:
        """p(x) for every joint state, float64 [*cards]; its flattening matches :meth:`enumerate_states`."""
        return self.log_prob(self.enumerate_states()).exp().reshape(self.cards)

    # --- marginals by variable elimination -------------------------------------------------------------

    def marginal(self, observed: Sequence[int]) -> Tensor:
        """Exact p(x_observed), float64 [*cards[observed]], axes in the given order: Σ over the other nodes
        of ∏ CPTs."""
        observed = self._check_nodes(observed, "observed")
        if not observed:
            raise ValueError("observed must name at least one node")
        return self._eliminate(observed, ())

    def log_marginal(self, x_obs: Tensor, observed: Sequence[int] | None = None) -> Tensor:
        """Exact log p(x_obs) for values x_obs[..., |observed|] of the nodes ``observed`` (default: the
        non-hidden nodes) -> [...]. Evaluated in float64 probability space (exact unless p < 1e-300)."""
        nodes = self.observed if observed is None else self._check_nodes(observed, "observed")
        x = self._check_values(x_obs, nodes, "x_obs")
        flat = x.reshape(-1, len(nodes))
        p = self._eliminate((), [(node, flat[:, k]) for k, node in enumerate(nodes)])
        return p.log().reshape(x.shape[:-1])

    def _eliminate(self, keep: tuple[int, ...], evidence) -> Tensor:
        """Σ over all nodes but ``keep`` of ∏_i p(x_i | x_pa(i)) with the ``evidence`` nodes clamped, as one
        einsum over the ancestors of keep ∪ evidence (descendants sum out to 1). Evidence is (node, values[B])
        pairs, entered as one-hot factors sharing a batch index B, which then leads the output."""
        needed = self._ancestors(list(keep) + [node for node, _ in evidence])
        if len(needed) >= 52:  # torch.einsum's sublist format allows 52 distinct indices
            raise ValueError(f"variable elimination over {len(needed)} ancestral nodes exceeds einsum's 51")
        label = {node: k for k, node in enumerate(needed)}
        batch = len(needed)
        ops = []
        for i in needed:
            ops += [self.cpts[i], [label[p] for p in self.parents[i]] + [label[i]]]
        for node, values in evidence:
            ops += [torch.nn.functional.one_hot(values, self.cards[node]).double(), [batch, label[node]]]
        return torch.einsum(*ops, ([batch] if evidence else []) + [label[k] for k in keep])

    def _ancestors(self, nodes: list[int]) -> list[int]:
        """nodes and all their ancestors, in topological order."""
        found, stack = set(), list(nodes)
        while stack:
            i = stack.pop()
            if i not in found:
                found.add(i)
                stack.extend(self.parents[i])
        return [i for i in self.order if i in found]

    # --- latent-variable view: x = observed nodes, z = hidden nodes ------------------------------------

    def hidden_states(self) -> Tensor:
        """All hidden configurations, LongTensor [H, |hidden|]; index j of :meth:`posterior` and
        :meth:`prior_over_hidden` is configuration ``hidden_states()[j]``."""
        return _enumerate([self.cards[h] for h in self.hidden])

    def log_joint(self, x_obs: Tensor, z_hidden: Tensor) -> Tensor:
        """log p(x, z), broadcasting leading dims: x[..., |observed|], z[..., |hidden|] -> [...]
        (e.g. x [B, 1, |obs|] and z [B, K, |hid|] -> [B, K])."""
        x = self._check_values(x_obs, self.observed, "x_obs")
        z = self._check_values(z_hidden, self.hidden, "z_hidden")
        try:
            lead = torch.broadcast_shapes(x.shape[:-1], z.shape[:-1])
        except RuntimeError as err:
            raise ValueError(f"x_obs {tuple(x.shape)} and z_hidden {tuple(z.shape)} have leading dims that do "
                             f"not broadcast") from err
        full = torch.empty(*lead, len(self.cards), dtype=torch.long)
        full[..., list(self.observed)] = x.expand(*lead, -1)
        full[..., list(self.hidden)] = z.expand(*lead, -1)
        return self._log_joint(full)

    def posterior(self, x_obs: Tensor) -> Categorical:
        """p(z | x) over :meth:`hidden_states`, batch shape x_obs.shape[:-1]: softmax_j log p(x, z_j)."""
        x = self._check_values(x_obs, self.observed, "x_obs")
        logits = self.log_joint(x[..., None, :], self.hidden_states())
        if bool((torch.logsumexp(logits, -1) == -math.inf).any()):
            raise ValueError("x_obs holds observations of probability zero; their posterior is undefined")
        return Categorical(logits=logits, validate_args=False)

    def prior_over_hidden(self) -> Categorical:
        """p(z), the hidden nodes' marginal, over :meth:`hidden_states`."""
        probs = self.marginal(self.hidden).reshape(-1) if self.hidden else torch.ones(1, dtype=torch.float64)
        return Categorical(probs=probs, validate_args=False)

    # --- validation, conversion -------------------------------------------------------------------------

    def _check_nodes(self, nodes, name: str) -> tuple[int, ...]:
        nodes, n = tuple(nodes), len(self.cards)
        if not all(_is_int(i) and 0 <= i < n for i in nodes) or len(set(nodes)) != len(nodes):
            raise ValueError(f"{name} must be distinct node indices in [0, {n}), got {nodes!r}")
        return tuple(int(i) for i in nodes)

    def _check_values(self, x, nodes, name: str) -> Tensor:
        nodes = list(nodes)
        if not isinstance(x, Tensor) or x.is_floating_point() or x.is_complex():
            raise ValueError(f"{name} must be an integer tensor, got {getattr(x, 'dtype', type(x).__name__)}")
        if x.dim() < 1 or x.shape[-1] != len(nodes):
            raise ValueError(f"{name} must have last dimension {len(nodes)} (nodes {nodes}), got {tuple(x.shape)}")
        x = x.long()
        if x.numel() and bool(((x < 0) | (x >= self._card_tensor[nodes])).any()):
            raise ValueError(f"{name} holds values outside [0, K_i) for nodes {nodes}")
        return x

    def to_pgmpy(self):
        """The same network as a pgmpy ``DiscreteBayesianNetwork`` with ``TabularCPD``s (needs pgmpy >= 1.0;
        states are 0..K_i−1, nodes named by ``self.names``)."""
        from pgmpy.factors.discrete import TabularCPD
        from pgmpy.models import DiscreteBayesianNetwork

        model = DiscreteBayesianNetwork([(self.names[p], self.names[i]) for i in self.order for p in self.parents[i]])
        model.add_nodes_from(self.names)
        for i, ps in enumerate(self.parents):
            # pgmpy wants values [K_i, ∏K_parents], columns in C order over the evidence (last fastest)
            model.add_cpds(TabularCPD(self.names[i], self.cards[i], self.cpts[i].reshape(-1, self.cards[i]).T.numpy(),
                                      evidence=[self.names[p] for p in ps] or None,
                                      evidence_card=[self.cards[p] for p in ps] or None))
        model.check_model()
        return model

    def describe(self) -> str:
        edges = sum(map(len, self.parents))
        hidden = f", {len(self.hidden)} hidden" if self.hidden else ""
        return f"{len(self.cards)} nodes, {edges} edges{hidden}, {self.num_parameters()} free parameters"
