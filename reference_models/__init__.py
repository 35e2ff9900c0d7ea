"""Ground truth: reference models with exact log-densities, exact truths with provenance, named cases.

- KL cases (``get_case``): pairs of distributions with the exact KL(p‖q) and ratio moments;
- sequence cases (``get_sequence_case``): pairs of trained autoregressive models, every sequence enumerated;
- marginal-likelihood cases (``get_marginal_case``): log importance weights with the exact log p(x).
"""
from .autoregressive import FVSBN, MADE, NADE
from .bayesnet import DiscreteBayesNet
from .cases import KL_CASES, KLCase, case_names, get_case
from .distributions import Categorical, Gaussian, GaussianMixture, ReferenceModel, Uniform, top_k_logits, zipf_logits
from .latent import DiscreteLatent, GaussianClassConditional, LinearGaussian
from .marginal_cases import MarginalCase, get_marginal_case, marginal_case_names
from .sequence_cases import SequenceKLCase, get_sequence_case, sequence_case_names
from .sources import HiddenMarkovModel
from .transformer import CausalTransformer, TransformerConfig
from .truth import RatioMoments, Truth, exact_kl, ratio_moments

from . import latent_cases  # noqa: E402,F401  (registers the model-based marginal cases)

__all__ = ["KL_CASES", "KLCase", "case_names", "get_case", "Categorical", "Gaussian", "GaussianMixture",
           "ReferenceModel", "Uniform", "top_k_logits", "zipf_logits", "RatioMoments", "Truth", "exact_kl",
           "ratio_moments", "FVSBN", "NADE", "MADE", "CausalTransformer", "TransformerConfig", "HiddenMarkovModel",
           "DiscreteBayesNet", "LinearGaussian", "DiscreteLatent", "GaussianClassConditional", "MarginalCase",
           "get_marginal_case", "marginal_case_names", "SequenceKLCase", "get_sequence_case", "sequence_case_names"]
