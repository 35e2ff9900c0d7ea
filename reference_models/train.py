r"""Deterministic training recipes for the learned reference models, and their committed checkpoints.

Three data sets, each small enough that every model over it is exactly enumerable:

- ``digits``: scikit-learn's 8×8 digits (1797 images, intensities 0..16) mean-pooled over 2×2 blocks to
  4×4 = 16 pixels and binarized at 8 (a pixel is 1 when its block's mean intensity is ≥ 8, half the range;
  32.8 % ones). 2¹⁶ states. A fixed permutation (seed 0) holds out the last 397 images.
- ``bayesnet``: samples of a fixed 14-node binary Bayesian network (:func:`bayesnet_source`).
- ``hmm``: samples of a fixed HMM with 3 hidden states, 5 symbols, length 8 (:func:`hmm_source`); 5⁸ = 390625
  sequences.

A :class:`Recipe` fixes everything: model, data, steps, batch size, Adam's learning rate and weight decay,
and the seed. Training minimizes the NLL in nats per sequence, −mean log p(x), over minibatches drawn
with replacement by a ``torch.Generator`` seeded with ``recipe.seed``. Parameter initialization draws
from torch's global RNG (as ``torch.nn`` does), so the model is built inside ``torch.random.fork_rng()``
after ``torch.manual_seed(recipe.seed)``: the init is fixed by the recipe and the caller's global RNG is
left untouched. Training runs with ``torch.use_deterministic_algorithms(True)`` on one intra-op thread;
the same recipe on the same torch build gives the same parameters.

Checkpoints are ``NAME.pt`` (the state dict) and ``NAME.json`` (the recipe, metrics, a subsampled loss
curve, and the parameter fingerprint Σ|θ| in float64) in ``reference_models/checkpoints``. A recipe's
``snapshots`` are early steps saved as ``NAME@STEP``, e.g. a reference policy for the final model.
Retrain with ``python -m reference_models.train [NAME ...]``.
"""
from __future__ import annotations

import copy
import json
import math
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from torch import Tensor, nn
from tqdm.auto import tqdm

from ._validate import positive_int
from .autoregressive import FVSBN, MADE, NADE
from .bayesnet import DiscreteBayesNet
from .sources import HiddenMarkovModel
from .transformer import CausalTransformer, TransformerConfig, all_sequences

__all__ = ["Recipe", "History", "RECIPES", "binarized_digits", "bayesnet_source", "bayesnet_data", "hmm_source",
           "hmm_data", "load_data", "get_recipe", "build_model", "fingerprint", "kl_source_model", "evaluate",
           "train", "save_checkpoint", "load_checkpoint", "checkpoint_names", "train_all", "CHECKPOINT_DIR"]

CHECKPOINT_DIR = Path(__file__).parent / "checkpoints"
FINGERPRINT_STEPS = 20  # the reproducibility test re-runs this many steps
CURVE_POINTS = 200  # at most this many points of the loss curve go into the JSON
DIGITS_HELDOUT = 397
SOURCE_HELDOUT = 5000
TRAIN_SEED, HELDOUT_SEED = 1, 2  # sampling seeds of the synthetic sources' train and held-out sets
_ENUMERATION_BATCH = 2 ** 15


# --- data ----------------------------------------------------------------------------------------------

def binarized_digits(pool: int = 2) -> Tensor:
    """The 1797 scikit-learn digits, each 8×8 image mean-pooled over pool×pool blocks and thresholded:
    pixel = 1 iff the block's mean intensity (0..16) is ≥ 8. float32 [1797, (8/pool)²] of 0/1."""
    if pool not in (1, 2, 4, 8):
        raise ValueError(f"pool must divide 8 (1, 2, 4 or 8), got {pool!r}")
    from sklearn.datasets import load_digits

    images = torch.as_tensor(load_digits().data, dtype=torch.float64)
    side = 8 // pool
    pooled = images.reshape(-1, side, pool, side, pool).mean((2, 4)).reshape(-1, side * side)
    return (pooled >= 8).float()


# Node i's parents, a layered DAG in topological index order: roots 0-2; 3-6 see the roots; 7-10 see
# pairs of 3-6; 11-13 see pairs of 7-10 plus one long-range edge from a root (0 → 11, 1 → 13).
BAYESNET_PARENTS = ((), (), (), (0, 1), (1, 2), (0, 2), (2,), (3, 4), (4, 5), (5, 6), (3, 6),
                    (7, 8, 0), (8, 9), (9, 10, 1))


def bayesnet_source() -> DiscreteBayesNet:
    """The fixed 14-node binary network on :data:`BAYESNET_PARENTS`, CPT rows ~ Dirichlet(0.5, 0.5) (seed 4):
    a concentration below 1 makes most conditionals near-deterministic, so the structure matters."""
    return DiscreteBayesNet.random([2] * len(BAYESNET_PARENTS), BAYESNET_PARENTS, seed=4, concentration=0.5)


def bayesnet_data(n: int, seed: int) -> Tensor:
    """n ancestral samples of :func:`bayesnet_source`, LongTensor [n, 14] of 0/1."""
    return bayesnet_source().sample(n, torch.Generator().manual_seed(seed))


def hmm_source() -> HiddenMarkovModel:
    """The fixed HMM: ``HiddenMarkovModel.random(3, 5, 8, seed=2)`` (S=3 sticky states, V=5, T=8)."""
    return HiddenMarkovModel.random(3, 5, 8, seed=2)


def hmm_data(n: int, seed: int) -> Tensor:
    """n samples of :func:`hmm_source`, LongTensor [n, 8]."""
    return hmm_source().sample(n, torch.Generator().manual_seed(seed))


SOURCES = {"bayesnet": bayesnet_source, "hmm": hmm_source}  # data sets with an exact source distribution


def load_data(name: str, n_train: int) -> tuple[Tensor, Tensor]:
    """(train [n_train, ...], held-out) for a data set name: ``digits``, ``bayesnet`` or ``hmm``."""
    if name == "digits":
        x = binarized_digits()
        x = x[torch.randperm(len(x), generator=torch.Generator().manual_seed(0))]
        if not 1 <= n_train <= len(x) - DIGITS_HELDOUT:
            raise ValueError(f"n_train must be in [1, {len(x) - DIGITS_HELDOUT}] for digits, got {n_train}")
        return x[:n_train], x[-DIGITS_HELDOUT:]
    if name not in SOURCES:
        raise ValueError(f"data must be one of {['digits', *SOURCES]}, got {name!r}")
    sample = {"bayesnet": bayesnet_data, "hmm": hmm_data}[name]
    return sample(n_train, TRAIN_SEED), sample(SOURCE_HELDOUT, HELDOUT_SEED)


# --- recipes -------------------------------------------------------------------------------------------

def _transformer(**kwargs) -> CausalTransformer:
    return CausalTransformer(TransformerConfig(**kwargs))


MODELS = {"fvsbn": FVSBN, "nade": NADE, "made": MADE, "transformer": _transformer}


@dataclass(frozen=True)
class Recipe:
    """Everything that determines a trained model. ``model`` names a builder in ``MODELS`` called with
    ``model_kwargs``; ``snapshots`` are steps (< ``steps``) whose parameters are saved as ``NAME@STEP``."""

    name: str
    model: str
    model_kwargs: dict
    data: str
    n_train: int
    steps: int
    batch_size: int
    lr: float
    seed: int
    weight_decay: float = 0.0
    snapshots: tuple[int, ...] = ()

    def __post_init__(self):
        if self.model not in MODELS:
            raise ValueError(f"model must be one of {list(MODELS)}, got {self.model!r}")
        if self.data not in ("digits", *SOURCES):
            raise ValueError(f"data must be one of {['digits', *SOURCES]}, got {self.data!r}")
        for name in ("n_train", "steps", "batch_size"):
            positive_int(name, getattr(self, name))
        if self.steps < FINGERPRINT_STEPS:
            raise ValueError(f"steps must be >= {FINGERPRINT_STEPS}, got {self.steps}")
        if not (self.lr > 0 and self.weight_decay >= 0):
            raise ValueError(f"lr must be > 0 and weight_decay >= 0, got {self.lr!r} and {self.weight_decay!r}")
        if list(self.snapshots) != sorted(set(self.snapshots)) or not all(0 < s < self.steps for s in self.snapshots):
            raise ValueError(f"snapshots must be increasing steps in (0, {self.steps}), got {self.snapshots!r}")


_BINARY = dict(n_train=1400, batch_size=100, seed=0)
_BN = dict(data="bayesnet", n_train=20000, batch_size=200, seed=0)
RECIPES: dict[str, Recipe] = {r.name: r for r in (
    Recipe("fvsbn-digits", "fvsbn", dict(dim=16), "digits", steps=800, lr=2e-2, **_BINARY),
    Recipe("nade-digits", "nade", dict(dim=16, hidden=32), "digits", steps=1500, lr=1e-2, snapshots=(100,),
           **_BINARY),
    Recipe("made-digits", "made", dict(dim=16, hidden_sizes=[64, 64]), "digits", steps=1500, lr=3e-3,
           weight_decay=1e-4, **_BINARY),
    Recipe("fvsbn-bn", "fvsbn", dict(dim=14), steps=400, lr=3e-2, **_BN),
    Recipe("nade-bn", "nade", dict(dim=14, hidden=32), steps=1200, lr=1e-2, snapshots=(100,), **_BN),
    Recipe("made-bn", "made", dict(dim=14, hidden_sizes=[64, 64]), steps=1200, lr=3e-3, **_BN),
    Recipe("transformer-hmm", "transformer", dict(vocab_size=5, block_size=8, n_layer=2, n_head=2, d_model=32),
           "hmm", n_train=20000, steps=2000, batch_size=256, lr=2e-3, seed=0, snapshots=(50, 200)),
)}


def get_recipe(name: str) -> Recipe:
    """The registered recipe called ``name`` (ValueError naming the choices otherwise)."""
    if name not in RECIPES:
        raise ValueError(f"name must be one of {list(RECIPES)}, got {name!r}")
    return RECIPES[name]


def build_model(recipe: Recipe) -> nn.Module:
    """The recipe's model at initialization: built under ``fork_rng`` with ``torch.manual_seed(recipe.seed)``."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(recipe.seed)
        return MODELS[recipe.model](**recipe.model_kwargs)


def fingerprint(model: nn.Module) -> float:
    """Σ|θ| over all parameters, in float64."""
    return float(sum(p.detach().double().abs().sum() for p in model.parameters()))


# --- training ------------------------------------------------------------------------------------------

@dataclass
class History:
    """``loss[k]``: the minibatch NLL (nats per sequence) at step k+1; ``train_nll``: the NLL over the whole
    training set after ``step`` steps; ``fingerprint_20``: :func:`fingerprint` after 20 steps; ``snapshots``:
    (model, history) at each of the recipe's snapshot steps."""

    loss: list[float]
    train_nll: float
    fingerprint_20: float
    seconds: float
    snapshots: list[tuple[nn.Module, History]] = field(default_factory=list)

    @property
    def step(self) -> int:
        return len(self.loss)


@torch.no_grad()
def _nll(model: nn.Module, x: Tensor) -> float:
    """Mean −log p(x) in nats per sequence, accumulated in float64."""
    return float(-torch.cat([model.log_prob(c).double() for c in x.split(_ENUMERATION_BATCH)]).mean())


def train(recipe: Recipe, progress: bool = True) -> tuple[nn.Module, History]:
    """Train ``recipe`` with Adam on −mean log p(x) over seeded minibatches; the model is returned in eval mode."""
    deterministic, threads = torch.are_deterministic_algorithms_enabled(), torch.get_num_threads()
    torch.use_deterministic_algorithms(True)
    torch.set_num_threads(1)  # these models are tiny: one thread is fastest and independent of the core count
    try:
        start = time.perf_counter()
        x, _ = load_data(recipe.data, recipe.n_train)
        model = build_model(recipe).train()
        opt = torch.optim.Adam(model.parameters(), lr=recipe.lr, weight_decay=recipe.weight_decay)
        g = torch.Generator().manual_seed(recipe.seed)
        losses, snapshots, fp20 = [], [], math.nan
        bar = tqdm(range(1, recipe.steps + 1), desc=recipe.name, disable=not progress, leave=False)
        for step in bar:
            batch = x[torch.randint(len(x), (recipe.batch_size,), generator=g)]
            loss = -model.log_prob(batch).mean()
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            losses.append(loss.item())
            if step == FINGERPRINT_STEPS:
                fp20 = fingerprint(model)
            if step in recipe.snapshots:
                snap = copy.deepcopy(model).eval()
                snapshots.append((snap, History(list(losses), _nll(snap, x), fp20, time.perf_counter() - start)))
            if step % 50 == 0:
                bar.set_postfix(loss=f"{sum(losses[-50:]) / 50:.3f}")
        model.eval()
        return model, History(losses, _nll(model, x), fp20, time.perf_counter() - start, snapshots)
    finally:
        torch.use_deterministic_algorithms(deterministic)
        torch.set_num_threads(threads)


@torch.no_grad()
def kl_source_model(source: DiscreteBayesNet | HiddenMarkovModel, model: nn.Module) -> float:
    r"""KL(p ‖ q) in float64, exactly, for a source p (a Bayesian network or an HMM) and a model q of its samples.

    Bayesian network: :math:`\sum_x p(x)(\log p(x) - \log q(x))` over every joint state. HMM: the chain rule,
    :math:`\sum_t E_{x_{<t} \sim p} KL(p(\cdot \mid x_{<t}) \| q(\cdot \mid x_{<t}))`, summed over the V^{T-1}
    prefixes x_{<T} weighted by p(x_{<T}) (the last token is a placeholder that no conditional sees):
    V times fewer model evaluations than enumerating all V^T sequences."""
    q = copy.deepcopy(model).double()
    if isinstance(source, DiscreteBayesNet):
        x = source.enumerate_states()
        log_p = source.log_prob(x)
        log_q = torch.cat([q.log_prob(c) for c in x.split(_ENUMERATION_BATCH)])
        return float((log_p.exp() * (log_p - log_q)).sum())
    if not isinstance(source, HiddenMarkovModel):
        raise ValueError(f"source must be a DiscreteBayesNet or a HiddenMarkovModel, got {type(source).__name__}")
    prefixes = all_sequences(source.vocab_size, source.length - 1)
    x = torch.cat([prefixes, torch.zeros(len(prefixes), 1, dtype=torch.long)], 1)
    cond_p = source.conditionals(x)  # [N, T, V], normalized
    cond_q = torch.cat([q.conditionals(c) for c in x.split(_ENUMERATION_BATCH)]).log_softmax(-1)
    log_w = cond_p[:, :-1].gather(2, prefixes[:, :, None]).sum((1, 2))  # log p(x_<T)
    per_step = (cond_p.exp() * (cond_p - cond_q)).sum(-1)  # KL at each position given the prefix, [N, T]
    return float((log_w.exp() * per_step.sum(1)).sum())


def evaluate(model: nn.Module, recipe: Recipe) -> dict:
    """Held-out NLL (nats per sequence) and, for data with an exact source, :func:`kl_source_model`
    (``None`` for digits)."""
    _, heldout = load_data(recipe.data, recipe.n_train)
    kl = kl_source_model(SOURCES[recipe.data](), model) if recipe.data in SOURCES else None
    return {"heldout_nll": _nll(model, heldout), "kl_source_model": kl}


# --- checkpoints ---------------------------------------------------------------------------------------

def _curve(loss: list[float]) -> dict:
    """The loss averaged over ≤ CURVE_POINTS consecutive blocks of steps, each labelled by its last step."""
    k = max(1, math.ceil(len(loss) / CURVE_POINTS))
    blocks = [loss[i:i + k] for i in range(0, len(loss), k)]
    return {"step": [min(i + k, len(loss)) for i in range(0, len(loss), k)],
            "loss": [sum(b) / len(b) for b in blocks]}


def save_checkpoint(model: nn.Module, recipe: Recipe, history: History, directory: str | Path = CHECKPOINT_DIR) -> Path:
    """Write NAME.pt (state dict) and NAME.json (metadata) for the model after ``history.step`` steps; NAME is
    the recipe's name, with ``@STEP`` for a snapshot. Returns the .json path."""
    name = recipe.name if history.step == recipe.steps else f"{recipe.name}@{history.step}"
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    torch.save(model.state_dict(), directory / f"{name}.pt")
    meta = {"name": name, "step": history.step, "recipe": asdict(recipe), "num_parameters": model.num_parameters(),
            "fingerprint": fingerprint(model), "fingerprint_20": history.fingerprint_20,
            "train_nll": history.train_nll, **evaluate(model, recipe), "train_seconds": round(history.seconds, 2),
            "torch_version": torch.__version__, "loss_curve": _curve(history.loss)}
    path = directory / f"{name}.json"
    path.write_text(json.dumps(meta, indent=1) + "\n")
    return path


def checkpoint_names() -> list[str]:
    """Every checkpoint the recipes define: each recipe's name, then its ``NAME@STEP`` snapshots."""
    return [n for r in RECIPES.values() for n in (r.name, *(f"{r.name}@{s}" for s in r.snapshots))]


def load_checkpoint(name: str, directory: str | Path = CHECKPOINT_DIR) -> tuple[nn.Module, dict]:
    """(model in eval mode, its JSON metadata) for a name from :func:`checkpoint_names`."""
    if not isinstance(name, str) or name not in checkpoint_names():
        raise ValueError(f"name must be one of {checkpoint_names()}, got {name!r}")
    directory = Path(directory)
    meta = json.loads((directory / f"{name}.json").read_text())
    model = build_model(get_recipe(name.split("@")[0]))
    model.load_state_dict(torch.load(directory / f"{name}.pt", weights_only=True))
    return model.eval(), meta


def train_all(names: list[str] | None = None, directory: str | Path = CHECKPOINT_DIR,
              progress: bool = True) -> dict[str, dict]:
    """Train the named recipes (default: all) and save them and their snapshots; returns name → metadata."""
    recipes = [get_recipe(n) for n in (list(RECIPES) if names is None else names)]
    out = {}
    for recipe in recipes:
        model, history = train(recipe, progress)
        for m, h in [*history.snapshots, (model, history)]:
            meta = json.loads(save_checkpoint(m, recipe, h, directory).read_text())
            out[meta["name"]] = meta
            if progress:
                kl = meta["kl_source_model"]
                print(f"{meta['name']:>22}: train {meta['train_nll']:.4f}  held-out {meta['heldout_nll']:.4f}"
                      + ("" if kl is None else f"  KL(source‖model) {kl:.5f}") + f"  ({h.seconds:.1f} s)")
    return out


if __name__ == "__main__":
    train_all(sys.argv[1:] or None)
