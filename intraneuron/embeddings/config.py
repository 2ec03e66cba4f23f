"""The `embedding` config group: where core-token vectors come from (conf/embedding/*.yaml)."""

from __future__ import annotations

from dataclasses import dataclass

from intraneuron.errors import ConfigError


@dataclass
class EmbeddingConfig:
    source: str = "model_input"  # static | model_input | layer_input
    checkpoint: str | None = None  # static
    tokenizer: str | None = None  # static
    tensor_name: str | None = None  # static
    multi_token: str = "mean"  # static
    revision: str | None = None  # static
    local_files_only: bool = False  # static
    site: str | None = None  # layer_input: the extraction's input site
    # Remove each neuron's own read-in directions from its core tokens' vectors (the geometry
    # control): a neuron that reads direction w ranks tokens by x.w, which alone makes its top
    # tokens similar. Defined only for vectors in the analysed model's residual space.
    project_read_in: bool = True

    def validate(self) -> None:
        from intraneuron.embeddings.sources import MULTI_TOKEN_POLICIES, SOURCE_KINDS

        if self.source not in SOURCE_KINDS:
            raise ConfigError("embedding.source", self.source, SOURCE_KINDS)
        if self.project_read_in and not self.in_model_space:
            raise ConfigError(
                "embedding.project_read_in", True,
                "false with embedding.source=static: another model's vectors do not live in the space "
                "the neuron reads (the pseudo-neuron null, extraction.pseudo_neurons, still controls geometry)",
            )
        if self.multi_token not in MULTI_TOKEN_POLICIES:
            raise ConfigError("embedding.multi_token", self.multi_token, MULTI_TOKEN_POLICIES)

    @property
    def in_model_space(self) -> bool:
        """True when the vectors live in the analysed model's residual stream (model_input, layer_input)."""
        return self.source != "static"

    @property
    def per_layer(self) -> bool:
        """True when the vectors depend on the layer (built from its profile)."""
        return self.source == "layer_input"

    def build(self, handle, profile=None):
        """The EmbeddingSource; layer_input takes the layer's profile (per-type input means)."""
        import torch

        from intraneuron.embeddings.sources import embedding_source_from_config

        if not self.per_layer:
            return embedding_source_from_config(
                vars(self), analysed_tokenizer=handle.tokenizer, model=handle.model
            )
        if "resid_mean" not in profile.tensors:
            raise ConfigError(
                "embedding.source", "layer_input", "another source: the profile has no layer input "
                "(extraction.input_site was null when it was extracted)",
            )
        vocab = handle.vocab_size
        type_ids, count = profile["resid_ids"], profile["resid_count"]
        resid_sum = torch.zeros(vocab, profile["resid_mean"].shape[1], dtype=torch.float32)
        resid_sum[type_ids] = profile["resid_mean"] * count[:, None].float()
        counts = torch.zeros(vocab, dtype=torch.long)
        counts[type_ids] = count
        return embedding_source_from_config(vars(self), resid_sum=resid_sum, counts=counts)
