"""Stat specs: which statistics one layer keeps, and the CombinedStat that keeps them.

A spec is a set of names from STAT_NAMES. Each name owns a tensor prefix in the profile, so the
union of the stats' `state_dict`s never has two stats writing one key:

    topk               topk_values, topk_positions [D, K]  (+ topk_token_ids, added by the engine)
    token_types        type_ids, type_count [T], type_mean, type_max [T, D] (derived from the fold
                       table when fold_token_types is in the spec too: one table is filled, not two)
    moments            act_count, act_mean, act_var, act_skew, act_kurt, act_min, act_max,
                       act_frac_positive [D]
    histogram          hist_edges [B + 1], hist_counts [D, B + 2]
    input_token_types  resid_ids, resid_count [T], resid_mean [T, M]  (needs extraction.input_site)
    fold_token_types   fold_ids, fold_count [F], fold_mean, fold_max [F, D]: a token-type table keyed
                       by token_id * 2 + half, the halves of the corpus alternating by blocks of
                       extraction.fold_block_windows windows (1: even / odd windows; select on one
                       half, measure on the other); see ActivationProfile.split_type_stats
    pseudo_neurons     pseudo.<every key above of the spec's neuron stats> for random read-in
                       directions through the layer's own nonlinearity (extraction/pseudo.py), plus
                       pseudo.source_neurons, pseudo.rotation_seed and the calibration constants

The last two are computed only when requested (None, "everything", keeps the first five).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping

import torch

from intraneuron.errors import ConfigError
from intraneuron.extraction.config import ExtractionConfig
from intraneuron.extraction.reducers import Histogram, Moments, Stat, State, TopK
from intraneuron.extraction.type_tables import TokenTypeTable, TypesFromFolds
from intraneuron.extraction.types import TypeKeys, fold_half

STAT_NAMES = (
    "topk", "token_types", "moments", "histogram", "input_token_types", "fold_token_types", "pseudo_neurons",
)
ALL_STATS = frozenset(STAT_NAMES)
DEFAULT_STATS = frozenset(STAT_NAMES[:5])  # what stats=None means: the expensive extras on request only
# per-column stats of neuron activations: read the neuron site
NEURON_STATS = frozenset({"topk", "token_types", "moments", "histogram", "fold_token_types"})
# what pseudo-neurons get of them: no histogram, which only the real neurons' cards and tables read
# (at 2,048 pseudo-neurons it would cost a quarter of a batch's statistics)
PSEUDO_STATS = NEURON_STATS - {"histogram"}
PREFIXES = {
    "topk": "topk", "token_types": "type", "moments": "act", "histogram": "hist", "input_token_types": "resid",
    "fold_token_types": "fold", "pseudo_neurons": "pseudo",
}
_CLASSES: dict[str, type[Stat]] = {
    "topk": TopK, "token_types": TokenTypeTable, "moments": Moments, "histogram": Histogram,
    "input_token_types": TokenTypeTable, "fold_token_types": TokenTypeTable,
}
# Config fields that change only the named stats' numbers: a spec with none of a field's stats
# leaves it out of the cache key, so e.g. two top_k values share a moments-only entry.
FIELDS_OF = {
    "topk": ("top_k",),
    "token_types": ("track_type_max",),
    "fold_token_types": ("track_type_max", "fold_block_windows"),
    "histogram": ("hist_min", "hist_max", "hist_bins"),
    "input_token_types": ("input_site",),
    "pseudo_neurons": ("pseudo_neurons", "pseudo_seed", "pseudo_calibration_windows"),
}


def resolve_stats(stats: Iterable[str] | None, config: ExtractionConfig) -> tuple[str, ...]:
    """A spec as a sorted tuple, checked; None means everything the config can extract."""
    if stats is None:
        return tuple(
            sorted(DEFAULT_STATS if config.input_site is not None else DEFAULT_STATS - {"input_token_types"})
        )
    if isinstance(stats, str):  # a bare name would iterate as letters
        stats = (stats,)
    spec = tuple(sorted(set(stats)))
    unknown = [s for s in spec if s not in ALL_STATS]
    if unknown or not spec:
        raise ValueError(f"stats={unknown or list(spec)}: expected names from {STAT_NAMES}")
    if "input_token_types" in spec and config.input_site is None:
        raise ConfigError(
            "extraction.input_site", None,
            "'hook_resid_pre' or 'hook_resid_mid' when the stat 'input_token_types' is requested",
        )
    if "pseudo_neurons" in spec and config.pseudo_neurons < 1:
        raise ConfigError(
            "extraction.pseudo_neurons", config.pseudo_neurons,
            "an integer >= 1 when the stat 'pseudo_neurons' is requested",
        )
    if "pseudo_neurons" in spec and not PSEUDO_STATS.intersection(spec):
        raise ValueError(
            f"stats={list(spec)}: 'pseudo_neurons' needs a neuron stat to apply to the pseudo-neurons, "
            f"one of {sorted(PSEUDO_STATS)}"
        )
    return spec


def stat_key_fields(spec: Iterable[str], config: ExtractionConfig) -> dict:
    """The config fields that change this spec's numbers, plus the spec itself."""
    spec = sorted(spec)
    fields = config.key_fields()
    kept = {field for name in spec for field in FIELDS_OF.get(name, ())}
    for owned in FIELDS_OF.values():
        for field in owned:
            if field not in kept:
                fields.pop(field, None)
    if not NEURON_STATS.intersection(spec):
        fields.pop("site")
    return {**fields, "stats": spec}


class CombinedStat:
    """The stats of one layer: `add` routes each tensor to the stats that read it."""

    def __init__(self, stats: Mapping[str, Stat], fold_block: int = 1):
        """`stats["pseudo_neurons"]` is an extraction.pseudo.PseudoNeurons (it holds its own
        CombinedStat over the pseudo columns); `fold_block`: windows per block of the fold table's
        halves (extraction.fold_block_windows). A rebuilt CombinedStat merges whatever its tables'
        keys say; only `add` reads `fold_block`."""
        unknown = set(stats) - ALL_STATS
        if unknown:
            raise ValueError(f"unknown stats {sorted(unknown)}; expected names from {STAT_NAMES}")
        self.stats = {name: stats[name] for name in STAT_NAMES if name in stats}
        self.fold_block = fold_block

    @classmethod
    def build(
        cls, spec: Iterable[str], *, d_mlp: int, d_model: int, config: ExtractionConfig,
        keys: TypeKeys | None = None, vocab_size: int | None = None, device: torch.device | str = "cpu",
        table_device: torch.device | str | None = None, pseudo: Stat | None = None,
    ) -> CombinedStat:
        """`keys`: the token types (and fold keys) the pass will see, which size the type tables;
        without them the tables are keyed densely by 0..vocab_size-1 (and grow on unseen ids).
        `pseudo` (a PseudoNeurons, built from the model's weights) is required when the spec has
        "pseudo_neurons"; everything else is built here. With both "token_types" and
        "fold_token_types", the per-type table is derived from the fold table (TypesFromFolds).
        `table_device` (default `device`) holds the type tables; the other stats live on `device`."""
        spec = resolve_stats(spec, config)
        if "pseudo_neurons" in spec and pseudo is None:
            raise ValueError("the stat 'pseudo_neurons' needs the model: pass pseudo=PseudoNeurons(...)")
        if keys is None:
            if vocab_size is None:
                raise ValueError("CombinedStat.build needs keys= (the pass's token types) or vocab_size=")
            keys = TypeKeys.dense(vocab_size)
        tables = device if table_device is None else table_device
        stats: dict[str, Stat] = {}
        makers = {
            "topk": lambda: TopK(config.top_k, d_mlp, device),
            "fold_token_types": lambda: TokenTypeTable(keys.folds, d_mlp, tables, track_max=config.track_type_max),
            "token_types": lambda: (
                TypesFromFolds(stats["fold_token_types"]) if "fold_token_types" in stats
                else TokenTypeTable(keys.types, d_mlp, tables, track_max=config.track_type_max)
            ),
            "moments": lambda: Moments(d_mlp, device),
            "histogram": lambda: Histogram(
                torch.linspace(config.hist_min, config.hist_max, config.hist_bins + 1), d_mlp, device
            ),
            "input_token_types": lambda: TokenTypeTable(keys.types, d_model, tables, track_max=False),
            "pseudo_neurons": lambda: pseudo,
        }
        for name in sorted(spec, key=lambda n: n != "fold_token_types"):  # the fold table first
            stats[name] = makers[name]()
        return cls(stats, config.fold_block_windows)

    @property
    def spec(self) -> tuple[str, ...]:
        return tuple(sorted(self.stats))

    @property
    def reads_neurons(self) -> bool:
        return bool(NEURON_STATS.intersection(self.stats))

    @property
    def reads_input(self) -> bool:
        return "input_token_types" in self.stats

    @property
    def reads_mlp_input(self) -> bool:
        """Pseudo-neurons read what the MLP's first projection reads (ln2.hook_normalized)."""
        return "pseudo_neurons" in self.stats

    def add(
        self, acts: torch.Tensor | None, resid: torch.Tensor | None, token_ids: torch.Tensor,
        positions: torch.Tensor, window_idx: torch.Tensor | None = None, mlp_in: torch.Tensor | None = None,
    ) -> None:
        """acts [N, d_mlp] (None when no neuron stat); resid [N, d_model] (None without the input
        stat); token_ids, positions [N]; window_idx [N] (fold_token_types); mlp_in [N, d_model]
        (pseudo_neurons)."""
        s = self.stats
        if "fold_token_types" in s:
            if window_idx is None:
                raise ValueError("the stat 'fold_token_types' needs window_idx")
            s["fold_token_types"].add(acts, token_ids * 2 + fold_half(window_idx, self.fold_block))
        if "pseudo_neurons" in s:
            if mlp_in is None:
                raise ValueError("the stat 'pseudo_neurons' needs mlp_in")
            s["pseudo_neurons"].add(mlp_in, token_ids, positions, window_idx)
        if "topk" in s:
            s["topk"].add(acts, positions)
        if "token_types" in s:
            s["token_types"].add(acts, token_ids)
        if "moments" in s:
            s["moments"].add(acts)
        if "histogram" in s:
            s["histogram"].add(acts)
        if "input_token_types" in s:
            s["input_token_types"].add(resid, token_ids)

    def merge(self, other: CombinedStat) -> None:
        if self.spec != other.spec:
            raise ValueError(f"cannot merge stats {self.spec} with {other.spec}")
        for name, stat in self.stats.items():
            stat.merge(other.stats[name])

    def state_dict(self) -> State:
        out: State = {}
        for name, stat in self.stats.items():
            out.update(stat.state_dict(PREFIXES[name]))
        return out

    def export(self) -> State:
        """`state_dict()` at the end of a pass, the stats' buffers handed over where they can be
        (Stat.export): this CombinedStat must not be used after. The per-type table derived from
        the fold table is exported first, while the fold table's float64 sums are still whole."""
        out: State = {}
        for name, stat in self.stats.items():
            out.update(stat.export(PREFIXES[name]))
        return out

    @classmethod
    def load_state_dict(cls, state: State, spec: Iterable[str] | None = None) -> CombinedStat:
        """Rebuild from `state_dict()` (or a profile's tensors); spec defaults to what is there."""
        if spec is None:
            spec = [n for n in STAT_NAMES if _has(state, n)]
        stats: dict[str, Stat] = {}
        for name in sorted(spec, key=lambda n: n != "fold_token_types"):  # the fold table first
            if name == "pseudo_neurons":
                from intraneuron.extraction.pseudo import PseudoNeurons

                stats[name] = PseudoNeurons.load_state_dict(state, PREFIXES[name])
            elif name == "token_types" and "fold_token_types" in stats:
                stats[name] = TypesFromFolds(stats["fold_token_types"])
            else:
                stats[name] = _CLASSES[name].load_state_dict(state, PREFIXES[name])
        return cls(stats)


def _has(state: Mapping[str, torch.Tensor], name: str) -> bool:
    probe = {"topk": "_values", "token_types": "_ids", "moments": "_count", "histogram": "_counts",
             "input_token_types": "_ids", "fold_token_types": "_ids", "pseudo_neurons": ".source_neurons"}[name]
    return f"{PREFIXES[name]}{probe}" in state
