"""Confidence regulation neurons (Stolfo et al. 2024): entropy neurons acting through the final norm
via the unembedding's null space, and token-frequency neurons."""

from intraneuron.analyses.confidence.analysis import ConfidenceAnalysis

__all__ = ["ConfidenceAnalysis"]
