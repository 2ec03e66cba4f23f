"""The `neurons` config group: which neurons of a layer an analysis looks at (conf/neurons/*.yaml)."""

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

    def check_fits(self, d_mlp: int) -> None:
        """Once the layer width is known: a range or sample must lie inside it."""
        if self.select == "range" and self.start >= d_mlp:
            raise ConfigError("neurons.start", self.start, f"< d_mlp={d_mlp} (the range is empty)")
        if self.select == "sample" and self.n > d_mlp:
            raise ConfigError("neurons.n", self.n, f"<= d_mlp={d_mlp}")

    def indices(self, d_mlp: int) -> np.ndarray:
        """Neuron indices [m], ascending: all, the range [start, stop), or a seeded sample of n."""
        return select_neurons(d_mlp, self.select, self.start, self.stop, self.n, self.seed)


def select_neurons(d_mlp: int, select: str, start: int = 0, stop: int | None = None,
                   n: int = 256, seed: int = 0) -> np.ndarray:  # fmt: skip
    """Neuron indices [m], ascending: all, the range [start, stop), or a seeded sample of n."""
    if select == "all":
        return np.arange(d_mlp)
    if select == "range":
        return np.arange(start, min(d_mlp, d_mlp if stop is None else stop))
    return np.sort(np.random.default_rng(seed).choice(d_mlp, size=n, replace=False))
