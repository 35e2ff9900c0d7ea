"""Ground truth: reference models with exact log-densities, exact KL with provenance, named cases."""
from .cases import KL_CASES, KLCase, case_names, get_case
from .distributions import Categorical, Gaussian, GaussianMixture, ReferenceModel, Uniform, top_k_logits, zipf_logits
from .truth import RatioMoments, Truth, exact_kl, ratio_moments

__all__ = ["KL_CASES", "KLCase", "case_names", "get_case", "Categorical", "Gaussian", "GaussianMixture",
           "ReferenceModel", "Uniform", "top_k_logits", "zipf_logits", "RatioMoments", "Truth", "exact_kl",
           "ratio_moments"]
from . import latent_cases  # noqa: E402,F401  (registers the model-based marginal cases)
