"""Models: loading (packaged GGUF | local directory | hub id) and per-architecture site adapters."""

from intraneuron.models.adapters import (
    ADAPTERS,
    SITE_TEMPLATES,
    SUPPORTED,
    ArchitectureAdapter,
    Site,
    adapter_for,
)
from intraneuron.models.loading import DTYPES, PACKAGED, ModelHandle, load_model
from intraneuron.models.packaged import gpt2_tokenizer_dir, minilm_dir, smollm2_gguf

__all__ = [
    "ADAPTERS",
    "DTYPES",
    "PACKAGED",
    "SITE_TEMPLATES",
    "SUPPORTED",
    "ArchitectureAdapter",
    "ModelHandle",
    "Site",
    "adapter_for",
    "gpt2_tokenizer_dir",
    "load_model",
    "minilm_dir",
    "smollm2_gguf",
]
