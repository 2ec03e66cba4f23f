"""Streaming extraction: one forward pass over a corpus -> per-neuron activation profiles, cached."""

from intraneuron.extraction.engine import ExtractionSettings, extract_profiles
from intraneuron.extraction.profile import ActivationProfile

__all__ = ["ActivationProfile", "ExtractionSettings", "extract_profiles"]
