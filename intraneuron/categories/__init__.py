"""Independent, human-curated category sources for tokens (WordNet supersenses, ...)."""

from intraneuron.categories.wordnet import LEXNAMES, label_tokens, load_supersenses

__all__ = ["LEXNAMES", "label_tokens", "load_supersenses"]
