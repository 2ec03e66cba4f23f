"""Streaming extraction: one forward pass over a corpus -> per-neuron activation profiles, cached.

Names load on first use (PEP 562), so `intraneuron.extraction.config` is importable without torch.
"""

from __future__ import annotations

from importlib import import_module
from typing import TYPE_CHECKING

_SOURCES = {
    "ExtractionConfig": "config",
    "ActivationProfile": "profile",
    "extract_profiles": "engine",
    "profile_key_fields": "engine",
    "ALL_STATS": "stats",
    "DEFAULT_STATS": "stats",
    "STAT_NAMES": "stats",
    "CombinedStat": "stats",
    "Stat": "reducers",
    "Patch": "patching",
    "PseudoNeurons": "pseudo",
    "PseudoReadIn": "pseudo",
    "pseudo_read_in": "pseudo",
    "patch_sites": "patching",
}

__all__ = [
    "ALL_STATS", "DEFAULT_STATS", "STAT_NAMES", "ActivationProfile", "CombinedStat", "ExtractionConfig", "Patch", "PseudoNeurons",
    "PseudoReadIn", "Stat", "extract_profiles", "patch_sites", "profile_key_fields", "pseudo_read_in",
]

if TYPE_CHECKING:
    from intraneuron.extraction.config import ExtractionConfig
    from intraneuron.extraction.engine import extract_profiles, profile_key_fields
    from intraneuron.extraction.patching import Patch, patch_sites
    from intraneuron.extraction.profile import ActivationProfile
    from intraneuron.extraction.pseudo import PseudoNeurons, PseudoReadIn, pseudo_read_in
    from intraneuron.extraction.reducers import Stat
    from intraneuron.extraction.stats import ALL_STATS, DEFAULT_STATS, STAT_NAMES, CombinedStat


def __getattr__(name: str):
    if name not in _SOURCES:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(import_module(f"{__name__}.{_SOURCES[name]}"), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted([*globals(), *_SOURCES])
