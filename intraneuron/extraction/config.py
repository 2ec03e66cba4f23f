"""What one extraction pass reads and keeps: the `extraction` config group's schema.

Kept free of torch so that config assembly (Hydra, `--help`, validation) stays fast; the engine
imports it, not the other way round.
"""

from __future__ import annotations

import math
import re
from dataclasses import asdict, dataclass

from intraneuron.errors import ConfigError

NEURON_SITES = ("mlp.hook_post", "mlp.hook_pre")
INPUT_SITES = ("hook_resid_pre", "hook_resid_mid", None)
# Fields that say how to run, not what to compute: they never enter a cache key.
HOW_FIELDS = ("batch_size", "device", "progress", "memory_gb")
# Fields that say which part of the corpus one job extracts: the whole profile's key never holds them
# (a profile merged from shards is the one-worker profile); a shard's partial key adds them back.
SHARD_FIELDS = ("corpus_shards", "corpus_shard")
_DEVICE = re.compile(r"[a-z]+(:\d+)?")


@dataclass(frozen=True)
class ExtractionConfig:
    top_k: int = 100  # occurrences kept per neuron
    site: str = "mlp.hook_post"  # neuron site inside block l (TransformerLens naming)
    # layer input summed per token type; None = skip. hook_resid_mid (what the MLP's norm reads)
    # is conf/extraction/default.yaml's default; the schema keeps the old one for direct callers.
    input_site: str | None = "hook_resid_pre"
    track_type_max: bool = True
    # windows per block of the cross-fitting halves (stat fold_token_types): window w is in half
    # (w // fold_block_windows) % 2, so 1 is even / odd windows (extraction/types.py)
    fold_block_windows: int = 1
    hist_min: float = -10.0
    hist_max: float = 10.0
    hist_bins: int = 200
    skip_first_positions: int = 0  # window positions excluded from all statistics (yaml default 1:
    # position 0 is BOS, the attention sink, whose activations say nothing about the token)
    pseudo_neurons: int = 2048  # random read-in directions per layer (stat "pseudo_neurons"; 0 = none)
    pseudo_seed: int = 0
    # windows, evenly strided across the corpus, whose tokens fix the pseudo-neurons' calibration
    pseudo_calibration_windows: int = 64
    batch_size: int = 16
    device: str = "cpu"
    progress: bool = True
    # Peak memory allowed for one extraction pass, in GB (None: the memory available when it starts);
    # the layers are split into several passes when their tables would not fit (extraction/memory.py)
    memory_gb: float | None = None
    # Split the corpus's windows into `corpus_shards` contiguous ranges and extract only range
    # `corpus_shard` (0-based); the job that finds every shard cached merges them (extraction/shards.py).
    corpus_shards: int = 1
    corpus_shard: int = 0

    def key_fields(self) -> dict:
        """The fields that change the numbers of the whole profile (all but HOW_FIELDS and SHARD_FIELDS)."""
        fields = asdict(self)
        for how in HOW_FIELDS + SHARD_FIELDS:
            fields.pop(how)
        return fields

    def shard_key_fields(self) -> dict:
        """What a shard's partial profile adds to the whole profile's key fields."""
        return {"corpus_shard": self.corpus_shard, "corpus_shards": self.corpus_shards}

    def validate(self) -> None:
        """Raise ConfigError naming the first bad key; window-dependent checks live in the engine."""
        _integer("top_k", self.top_k, 1)
        if self.site not in NEURON_SITES:
            raise ConfigError("extraction.site", self.site, NEURON_SITES)
        if self.input_site not in INPUT_SITES:
            raise ConfigError("extraction.input_site", self.input_site, INPUT_SITES)
        _boolean("track_type_max", self.track_type_max)
        _integer("fold_block_windows", self.fold_block_windows, 1)
        _finite("hist_min", self.hist_min)
        _finite("hist_max", self.hist_max)
        if not self.hist_min < self.hist_max:
            raise ConfigError("extraction.hist_min", self.hist_min, f"< hist_max ({self.hist_max})")
        _integer("hist_bins", self.hist_bins, 1)
        _integer("skip_first_positions", self.skip_first_positions, 0)
        _integer("pseudo_neurons", self.pseudo_neurons, 0)
        _integer("pseudo_seed", self.pseudo_seed, 0)
        _integer("pseudo_calibration_windows", self.pseudo_calibration_windows, 1)
        _integer("batch_size", self.batch_size, 1)
        if not isinstance(self.device, str) or not _DEVICE.fullmatch(self.device):
            raise ConfigError("extraction.device", self.device, 'a torch device such as "cpu" or "cuda:0"')
        _boolean("progress", self.progress)
        if self.memory_gb is not None and (
            isinstance(self.memory_gb, bool) or not isinstance(self.memory_gb, int | float)
            or not math.isfinite(self.memory_gb) or self.memory_gb <= 0
        ):
            raise ConfigError("extraction.memory_gb", self.memory_gb, "a number of GB > 0, or null (the memory available)")
        _integer("corpus_shards", self.corpus_shards, 1)
        if isinstance(self.corpus_shard, bool) or not isinstance(self.corpus_shard, int) or not (
            0 <= self.corpus_shard < self.corpus_shards
        ):
            raise ConfigError("extraction.corpus_shard", self.corpus_shard,
                              f"an integer >= 0 and < extraction.corpus_shards ({self.corpus_shards})")  # fmt: skip


def _integer(name: str, value: object, minimum: int) -> None:
    # bool is an int subclass; `top_k: true` is a typo, not 1
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ConfigError(f"extraction.{name}", value, f"an integer >= {minimum}")


def _finite(name: str, value: object) -> None:
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
        raise ConfigError(f"extraction.{name}", value, "a finite number")


def _boolean(name: str, value: object) -> None:
    if not isinstance(value, bool):
        raise ConfigError(f"extraction.{name}", value, "true or false")
