"""Universal neurons (Gurnee et al. 2024): cross-model activation correlation against a rotation
baseline, with the neurons' activation and weight statistics."""

from intraneuron.analyses.universal.analysis import UniversalAnalysis

__all__ = ["UniversalAnalysis"]
