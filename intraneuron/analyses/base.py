"""The seam between the generic runner and each analysis.

An analysis is one class named by `_target_` in `conf/analysis/<name>.yaml`, whose other keys are
its constructor's parameters (validated once, in the constructor). It declares what it needs:

- `groups`: the config groups it reads besides the run's own (`model`, `corpus`, `extraction`,
  `layer`, `tracking`); only these are validated and logged as params;
- `requirements(run)`: which statistics the extraction pass must keep per layer, how many models,
  and whether it reads activations only or also intervenes (write hooks);

and it answers, per layer, a `LayerResult`: named tables, flat metrics with the reason of each NaN
one (a NaN headline is never shown without it) and optional figures, and per neuron selected for
a card (`report` group), a `NeuronView`: its tokens grouped as the analysis sees them and its own
figures. The runner does everything else (validation, loading, the cached
extraction, the cards' contexts and histograms, logging), so a new analysis is one module plus one
YAML file.

A layer may also be analysed in shards (jobs over disjoint neuron ranges, `neurons.shards`);
`merge_layer` rebuilds the whole layer's LayerResult from the shards' logged tables, so that
`intraneuron merge` can log what one job of the whole layer would have. Analyses whose layer
metrics need more than their per-neuron tables keep the default, which refuses.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Mapping
from dataclasses import dataclass, field
from functools import cached_property
from typing import TYPE_CHECKING, Any, ClassVar, Literal

from sklearn.base import BaseEstimator

if TYPE_CHECKING:
    import pandas as pd

    from intraneuron.config import RunConfig
    from intraneuron.extraction.profile import ActivationProfile


@dataclass(frozen=True)
class Requirements:
    """What the runner must provide before `analyse_layer`.

    stats: statistics kept per layer during the streaming pass (intraneuron.extraction.STAT_NAMES);
    they are part of the profile cache key. n_models: models loaded (`model` and `models.others`).
    passes: "observe" reads activations only; "intervene" also runs its own forward passes with
    write hooks (`extraction.patching`) on `job.handle` inside `analyse_layer`. blocks: G >= 2
    extracts each layer's profile as G contiguous blocks of windows (extraction/blocks.py), handed
    over in `job.blocks[layer]` for corpus intervals; the profile is their merge. 0: none.
    """

    stats: frozenset[str]
    n_models: int = 1  # `model` plus `models.others`
    passes: Literal["observe", "intervene"] = "observe"
    blocks: int = 0


@dataclass
class LayerResult:
    """What an analysis found in one layer."""

    tables: dict[str, pd.DataFrame]  # name -> table (layer_<l>/tables/<name>.parquet); empty ones are not logged
    metrics: dict[str, float]  # flat, "<part>/<statistic>": every aggregate (the summary table)
    figures: dict[str, Any] = field(default_factory=dict)  # name -> matplotlib figure (L<l>_<name>.png)
    # metric key -> why it is NaN, a short phrase ("no categories: K = 1 for 16 of 16 neurons"),
    # at least for every NaN headline metric (analyses/reasons.py helps to write them)
    reasons: dict[str, str] = field(default_factory=dict)


class ShardMergeError(ValueError):
    """Shards of a layer that cannot be merged into one layer result (the message says why)."""


@dataclass
class NeuronView:
    """What an analysis shows of one neuron on its card (reports/cards.py adds the rest: the
    neuron's row of the neurons table, its top contexts with per-token shading, its histogram)."""

    # group title (a category) -> [(token text, activation)], highest first; groups in display order
    token_groups: dict[str, list[tuple[str, float]]]
    figures: dict[str, Any] = field(default_factory=dict)  # name -> matplotlib figure (L<l>_N<n>_<name>.png)
    note: str = ""  # how the groups were made, one sentence
    # one line on the groups ("3 categories; top: ... vs ...; differentiated p=..."); "": the card
    # writes one from the groups (reports.cards.category_summary)
    summary: str = ""
    contrast: str = ""  # why these tokens differ from the top contexts (what each is), a sentence


@dataclass
class Job:
    """What the runner has built for one job, handed to the analysis."""

    run: RunConfig
    handle: Any  # models.ModelHandle of `model`, the reference
    windows: Any  # corpus.TokenWindows
    others: list = field(default_factory=list)  # ModelHandles of `models.others`, same tokenizer
    # layer -> its profile's contiguous corpus blocks, in corpus order (Requirements.blocks)
    blocks: dict = field(default_factory=dict)

    @cached_property
    def token_texts(self) -> list[str]:
        """Decoded text of every token id (" the", not "Ġthe"), for filters, labels and previews."""
        texts = self.handle.tokenizer.batch_decode(
            [[i] for i in range(self.handle.vocab_size)],
            skip_special_tokens=False,
            clean_up_tokenization_spaces=False,
        )
        return list(texts)


class Analysis(ABC, BaseEstimator):
    """Base class of every analysis (see the module docstring).

    scikit-learn's estimator conventions: the constructor only stores its parameters (and checks
    them, raising ConfigError naming `analysis.<param>`), so `get_params()` is the `analysis` group.
    """

    name: ClassVar[str]  # the option name, conf/analysis/<name>.yaml
    # config group -> its schema: a dataclass with validate(), and check_fits(d_mlp) if it depends on
    # the layer's width (called before loading when a local config.json gives the width, else after)
    groups: ClassVar[Mapping[str, type]] = {}
    # readable name -> key of LayerResult.metrics: the about ten layer metrics logged as MLflow
    # metrics (L<l>/<name>), printed at the end and put in the run description; the rest of the
    # metrics go to the layer's summary table
    headline: ClassVar[Mapping[str, str]] = {}
    # the headline a reader looks at first: the experiment's runs table in MLflow's UI is sorted by
    # it, largest first (tracking/view.py). Empty: the first headline.
    main_headline: ClassVar[str] = ""
    # readable name -> key of LayerResult.metrics: logged as MLflow metrics (L<l>/<name>) beside the
    # headline, neither printed nor in the description (a headline's null value, excess, interval)
    companions: ClassVar[Mapping[str, str]] = {}
    # columns of the neurons table that `report.top_by` may rank neurons by (largest first); the
    # first is the default. Empty: the analysis ranks no neurons (cards only for report.neurons/random).
    rank_by: ClassVar[tuple[str, ...]] = ()

    @abstractmethod
    def requirements(self, run: RunConfig) -> Requirements:
        """What the extraction must keep for this analysis under this run's config."""

    def check(self, run: RunConfig) -> None:
        """Checks across groups that need no model (raise ConfigError); none by default."""

    def check_model(self, run: RunConfig, handle: Any) -> None:
        """Checks that need the loaded model's dimensions, before the extraction pass."""

    def prepare(self, job: Job) -> None:
        """Build what can fail on a missing file or a bad checkpoint, before the extraction pass."""

    def collect(self, job: Job, profiles: dict[int, ActivationProfile], on_progress=None) -> bool:
        """Its own passes over the corpus, after the extraction pass and before `analyse_layer`
        (several models in lockstep, interventions); True if it made any. None by default.
        on_progress(done, total) reports progress to the run."""
        return False

    @abstractmethod
    def analyse_layer(self, job: Job, layer: int, profile: ActivationProfile) -> LayerResult:
        """The analysis of one layer's profile."""

    def merge_layer(self, run: RunConfig, layer: int, shards: list[dict[str, pd.DataFrame]]) -> LayerResult:
        """The layer's LayerResult from its shards' tables, as one job of all their neurons would
        have found it. shards: per shard job, its logged tables by name (those of its LayerResult
        plus `summary`, the metric/value table). `run`: the config of any shard (they differ only
        in `neurons`). By default the analysis cannot merge (ShardMergeError)."""
        raise ShardMergeError(
            f"analysis {self.name} cannot merge the shards of a layer (it implements no merge_layer): "
            "analyse the whole layer in one job"
        )

    def run_figures(self, metrics: dict[int, dict[str, float]]) -> dict[str, Any]:
        """Figures across the run's layers from each layer's metrics (layer -> LayerResult.metrics),
        logged at the root as <name>.png; none by default."""
        return {}

    def setting(self, run: RunConfig) -> str:
        """The key setting of this run, a few words for figure titles ("ward, K by gap, top 100
        types"); none by default."""
        return ""

    def missing_reason(self, row: Mapping[str, Any], column: str) -> str:
        """Why `column` of a neuron's row of the neurons table is NaN (its card says so); "" when
        the analysis cannot say, as by default."""
        return ""

    def neuron_view(self, job: Job, layer: int, profile: ActivationProfile, neuron: int) -> NeuronView:
        """One neuron's tokens and figures for its card. By default: its distinct top-k tokens
        (each at its highest activation) as one group, no figures."""
        if "topk_values" not in profile.tensors:
            return NeuronView(token_groups={})
        values = profile.numpy("topk_values")[neuron]  # [K], descending
        ids = profile.numpy("topk_token_ids")[neuron]  # [K]
        best: dict[int, float] = {}
        for token, value in zip(ids.tolist(), values.tolist(), strict=True):
            if value == value and token not in best:  # NaN: fewer occurrences than k
                best[token] = value
        tokens = [(job.token_texts[t], v) for t, v in best.items()]
        contrast = ("These are the distinct tokens of its top-k occurrences, each at its highest activation: "
                    "the top contexts below are the highest of the same occurrences, one by one.")  # fmt: skip
        return NeuronView({"top activating tokens": tokens}, note="distinct tokens of its top-k occurrences",
                          contrast=contrast)  # fmt: skip
