"""The `model` config group: which model to load and how (conf/model/*.yaml)."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path


@dataclass
class ModelConfig:
    name: str = "smollm2-135m"
    source: str = "smollm2-135m"  # packaged name, tiny-* test model, directory, .gguf file or hub id
    n_layers: int | None = None  # checked against `layer` before loading; None: read config.json
    dtype: str = "float32"
    device: str = "cpu"
    revision: str | None = None
    trust_remote_code: bool = False

    def validate(self) -> None:
        from intraneuron.errors import ConfigError, MissingAssetError
        from intraneuron.models.loading import PACKAGED, looks_like_path, parse_device, parse_dtype

        parse_dtype(self.dtype)
        parse_device(self.device)
        if self.n_layers is not None and self.n_layers < 1:
            raise ConfigError("model.n_layers", self.n_layers, "null (read config.json) or an integer >= 1")
        if self.source not in PACKAGED and looks_like_path(self.source):
            if not Path(self.source).expanduser().exists():
                raise MissingAssetError(
                    f"model.source: {self.source} does not exist (a packaged name, a model directory, "
                    "a .gguf file or a hub id)"
                )

    def shape(self) -> tuple[int | None, int | None]:
        """(layers, neurons per layer), as far as known without loading weights: n_layers, and what
        a local folder's config.json says. A hub id or .gguf: checked right after loading, still
        before extraction."""
        from intraneuron.models.adapters import adapter_for
        from intraneuron.models.loading import PACKAGED, read_config

        location = Path(self.source).expanduser()
        if self.source in PACKAGED or not (location / "config.json").is_file():
            return self.n_layers, None
        config = read_config(str(location), trust_remote_code=self.trust_remote_code)
        adapter = adapter_for(config)
        return (self.n_layers if self.n_layers is not None else adapter.n_layers(config)), adapter.d_mlp(config)

    def load(self):
        """The ModelHandle (tokenizer, model, adapter, fingerprint)."""
        from intraneuron.models.loading import load_model

        return load_model(
            self.source,
            dtype=self.dtype,
            device=self.device,
            revision=self.revision,
            trust_remote_code=self.trust_remote_code,
        )


@dataclass
class ModelsConfig:
    """The `models` group (conf/models/*.yaml): the models an analysis of several models compares
    with `model`, the reference (e.g. the same architecture trained from other seeds). They run in
    lockstep over the same token windows, so their tokenizers must be identical."""

    others: list[ModelConfig] = field(default_factory=list)

    def validate(self) -> None:
        from intraneuron.errors import ConfigError, MissingAssetError

        names = [m.name for m in self.others]
        if len(set(names)) != len(names):
            raise ConfigError("models.others", names, "models with distinct names")
        for i, other in enumerate(self.others):
            entry = f"models.others.{i}."  # name the list entry, not the reference model
            try:
                other.validate()
            except ConfigError as error:
                raise ConfigError(error.key.replace("model.", entry, 1), error.value, error.allowed) from None
            except MissingAssetError as error:
                raise MissingAssetError(str(error).replace("model.", entry, 1)) from None

    def load(self) -> list:
        """The other models' ModelHandles, in order."""
        return [m.load() for m in self.others]
