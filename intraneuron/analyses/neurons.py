"""The `neurons` config group: which neurons of a layer an analysis looks at (conf/neurons/*.yaml).

A layer can be split across jobs (the unit of work is model x layer x neuron range x config):
either explicit ranges (`neurons=range neurons.start=.. neurons.stop=..`), or `neurons.shards=n`
with `neurons.shard=0..n-1`, which cuts [start, stop) into n contiguous, near-equal parts
(numpy.array_split) so that one sweep key names a shard. `intraneuron merge` (intraneuron/merge.py)
puts the shards of a layer back together.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from intraneuron.errors import ConfigError

SELECTIONS = ("all", "range", "sample")


@dataclass
class NeuronsConfig:
    select: str = "all"  # all | range | sample
    start: int = 0  # range: [start, stop)
    stop: int | None = None  # range: None = the layer's last neuron
    n: int = 256  # sample: how many
    seed: int = 0  # sample: which
    shards: int = 1  # all | range: split the neurons into this many contiguous parts...
    shard: int = 0  # ...and keep part `shard` (0-based): one sweep key per shard of a layer

    def validate(self) -> None:
        if self.select not in SELECTIONS:
            raise ConfigError("neurons.select", self.select, SELECTIONS)
        if self.select == "range":
            if self.start < 0:
                raise ConfigError("neurons.start", self.start, "an integer >= 0")
            if self.stop is not None and self.stop <= self.start:
                raise ConfigError("neurons.stop", self.stop, f"> neurons.start={self.start} (the range is empty)")
        if self.select == "sample" and self.n < 1:
            raise ConfigError("neurons.n", self.n, "an integer >= 1 (the sample is empty)")
        if self.shards < 1:
            raise ConfigError("neurons.shards", self.shards, "an integer >= 1")
        if not 0 <= self.shard < self.shards:
            raise ConfigError("neurons.shard", self.shard, f"an integer in [0, neurons.shards={self.shards})")
        if self.shards > 1 and self.select == "sample":
            raise ConfigError("neurons.shards", self.shards, "1 with neurons.select=sample (shard a range or all)")

    def check_fits(self, d_mlp: int) -> None:
        """Once the layer width is known: a range or sample must lie inside it."""
        if self.select == "range" and self.start >= d_mlp:
            raise ConfigError("neurons.start", self.start, f"< d_mlp={d_mlp} (the range is empty)")
        if self.select == "range" and self.stop is not None and self.stop > d_mlp:
            raise ConfigError("neurons.stop", self.stop, f"<= d_mlp={d_mlp}, the layer's width (or null: to its end)")
        if self.shards > 1 and len(self.indices(d_mlp)) == 0:
            raise ConfigError("neurons.shards", self.shards, "at most the number of neurons of the range "
                              f"(shard {self.shard} is empty)")  # fmt: skip
        if self.select == "sample" and self.n > d_mlp:
            raise ConfigError("neurons.n", self.n, f"<= d_mlp={d_mlp}")

    def indices(self, d_mlp: int) -> np.ndarray:
        """Neuron indices [m], ascending: all, the range [start, stop), or a seeded sample of n;
        with shards > 1, part `shard` of them."""
        return select_neurons(d_mlp, self.select, self.start, self.stop, self.n, self.seed, self.shards, self.shard)


def select_neurons(d_mlp: int, select: str, start: int = 0, stop: int | None = None,
                   n: int = 256, seed: int = 0, shards: int = 1, shard: int = 0) -> np.ndarray:  # fmt: skip
    """Neuron indices [m], ascending: all, the range [start, stop), or a seeded sample of n;
    with shards > 1, the shard-th of `shards` contiguous near-equal parts (numpy.array_split)."""
    if select == "all":
        chosen = np.arange(d_mlp)
    elif select == "range":
        chosen = np.arange(start, min(d_mlp, d_mlp if stop is None else stop))
    else:
        chosen = np.sort(np.random.default_rng(seed).choice(d_mlp, size=n, replace=False))
    return np.array_split(chosen, shards)[shard] if shards > 1 else chosen
