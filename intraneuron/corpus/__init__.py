"""Text sources -> fixed-length, content-hashed token windows (the corpus every extraction reads)."""

from intraneuron.corpus.sources import (
    DEFAULT_SOURCE,
    PROVENANCE,
    SOURCES,
    austen,
    gutenberg,
    hf_dataset,
    load_source,
    source_key,
    text_files,
)
from intraneuron.corpus.windows import (
    TokenWindows,
    bos_token_id,
    build_windows,
    decode_context,
    text_sha256,
    tokenizer_fingerprint,
)

__all__ = [
    "DEFAULT_SOURCE",
    "PROVENANCE",
    "SOURCES",
    "TokenWindows",
    "austen",
    "bos_token_id",
    "build_windows",
    "decode_context",
    "gutenberg",
    "hf_dataset",
    "load_source",
    "source_key",
    "text_files",
    "text_sha256",
    "tokenizer_fingerprint",
]
