"""Tests of the autoregressive reference models (FVSBN, NADE, MADE, the causal transformer).

Exactness is checked by enumeration: Σ_x exp(log p(x)) = 1 over every binary vector or token sequence.
The autoregressive property is checked twice: perturbing the inputs at and after step k leaves the
logits of step k unchanged, and the autograd Jacobian of the logits, permuted into the model's ordering,
is strictly lower triangular. Each chi-square test of samples against exp(log_prob) has false-alarm rate
α = 1e-3 (a fixed seed makes it deterministic); there are 5 of them, so a correct implementation fails
one with probability below 5e-3 under a fresh seed.
"""
from __future__ import annotations

import math

import pytest
import torch
from scipy import stats

from reference_models.autoregressive import FVSBN, MADE, NADE
from reference_models.transformer import CausalTransformer, TransformerConfig, all_sequences

ALPHA = 1e-3
BINARY = ["FVSBN", "NADE", "MADE", "MADE-ordered"]


def _binary(name: str, dim: int, seed: int = 0):
    """A binary model with every parameter redrawn N(0, 1), so no conditional is close to uniform."""
    torch.manual_seed(seed)
    ordering = torch.randperm(dim, generator=torch.Generator().manual_seed(seed)).tolist()
    model = {"FVSBN": lambda: FVSBN(dim), "NADE": lambda: NADE(dim, 7),
             "MADE": lambda: MADE(dim, [16, 16], seed=seed),
             "MADE-ordered": lambda: MADE(dim, [16, 16], ordering=ordering, seed=seed)}[name]()
    g = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=g))
    return model


def _transformer(vocab_size: int, block_size: int, seed: int = 0, **kwargs) -> CausalTransformer:
    torch.manual_seed(seed)
    return CausalTransformer(TransformerConfig(vocab_size, block_size, **kwargs))


def _chi_square_pvalue(samples: torch.Tensor, states: torch.Tensor, log_prob: torch.Tensor) -> float:
    """Pearson's chi-square of the counts of each enumerated state against n·exp(log_prob)."""
    match = (samples[:, None, :] == states[None, :, :]).all(-1)
    assert bool((match.sum(1) == 1).all()), "every sample is exactly one enumerated state"
    probs = log_prob.double().exp()
    expected = samples.shape[0] * probs / probs.sum()  # float32 log_prob: renormalize the rounding away
    return float(stats.chisquare(match.sum(0).double().numpy(), expected.numpy()).pvalue)


# --- enumeration helpers ---------------------------------------------------------------------------

def all_binary_states(dim: int) -> torch.Tensor:
    """Every binary vector of length ``dim`` in counting order, as the binary models take them."""
    return all_sequences(2, dim).float()


def test_all_sequences_lexicographic():
    seqs = all_sequences(3, 4)
    assert seqs.shape == (81, 4) and seqs.dtype == torch.int64
    assert seqs[0].tolist() == [0, 0, 0, 0] and seqs[5].tolist() == [0, 0, 1, 2] and seqs[-1].tolist() == [2] * 4
    assert seqs.unique(dim=0).shape == (81, 4)
    with pytest.raises(ValueError, match="vocab_size\\*\\*length"):
        all_sequences(10, 7)
    with pytest.raises(ValueError, match="length"):
        all_sequences(4, 0)


# --- binary models: autoregressive property --------------------------------------------------------

@pytest.mark.parametrize("name", BINARY)
def test_binary_logits_ignore_current_and_later_dimensions(name):
    dim, n = 8, 64
    model = _binary(name, dim)
    g = torch.Generator().manual_seed(5)
    x = torch.randint(0, 2, (n, dim), generator=g).float()
    logits = model.conditionals(x)
    for k, d in enumerate(model.ordering):
        later = list(model.ordering[k:])
        y = x.clone()
        y[:, later] = torch.randint(0, 2, (n, len(later)), generator=g).float()
        torch.testing.assert_close(model.conditionals(y)[:, d], logits[:, d], rtol=0, atol=1e-6)


@pytest.mark.parametrize("name", BINARY)
def test_binary_jacobian_is_strictly_lower_triangular_in_ordering(name):
    dim = 8
    model = _binary(name, dim)
    x = torch.randint(0, 2, (dim,), generator=torch.Generator().manual_seed(6)).float()
    jac = torch.autograd.functional.jacobian(lambda v: model.conditionals(v[None])[0], x)  # [d logit, d x]
    order = list(model.ordering)
    in_order = jac[order][:, order]
    assert bool((in_order.triu() == 0).all()), "a logit depends on its own or a later dimension"
    assert int((in_order.tril(-1) != 0).sum()) > dim, "the logits hardly depend on earlier dimensions"


def test_made_masks_are_fixed_by_seed_and_ordering_is_validated():
    masks = [[layer.mask for layer in MADE(6, [10, 10], seed=s).layers] for s in (4, 4, 5)]
    assert all(torch.equal(a, b) for a, b in zip(masks[0], masks[1]))
    assert not all(torch.equal(a, b) for a, b in zip(masks[0], masks[2]))
    for bad in ([0, 1, 2], [0, 0, 1, 2, 3, 4]):
        with pytest.raises(ValueError, match="ordering"):
            MADE(6, [10], ordering=bad)
    with pytest.raises(ValueError, match="dim"):
        MADE(1, [4])
    with pytest.raises(ValueError, match="hidden_sizes"):
        MADE(4, [8, 0])


# --- binary models: exact normalization ------------------------------------------------------------

@pytest.mark.parametrize("dim", [10, 16])
@pytest.mark.parametrize("name", BINARY)
def test_binary_log_prob_sums_to_one_over_all_states(name, dim):
    model = _binary(name, dim).double()
    with torch.no_grad():
        log_p = torch.cat([model.log_prob(chunk) for chunk in all_binary_states(dim).split(8192)])
    assert log_p.dtype == torch.float64
    assert float(log_p.exp().sum()) == pytest.approx(1.0, abs=1e-9)


def test_binary_log_prob_is_the_bernoulli_formula():
    model = _binary("NADE", 5)
    x = all_binary_states(5)
    logits = model.conditionals(x)
    expected = (x * logits - torch.nn.functional.softplus(logits)).sum(-1)
    torch.testing.assert_close(model.log_prob(x), expected)


# --- parameter counts --------------------------------------------------------------------------------

@pytest.mark.parametrize("dim", [1, 2, 7, 30])
def test_fvsbn_and_nade_parameter_formulas(dim):
    assert FVSBN(dim).num_parameters() == FVSBN.parameter_formula(dim) == dim * (dim + 1) // 2
    for hidden in (1, 5, 64):
        expected = 2 * dim * hidden + hidden + dim
        assert NADE(dim, hidden).num_parameters() == NADE.parameter_formula(dim, hidden) == expected


@pytest.mark.parametrize("hidden_sizes", [[], [5], [16, 9], [8, 8, 8]])
def test_made_parameter_formula_counts_masked_entries(hidden_sizes):
    assert MADE(7, hidden_sizes).num_parameters() == MADE.parameter_formula(7, hidden_sizes)


@pytest.mark.parametrize("kwargs", [dict(vocab_size=6, block_size=6), dict(vocab_size=50, block_size=9, n_layer=3,
                                                                            n_head=4, d_model=48)])
def test_transformer_parameter_formula(kwargs):
    config = TransformerConfig(**kwargs)
    assert CausalTransformer(config).num_parameters() == CausalTransformer.parameter_formula(config)


# --- NADE: cached activations -------------------------------------------------------------------------

def test_nade_cached_matches_naive():
    torch.manual_seed(0)
    model = NADE(64, 256)
    x = torch.randint(0, 2, (128, 64), generator=torch.Generator().manual_seed(1)).float()
    torch.testing.assert_close(model.conditionals(x), model.conditionals_naive(x), rtol=0, atol=1e-5)


# --- binary models: sampling --------------------------------------------------------------------------

@pytest.mark.parametrize("name", BINARY)
def test_binary_samples_shape_dtype_and_seed(name):
    model = _binary(name, 6)
    a = model.sample(9, torch.Generator().manual_seed(3))
    assert a.shape == (9, 6) and a.dtype == torch.float32 and bool(((a == 0) | (a == 1)).all())
    assert torch.equal(a, model.sample(9, torch.Generator().manual_seed(3)))
    assert model.double().sample(2, torch.Generator().manual_seed(3)).dtype == torch.float64


@pytest.mark.parametrize("name", BINARY)
def test_binary_sample_frequencies_match_log_prob(name):
    model = _binary(name, 4, seed=2)
    states = all_binary_states(4)
    with torch.no_grad():
        log_p = model.log_prob(states)
    samples = model.sample(20_000, torch.Generator().manual_seed(11))
    assert _chi_square_pvalue(samples, states, log_p) > ALPHA


# --- binary models: bad input ---------------------------------------------------------------------------

@pytest.mark.parametrize("name", BINARY)
def test_binary_bad_input_raises(name):
    model = _binary(name, 4)
    with pytest.raises(ValueError, match="x must have shape"):
        model.log_prob(torch.zeros(3, 5))
    with pytest.raises(ValueError, match="0s and 1s"):
        model.log_prob(torch.full((3, 4), 0.5))
    with pytest.raises(ValueError, match="torch.Tensor"):
        model.conditionals([[0, 1, 0, 1]])
    with pytest.raises(ValueError, match="n must"):
        model.sample(0)


def test_binary_constructor_arguments_are_validated():
    with pytest.raises(ValueError, match="dim"):
        FVSBN(0)
    with pytest.raises(ValueError, match="hidden"):
        NADE(4, 0)


# --- transformer ------------------------------------------------------------------------------------------

def test_transformer_config_is_validated():
    for kwargs, arg in [(dict(vocab_size=0), "vocab_size"), (dict(block_size=-1), "block_size"),
                        (dict(d_model=30, n_head=4), "d_model"), (dict(init="xavier"), "init")]:
        with pytest.raises(ValueError, match=arg):
            TransformerConfig(**{"vocab_size": 5, "block_size": 4, **kwargs})


def test_transformer_logits_ignore_current_and_later_tokens():
    V, T, n = 7, 6, 32
    model = _transformer(V, T)
    g = torch.Generator().manual_seed(2)
    x = torch.randint(0, V, (n, T), generator=g)
    logits = model.conditionals(x)
    assert logits.shape == (n, T, V)
    for t in range(T):
        y = x.clone()
        y[:, t:] = torch.randint(0, V, (n, T - t), generator=g)
        torch.testing.assert_close(model.conditionals(y)[:, t], logits[:, t], rtol=0, atol=1e-5)


def test_transformer_jacobian_wrt_inputs_is_causal():
    """Input position s carries x_{s-1} (BOS at s = 0) plus the position embedding p_s, so ∂ℓ_t/∂p_s is
    the Jacobian with respect to the input at s: it must vanish for s > t (the tokens x_t, x_t+1, …)."""
    V, T = 7, 6
    model = _transformer(V, T)
    x = torch.randint(0, V, (4, T), generator=torch.Generator().manual_seed(3))
    logits = model.conditionals(x)
    for t in range(T):
        (grad,) = torch.autograd.grad(logits[:, t].sum(), model.pos_emb, retain_graph=True)
        assert bool((grad[t + 1:] == 0).all()), f"logits at {t} depend on later inputs"
        assert bool((grad[:t + 1].abs().sum(-1) > 0).all()), f"logits at {t} ignore an earlier input"


@pytest.mark.parametrize("V, T, kwargs", [(6, 6, dict(n_layer=1, d_model=16)), (10, 4, dict())])
def test_transformer_log_prob_sums_to_one_over_all_sequences(V, T, kwargs):
    model = _transformer(V, T, **kwargs).double()
    with torch.no_grad():
        log_p = torch.cat([model.log_prob(chunk) for chunk in all_sequences(V, T).split(16384)])
    assert log_p.dtype == torch.float64 and log_p.shape == (V ** T,)
    assert float(log_p.exp().sum()) == pytest.approx(1.0, abs=1e-9)


def test_transformer_samples_shape_seed_and_frequencies():
    V, T = 3, 3
    model = _transformer(V, T, d_model=8, n_head=2, seed=4)
    samples = model.sample(20_000, torch.Generator().manual_seed(12))
    assert samples.shape == (20_000, T) and samples.dtype == torch.int64
    assert torch.equal(*(model.sample(50, torch.Generator().manual_seed(1)) for _ in range(2)))
    states = all_sequences(V, T)
    with torch.no_grad():
        log_p = model.log_prob(states)
    assert _chi_square_pvalue(samples, states, log_p) > ALPHA


def test_transformer_low_temperature_is_greedy():
    model = _transformer(5, 4)
    cold = model.sample(20, torch.Generator().manual_seed(0), temperature=1e-4)
    greedy = torch.zeros(1, 4, dtype=torch.long)
    with torch.no_grad():
        for t in range(4):
            greedy[0, t] = model.conditionals(greedy)[0, t].argmax()
    assert torch.equal(cold, greedy.expand(20, 4))


def test_transformer_bad_input_raises():
    model = _transformer(5, 4)
    with pytest.raises(ValueError, match="integer token ids"):
        model.log_prob(torch.zeros(2, 4))
    with pytest.raises(ValueError, match="outside"):
        model.log_prob(torch.full((2, 4), 5))
    with pytest.raises(ValueError, match="x must have shape"):
        model.log_prob(torch.zeros(2, 3, dtype=torch.long))
    with pytest.raises(ValueError, match="temperature"):
        model.sample(2, temperature=0.0)
    with pytest.raises(ValueError, match="n must"):
        model.sample(-1)


def test_transformer_initial_loss_scaled_vs_unit_init():
    """The course notes' bug, on uniform random tokens with V = 64, d = 128: embedding (and tied head) std
    d^-½ gives an initial loss ≈ ln V; std 1 makes the head score the previous token's own embedding at
    ‖E‖² ≈ d, a peaked wrong softmax and a loss ≈ d (deterministic: fixed tokens, seeded init)."""
    V, T = 64, 16
    x = torch.randint(0, V, (512, T), generator=torch.Generator().manual_seed(0))
    losses = {}
    for init in ("scaled", "unit"):
        model = _transformer(V, T, n_head=4, d_model=128, init=init)
        with torch.no_grad():
            nll = -torch.distributions.Categorical(logits=model.conditionals(x)).log_prob(x)
        losses[init] = float(nll.mean())
    print(f"ln V = {math.log(V):.3f}; initial loss per token: {losses}")
    assert abs(losses["scaled"] - math.log(V)) < 0.3
    assert losses["unit"] > math.log(V) + 50
