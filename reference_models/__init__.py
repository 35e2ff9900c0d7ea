"""Ground truth: reference models with exact log-densities, exact truths with provenance, named cases.

Every case is registered in :mod:`reference_models.registry` (``case_names(kind=..., tag=...)``,
``get_case(name)``), of one kind:

- ``"kl"``: pairs of distributions with the exact KL(p‖q) and ratio moments (:class:`KLCase`);
- ``"sequence"``: pairs of trained autoregressive models, every sequence enumerated (:class:`SequenceKLCase`);
- ``"marginal"``: log importance weights with the exact log p(x) (:class:`MarginalCase`).

The modules that define the cases register them as they are imported below, so ``case_names()`` is
complete once ``reference_models`` is.
"""
from .autoregressive import FVSBN, MADE, NADE
from .bayesnet import DiscreteBayesNet
from .cases import KLCase, PairSample, RatioCase, register_kl_case
from .distributions import Categorical, Gaussian, GaussianMixture, ReferenceModel, Uniform, top_k_logits, zipf_logits
from .latent import DiscreteLatent, GaussianClassConditional, LinearGaussian
from .sequence_cases import SequenceKLCase, SequenceSample
from .marginal_cases import MarginalCase
from .latent_cases import discrete_case, linear_gaussian_case
from .gradient_cases import GradientCase, GradientSample  # after every released case of the other kinds
from .registry import KINDS, case_names, get_case, register_case
from .sources import HiddenMarkovModel
from .transformer import CausalTransformer, TransformerConfig
from .truth import RatioMoments, Truth, exact_kl, ratio_moments, register_truth

__all__ = ["GradientCase", "GradientSample", "KINDS", "case_names", "get_case", "register_case", "register_kl_case", "KLCase", "PairSample", "RatioCase", "SequenceKLCase",
           "SequenceSample", "MarginalCase", "discrete_case", "linear_gaussian_case", "Categorical", "Gaussian",
           "GaussianMixture", "ReferenceModel", "Uniform", "top_k_logits", "zipf_logits", "RatioMoments", "Truth",
           "exact_kl", "ratio_moments", "register_truth", "FVSBN", "NADE", "MADE", "CausalTransformer",
           "TransformerConfig", "HiddenMarkovModel", "DiscreteBayesNet", "LinearGaussian", "DiscreteLatent",
           "GaussianClassConditional"]
