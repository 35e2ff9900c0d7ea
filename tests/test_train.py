"""Tests of the training recipes and the committed checkpoints: they load, match their metadata, are
normalized, are reproducible from their recipes, and are better than their initialization."""
from __future__ import annotations

import copy
import json
from dataclasses import asdict, replace

import pytest
import torch

from reference_models.autoregressive import BinaryAutoregressive
from reference_models.sources import HiddenMarkovModel
from reference_models.train import (BAYESNET_PARENTS, CHECKPOINT_DIR, CURVE_POINTS, RECIPES, Recipe, binarized_digits,
                                    bayesnet_source, build_model, checkpoint_names, fingerprint, get_recipe,
                                    hmm_source, kl_source_model, load_checkpoint, load_data, save_checkpoint, train,
                                    train_all)
from reference_models.transformer import CausalTransformer, all_sequences

NAMES = checkpoint_names()
BN_NAMES = [n for n in NAMES if get_recipe(n.split("@")[0]).data == "bayesnet"]


@pytest.fixture(scope="module")
def checkpoints():
    return {name: load_checkpoint(name) for name in NAMES}


@torch.no_grad()
def _nll(model, x) -> float:
    return float(-model.log_prob(x).double().mean())


# --- (a) committed checkpoints ---------------------------------------------------------------------------

def test_every_checkpoint_is_committed_and_small():
    files = [CHECKPOINT_DIR / f"{n}{ext}" for n in NAMES for ext in (".pt", ".json")]
    assert all(f.is_file() for f in files)
    assert sum(f.stat().st_size for f in files) < 2 ** 20


@pytest.mark.parametrize("name", NAMES)
def test_checkpoint_loads_and_matches_its_metadata(checkpoints, name):
    model, meta = checkpoints[name]
    recipe = get_recipe(name.split("@")[0])
    assert not model.training
    assert meta["name"] == name and meta["recipe"] == json.loads(json.dumps(asdict(recipe)))
    assert meta["step"] == (recipe.steps if "@" not in name else int(name.split("@")[1]))
    assert meta["num_parameters"] == model.num_parameters()
    assert fingerprint(model) == pytest.approx(meta["fingerprint"], rel=1e-12)
    assert 1 <= len(meta["loss_curve"]["loss"]) <= CURVE_POINTS and meta["loss_curve"]["step"][-1] == meta["step"]


@pytest.mark.parametrize("name", [n for n in NAMES if not n.startswith("transformer")])
def test_binary_checkpoints_are_normalized(checkpoints, name):
    model = checkpoints[name][0]
    assert isinstance(model, BinaryAutoregressive)
    with torch.no_grad():
        total = copy.deepcopy(model).double().log_prob(all_sequences(2, model.dim).double()).logsumexp(0).exp()
    assert float(total) == pytest.approx(1.0, abs=1e-9)


@pytest.mark.parametrize("name", [n for n in NAMES if n.startswith("transformer")])
def test_transformer_checkpoints_are_normalized_over_continuations(checkpoints, name):
    """Σ over all V^4 continuations of a 4-token prefix of p(x) equals p(prefix) from the conditionals."""
    model = checkpoints[name][0]
    assert isinstance(model, CausalTransformer)
    V, T = model.config.vocab_size, model.config.block_size
    prefixes = torch.randint(V, (3, T - 4), generator=torch.Generator().manual_seed(0))
    suffixes = all_sequences(V, 4)
    q = copy.deepcopy(model).double()
    with torch.no_grad():
        for prefix in prefixes:
            x = torch.cat([prefix.expand(len(suffixes), -1), suffixes], 1)
            log_prefix = q.conditionals(x[:1]).log_softmax(-1)[0, :T - 4].gather(1, prefix[:, None]).sum()
            torch.testing.assert_close(q.log_prob(x).logsumexp(0), log_prefix, rtol=0, atol=1e-10)


# --- (b) reproducibility -----------------------------------------------------------------------------------

@pytest.mark.parametrize("name", list(RECIPES))
def test_first_20_steps_reproduce_the_recorded_fingerprint(checkpoints, name):
    rng = torch.random.get_rng_state()
    model, history = train(replace(get_recipe(name), steps=20, snapshots=()), progress=False)
    assert torch.equal(torch.random.get_rng_state(), rng)  # the global RNG is neither used nor reseeded
    assert history.fingerprint_20 == fingerprint(model)
    assert history.fingerprint_20 == pytest.approx(checkpoints[name][1]["fingerprint_20"], rel=1e-6)


def test_full_rerun_reproduces_the_committed_checkpoint(checkpoints, tmp_path):
    recipe = get_recipe("fvsbn-bn")
    model, history = train(recipe, progress=False)
    committed, meta = checkpoints["fvsbn-bn"]
    for (key, a), (key_c, b) in zip(model.state_dict().items(), committed.state_dict().items()):
        assert key == key_c
        torch.testing.assert_close(a, b, rtol=0, atol=1e-5)
    assert history.step == recipe.steps and history.train_nll == pytest.approx(meta["train_nll"], abs=1e-5)
    save_checkpoint(model, recipe, history, tmp_path)
    reloaded, meta2 = load_checkpoint("fvsbn-bn", tmp_path)
    assert fingerprint(reloaded) == fingerprint(model)
    assert meta2["kl_source_model"] == pytest.approx(meta["kl_source_model"], abs=1e-5)


# --- (c) training helps --------------------------------------------------------------------------------------

@pytest.mark.parametrize("name", list(RECIPES))
def test_trained_model_beats_its_initialization_on_heldout_data(checkpoints, name):
    recipe = get_recipe(name)
    model, meta = checkpoints[name]
    _, heldout = load_data(recipe.data, recipe.n_train)
    assert _nll(model, heldout) == pytest.approx(meta["heldout_nll"], rel=1e-6)
    assert meta["heldout_nll"] < _nll(build_model(recipe), heldout) - 1.0
    assert meta["loss_curve"]["loss"][-1] < meta["loss_curve"]["loss"][0]


@pytest.mark.parametrize("name", BN_NAMES)
def test_exact_kl_from_the_bayesnet_source_decreases_from_init(checkpoints, name):
    model, meta = checkpoints[name]
    kl = kl_source_model(bayesnet_source(), model)
    assert kl == pytest.approx(meta["kl_source_model"], rel=1e-9)
    assert 0 < kl < kl_source_model(bayesnet_source(), build_model(get_recipe(name.split("@")[0])))


def test_exact_kl_from_the_sources_falls_along_training(checkpoints):
    """KL(source ‖ model) recorded for each snapshot decreases towards the final model; the transformer's
    final KL is below its initialization's (computed here, exactly)."""
    for recipe in RECIPES.values():
        if recipe.data == "digits" or not recipe.snapshots:
            continue
        names = [*(f"{recipe.name}@{s}" for s in recipe.snapshots), recipe.name]
        kls = [checkpoints[n][1]["kl_source_model"] for n in names]
        assert all(a > b > 0 for a, b in zip(kls, kls[1:])), (recipe.name, kls)
    final = checkpoints["transformer-hmm"][1]["kl_source_model"]
    assert final < kl_source_model(hmm_source(), build_model(get_recipe("transformer-hmm")))


def test_hmm_kl_by_the_chain_rule_matches_full_enumeration():
    """kl_source_model's HMM path (prefix enumeration, chain rule) against Σ_x p(x) log p(x)/q(x), on T = 4."""
    hmm = HiddenMarkovModel.random(3, 5, 4, seed=2)
    q = build_model(Recipe("t", "transformer", dict(vocab_size=5, block_size=4, d_model=8), "hmm", 1, 20, 1, 1.0, 0))
    x = all_sequences(5, 4)
    with torch.no_grad():
        log_p, log_q = hmm.log_prob(x), q.double().log_prob(x)
    expected = float((log_p.exp() * (log_p - log_q)).sum())
    assert kl_source_model(hmm, q) == pytest.approx(expected, rel=1e-10)
    with pytest.raises(ValueError, match="source"):
        kl_source_model(object(), q)


# --- data -----------------------------------------------------------------------------------------------------

def test_data_sets():
    x = binarized_digits()
    assert x.shape == (1797, 16) and set(x.unique().tolist()) == {0.0, 1.0}
    assert 0.3 < float(x.mean()) < 0.5
    train_x, heldout = load_data("digits", 1400)
    assert train_x.shape == (1400, 16) and heldout.shape == (397, 16)
    bn = bayesnet_source()
    assert bn.cards == (2,) * 14 and bn.parents == BAYESNET_PARENTS
    a, b = load_data("bayesnet", 100), load_data("bayesnet", 100)
    assert torch.equal(a[0], b[0]) and not torch.equal(a[0], a[1][:100])


# --- (d) bad input ---------------------------------------------------------------------------------------------

def test_bad_names_and_recipes_raise_value_error(tmp_path):
    for call in (lambda: get_recipe("gpt-9"), lambda: load_checkpoint("gpt-9"), lambda: load_checkpoint("nade-bn@7"),
                 lambda: train_all(["gpt-9"], directory=tmp_path)):
        with pytest.raises(ValueError, match="name"):
            call()
    base = dict(name="x", model="fvsbn", model_kwargs=dict(dim=16), data="digits", n_train=10, steps=20,
                batch_size=5, lr=0.1, seed=0)
    for field, value in (("model", "rnn"), ("data", "mnist"), ("steps", 5), ("batch_size", 0), ("lr", -1.0),
                         ("snapshots", (30,))):
        with pytest.raises(ValueError, match=field):
            Recipe(**{**base, field: value})
    with pytest.raises(ValueError, match="pool"):
        binarized_digits(pool=3)
    with pytest.raises(ValueError, match="n_train"):
        load_data("digits", 1797)
    assert not list(tmp_path.iterdir())
