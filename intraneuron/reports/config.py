"""The `report` config group (conf/report/*.yaml): which neurons of each layer get a card.

A card is one self-contained HTML page per selected neuron, with that neuron's figures also logged
at the run's artifact root. The selection is the neurons asked for by index, then the `top` ones
by a column of the analysis's neurons table, then `random` others drawn with `seed`, so a
researcher sees both the extremes and what a typical neuron looks like.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from intraneuron.errors import ConfigError


@dataclass
class ReportConfig:
    neurons: list[int] = field(default_factory=list)  # always carded (those the analysis looked at)
    top: int = 3  # plus the top ones by `top_by`, largest first
    top_by: str | None = None  # a column of the neurons table; None: the analysis's first `rank_by`
    random: int = 2  # plus this many others, drawn at random
    seed: int = 0
    contexts: int = 8  # top activating contexts per card (<= extraction.top_k)
    context_tokens: int = 16  # tokens shown either side of each occurrence
    lowest_contexts: int = 4  # lowest activating contexts per card (searched: reports/contexts.py)
    logit_tokens: int = 10  # tokens its output promotes, and as many it suppresses (reports/logit_tokens.py)

    def validate(self) -> None:
        for key in ("top", "random", "contexts", "context_tokens", "lowest_contexts", "logit_tokens"):
            value = getattr(self, key)
            if value < 0:
                raise ConfigError(f"report.{key}", value, "an integer >= 0")
        bad = [n for n in self.neurons if n < 0]
        if bad:
            raise ConfigError("report.neurons", self.neurons, "neuron indices >= 0")

    def check(self, rank_by: tuple[str, ...], top_k: int) -> None:
        """Against the analysis (the columns it can rank neurons by) and the extraction."""
        if self.top_by is not None and self.top_by not in rank_by:
            allowed = ", ".join(rank_by) if rank_by else "none: this analysis ranks no neurons (set report.top=0)"
            raise ConfigError("report.top_by", self.top_by, f"a column of the neurons table: {allowed}")
        if self.top and not rank_by:
            raise ConfigError("report.top", self.top, "0 (this analysis ranks no neurons)")
        if self.contexts > top_k:
            raise ConfigError(
                "report.contexts", self.contexts, f"<= extraction.top_k={top_k} (occurrences kept per neuron)"
            )

    def ranking(self, rank_by: tuple[str, ...]) -> str | None:
        return self.top_by or (rank_by[0] if rank_by else None)

    @property
    def enabled(self) -> bool:
        return bool(self.neurons or self.top or self.random)
