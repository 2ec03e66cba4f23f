"""Every component of a run, built from its validated config group, in one place.

`hydra.utils.instantiate` builds the one group that names a class (`clustering.estimator`); the
other groups name our own functions' options and are passed to them here.
"""

from __future__ import annotations

import functools
import inspect
from typing import Any

import numpy as np
import torch
from hydra.errors import InstantiationException
from hydra.utils import instantiate

from intraneuron.analysis.clustering import ClustererFactory, clusterer_factory
from intraneuron.config import ClusteringConfig, CorpusConfig, EmbeddingConfig, ModelConfig
from intraneuron.errors import ConfigError


def clusterer_factory_of(clustering: ClusteringConfig) -> ClustererFactory:
    """k -> estimator, from `clustering.estimator` (any `_target_` class with fit_predict)."""
    target = clustering.estimator["_target_"]
    try:
        partial = instantiate(clustering.estimator, _partial_=True, _convert_="all")
    except InstantiationException:
        raise ConfigError(
            "clustering.estimator._target_", target, "an importable class with fit_predict"
        ) from None
    if not isinstance(partial, functools.partial) or not inspect.isclass(partial.func):
        raise ConfigError("clustering.estimator._target_", target, "a class, not a function")
    if not hasattr(partial.func, "fit_predict"):
        raise ConfigError("clustering.estimator._target_", target, "a class with fit_predict")
    return clusterer_factory(partial.func, **partial.keywords)


def load_model_handle(model: ModelConfig):
    from intraneuron.models.loading import load_model

    return load_model(
        model.source,
        dtype=model.dtype,
        device=model.device,
        revision=model.revision,
        trust_remote_code=model.trust_remote_code,
    )


def token_windows(corpus: CorpusConfig, tokenizer):
    """The corpus as cached token windows (tokenised on the first run only)."""
    from intraneuron.corpus import build_windows, load_source, source_key

    options = dict(corpus.options)
    return build_windows(
        load_source(corpus.source, **options),
        tokenizer,
        window_len=corpus.window_len,
        max_tokens=corpus.max_tokens,
        prepend_bos=corpus.prepend_bos,
        source_key=source_key(corpus.source, **options),
    )


def embedding_source(embedding: EmbeddingConfig, handle, profile=None):
    """The configured source; layer_input takes the layer's profile (per-type residual means)."""
    from intraneuron.embeddings import embedding_source_from_config

    if embedding.source != "layer_input":
        return embedding_source_from_config(
            vars(embedding), analysed_tokenizer=handle.tokenizer, model=handle.model
        )
    if "resid_mean" not in profile.tensors:
        raise ConfigError(
            "embedding.source", "layer_input", "another source: the profile has no layer input "
            "(extraction.input_site was null when it was extracted)",
        )
    vocab = handle.vocab_size
    type_ids, count = profile["type_ids"], profile["type_count"]
    resid_sum = torch.zeros(vocab, profile["resid_mean"].shape[1], dtype=torch.float32)
    resid_sum[type_ids] = profile["resid_mean"] * count[:, None].float()
    counts = torch.zeros(vocab, dtype=torch.long)
    counts[type_ids] = count
    return embedding_source_from_config(vars(embedding), resid_sum=resid_sum, counts=counts)


def token_texts(tokenizer, vocab_size: int) -> list[str]:
    """Decoded text of every token id (" the", not "Ġthe"), for filters, labels and previews."""
    texts = tokenizer.batch_decode(
        [[i] for i in range(vocab_size)], skip_special_tokens=False, clean_up_tokenization_spaces=False
    )
    return list(texts)


def category_labeller(clustering: ClusteringConfig, texts: list[str]) -> Any:
    """ids -> WordNet supersense labels (-1 = not in WordNet), or None to cluster the vectors."""
    if clustering.categories != "wordnet":
        return None
    from intraneuron.categories.wordnet import label_tokens

    labels, _, _ = label_tokens(texts)  # [vocab]

    def label(ids: np.ndarray) -> np.ndarray:
        return labels[ids]

    return label
