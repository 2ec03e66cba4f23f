"""The two-fold intra-neuronal analysis (Pichat et al. 2025): top-down categories, bottom-up segments."""

from intraneuron.analyses.two_fold.analysis import TwoFoldAnalysis

__all__ = ["TwoFoldAnalysis"]
