"""Helpers for `Analysis.merge_layer`: per-neuron tables of a layer's shards put back together.

A shard is one job's tables of one layer (name -> DataFrame, as logged: `neurons` has one row
per analysed neuron, column `neuron`). The shards of a layer must cover disjoint neuron sets;
tables every shard computes the same way (the pseudo-neurons' null) must be equal in all of them.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from intraneuron.analyses.base import ShardMergeError

if TYPE_CHECKING:
    import pandas as pd

    Shard = dict[str, pd.DataFrame]


def neuron_set(shard: Shard) -> set[int]:
    """The neurons a shard analysed (its `neurons` table's `neuron` column)."""
    table = shard.get("neurons")
    if table is None or "neuron" not in table:
        return set()
    return {int(n) for n in table["neuron"]}


def check_disjoint(shards: list[Shard]) -> None:
    """Refuse shards that analysed a neuron twice: their rows would be counted twice in every
    layer statistic. Also refuse an empty list."""
    if not shards:
        raise ShardMergeError("no shards to merge")
    seen: dict[int, int] = {}  # neuron -> the shard that has it
    for i, shard in enumerate(shards):
        for neuron in sorted(neuron_set(shard)):
            if neuron in seen:
                raise ShardMergeError(
                    f"shards {seen[neuron]} and {i} both analysed neuron {neuron}: "
                    "the neuron ranges of a layer's shards must not overlap"
                )
            seen[neuron] = i


def concat_by_neuron(tables: list[pd.DataFrame | None]) -> pd.DataFrame:
    """The shards' tables of one name as one table ordered by neuron (stable: a neuron's rows keep
    their order), index 0..n-1; missing or empty shard tables are left out. [sum of rows, columns]"""
    import pandas as pd

    present = [t for t in tables if t is not None and len(t)]
    if not present:
        return pd.DataFrame()
    frame = pd.concat(present, ignore_index=True)
    if "neuron" in frame:
        frame = frame.sort_values("neuron", kind="stable", ignore_index=True)
    return frame


def same_table(tables: list[pd.DataFrame | None], name: str) -> pd.DataFrame:
    """The one table every shard must have computed identically (e.g. the pseudo-neurons, the
    same seeded random directions through the same pipeline); ShardMergeError if they differ."""
    import pandas as pd

    if any(t is None for t in tables):
        raise ShardMergeError(f"some shards have a {name} table and some do not: were they run with one config?")
    first = tables[0]
    for i, table in enumerate(tables[1:], start=1):
        try:
            pd.testing.assert_frame_equal(first, table, check_exact=False, rtol=1e-9, atol=0)
        except AssertionError:
            raise ShardMergeError(
                f"the {name} table of shard {i} differs from shard 0's: every shard must compute it "
                "the same way (same model, corpus, extraction and analysis config)"
            ) from None
    return first.copy()


def shard_metric(shard: Shard, name: str) -> float:
    """One metric of a shard's `summary` table (metric, value); 0.0 when it has none."""
    summary = shard.get("summary")
    if summary is None or not len(summary):
        return 0.0
    values = summary.loc[summary["metric"] == name, "value"]
    return float(values.iloc[0]) if len(values) else 0.0
