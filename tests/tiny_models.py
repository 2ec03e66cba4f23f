"""The tiny random models live in the package (configs name them too); tests import them from here."""

from intraneuron.models.tiny import BERT_VOCAB, BUILDERS, GPT2_EOS, GPT2_VOCAB  # noqa: F401
