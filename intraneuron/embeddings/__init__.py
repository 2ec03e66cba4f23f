"""Vectors for core tokens: static checkpoint embeddings, the model's own, or the layer's input."""

from intraneuron.embeddings.sources import (
    MULTI_TOKEN_POLICIES,
    SOURCE_KINDS,
    EmbeddingSource,
    LayerInputEmbeddings,
    ModelEmbeddings,
    StaticEmbeddings,
    embedding_source_from_config,
)
from intraneuron.embeddings.static import KNOWN_EMBEDDING_TENSORS, load_embedding_matrix
from intraneuron.embeddings.token_mapping import TokenMapping, map_tokens, tokenizer_fingerprint

__all__ = [
    "KNOWN_EMBEDDING_TENSORS",
    "MULTI_TOKEN_POLICIES",
    "SOURCE_KINDS",
    "EmbeddingSource",
    "LayerInputEmbeddings",
    "ModelEmbeddings",
    "StaticEmbeddings",
    "TokenMapping",
    "embedding_source_from_config",
    "load_embedding_matrix",
    "map_tokens",
    "tokenizer_fingerprint",
]
