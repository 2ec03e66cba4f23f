"""A NaN headline metric never comes bare: each analysis says why it is NaN, and the reason goes
wherever the value is shown (the job's last log lines, the run description, a `reason.L<l>/<name>`
tag, `intraneuron show`); a neuron card shows why a statistic is NaN instead of a blank cell."""

from __future__ import annotations

import html
import logging
import math
import re

import numpy as np
import pandas as pd
from mlflow.artifacts import download_artifacts
from omegaconf import OmegaConf

from intraneuron import commands
from intraneuron.analyses.base import LayerResult
from intraneuron.analyses.two_fold.aggregate import aggregate_layer
from intraneuron.analyses.two_fold.analysis import TwoFoldAnalysis
from intraneuron.analyses.two_fold.clustering import NO_STRUCTURE
from intraneuron.analyses.two_fold.neuron import ROW_KEYS, TOPDOWN_KEYS
from intraneuron.analyses.two_fold.reasons import PSEUDO_OFF, layer_reasons, neuron_reason
from intraneuron.reports import artifacts
from intraneuron.reports.card_html import render_card
from intraneuron.reports.cards import NeuronCard

# One layer of 16 neurons of the tiny random model: the gap statistic finds no categories (K = 1),
# so the top-down headlines are NaN; no pseudo-neurons, so the geometry ones are too.
JOB = ["model=tiny-gpt2", "corpus=tiny", "corpus.max_tokens=8192", "layer=0", "core_tokens.n=30",
       "core_tokens.min_count=2", "neurons=range", "neurons.stop=16", "extraction.pseudo_neurons=0",
       "analysis.n_permutations=19", "analysis.n_mantel_permutations=19", "extraction.progress=false"]  # fmt: skip


def test_a_nan_headline_carries_its_reason_to_the_log_the_run_show_and_the_cards(run_job, tmp_path, caplog, capsys):
    from intraneuron.cli import _report

    summary, client = run_job(*JOB)
    run = client.get_run(summary.run_id)
    values, reasons = summary.layers[0], summary.reasons[0]
    assert math.isnan(values["differentiated_frac"])
    assert reasons["differentiated_frac"].startswith("no categories: K = 1 for ")
    assert reasons["differentiated_frac"].endswith(" analysed neurons")
    assert reasons["top_segment_above_geometry_frac"] == PSEUDO_OFF
    assert set(reasons) == {name for name, value in values.items() if math.isnan(value)}  # only NaN ones
    shown = {name: f"nan ({reason})" for name, reason in reasons.items()}

    for name, reason in reasons.items():
        assert run.data.tags[f"reason.L0/{name}"] == reason
        assert f"{name}={shown[name]}" in run.data.tags["mlflow.note.content"]
    with caplog.at_level(logging.INFO, logger="intraneuron"):
        _report(summary, OmegaConf.create({"tracking": {"tracking_uri": client.tracking_uri, "experiment": "x"}}))
    (line,) = [r.getMessage() for r in caplog.records if r.getMessage().startswith("layer 0: ")]
    assert all(f"{name}={text}" in line for name, text in shown.items())
    assert commands.main(["show", summary.run_id, "--tracking-uri", client.tracking_uri]) == 0
    printed = capsys.readouterr().out
    assert all(f"  {name}: {text}\n" in printed for name, text in shown.items())

    neurons = artifacts.load_table(client, summary.run_id, 0, "neurons").set_index("neuron", drop=False)
    cards = [a.path for a in client.list_artifacts(summary.run_id, artifacts.CARDS_DIR) if "_N" in a.path]
    assert cards  # the random ones (no neuron has an epsilon2 to be top by)
    for path in cards:
        neuron = int(re.search(r"_N(\d+)\.html$", path).group(1))
        page = open(download_artifacts(run_id=summary.run_id, artifact_path=path, tracking_uri=client.tracking_uri)).read()
        (cell,) = re.findall(r"<tr><th>epsilon2</th><td>(.*?)</td></tr>", page)
        row = neurons.loc[neuron].to_dict()
        assert html.unescape(cell) == f"nan ({neuron_reason(row, 'epsilon2')})"
        assert neuron_reason(row, "epsilon2").startswith(("no categories: ", "not analysed: "))


def _rows(n: int, rng=None) -> pd.DataFrame:
    """Per-neuron rows with every ROW_KEYS column: analysed, with categories."""
    rng = rng or np.random.default_rng(0)
    rows = pd.DataFrame({key: rng.random(n) for key in ROW_KEYS})
    rows["skipped"], rows["topdown_skipped"], rows["p_top_method"] = "", "", "permutation"
    rows["n_categories"] = 3.0
    return rows


def _without_categories(rows: pd.DataFrame) -> pd.DataFrame:
    rows = rows.copy()
    rows["topdown_skipped"], rows["n_categories"] = NO_STRUCTURE, 1.0
    rows[[k for k in TOPDOWN_KEYS if k != "n_categories"]] = np.nan
    return rows


def test_a_layer_whose_neurons_were_all_skipped_counts_why():
    rows = _rows(16)
    rows[[k for k in ROW_KEYS if k not in ("skipped", "topdown_skipped", "p_top_method")]] = np.nan
    rows.loc[:11, "skipped"] = "3 core tokens (< core_tokens.min_core_tokens=10)"
    rows.loc[12:, "skipped"] = "selectivity 0.50 SD < core_tokens.min_selectivity=1"
    metrics = aggregate_layer(rows, 0.05)
    reasons = layer_reasons(rows, None, metrics)
    why = ("no neuron analysed: too few core tokens (core_tokens.min_core_tokens) for 12, "
           "too little selectivity (core_tokens.min_selectivity) for 4 of 16 neurons")  # fmt: skip
    assert reasons["topdown/kruskal_sig_frac_bh"] == reasons["bottomup/sign_test_p"] == why
    assert reasons["geometry/z_top_sig_frac_bh"] == why  # the first cause, not the pseudo-neurons
    assert "neurons/analysed" not in reasons and metrics["neurons/analysed"] == 0.0
    assert set(reasons) == {key for key, value in metrics.items() if math.isnan(value)}


def test_no_categories_and_no_pseudo_neurons_are_each_named_and_numbers_get_no_reason():
    rows = _without_categories(_rows(16))
    rows.loc[:1, "n_categories"] = 0.0  # too few tokens to cluster
    metrics = aggregate_layer(rows, 0.05)
    reasons = layer_reasons(rows, None, metrics)
    headline = TwoFoldAnalysis.headline
    assert reasons[headline["differentiated_frac"]] == "no categories: K = 1 for 14, K = 0 for 2 of 16 analysed neurons"
    assert reasons[headline["interleaving_median"]] == reasons[headline["differentiated_frac"]]
    assert reasons[headline["top_segment_above_geometry_frac"]] == PSEUDO_OFF
    assert headline["top_segment_homogeneous_frac"] not in reasons  # a number, not NaN

    pseudo = _without_categories(_rows(8, np.random.default_rng(1)))
    real = _rows(16)
    reasons = layer_reasons(real, pseudo, aggregate_layer(real, 0.05, pseudo))
    assert reasons["geometry/epsilon2_sig_frac_bh"] == "no categories among the pseudo-neurons: K = 1 for 8 of 8 pseudo-neurons"
    assert "topdown/kruskal_sig_frac_bh" not in reasons


def test_a_neuron_s_nan_statistics_say_whether_it_was_skipped_or_has_no_categories():
    skipped = {"skipped": "3 core tokens (< core_tokens.min_core_tokens=10)", "topdown_skipped": ""}
    flat = {"skipped": "", "topdown_skipped": NO_STRUCTURE}
    assert neuron_reason(skipped, "z_top") == "not analysed: 3 core tokens (< core_tokens.min_core_tokens=10)"
    for column in ("epsilon2", "kruskal_p", "epsilon2_excess", "ari"):
        assert neuron_reason(flat, column) == f"no categories: {NO_STRUCTURE}"
    assert neuron_reason(flat, "z_top") == ""  # its NaN has another cause (a constant null)


def test_a_card_shows_a_nan_statistic_with_its_reason_never_blank():
    card = NeuronCard(
        layer=0, neuron=3, reason="random", subtitle="tiny", key_stats=["epsilon2", "z_top"],
        stats={"epsilon2": math.nan, "z_top": np.float32("nan"), "act_max": 1.5, "topdown_skipped": NO_STRUCTURE},
        missing={"epsilon2": f"no categories: {NO_STRUCTURE}"}, token_groups={}, note="", contexts=[], scale=1.0,
    )  # fmt: skip
    page = render_card(card)
    cells = dict(re.findall(r"<tr><th>(\w+)</th><td>(.*?)</td></tr>", page))
    assert html.unescape(cells["epsilon2"]) == f"nan (no categories: {NO_STRUCTURE})"
    assert cells["z_top"] == "nan" and cells["act_max"] == "1.5"


def test_every_analysis_names_the_cause_of_its_nan_metrics():
    from intraneuron.analyses.confidence.analysis import layer_reasons as confidence_reasons
    from intraneuron.analyses.neuron_stats.analysis import NEAR_ZERO_UNDEFINED, layer_result
    from intraneuron.analyses.universal.analysis import layer_reasons as universal_reasons

    stats = pd.DataFrame({"layer": 0, "neuron": range(4), "mean": 0.1, "var": 1.0, "std": 1.0, "skew": 0.5,
                          "kurtosis": 4.0, "min": -1.0, "max": 2.0, "frac_positive": 0.5, "frac_near_zero": np.nan})  # fmt: skip
    result = layer_result({"neurons": stats}, 0)
    assert result.reasons == {key: NEAR_ZERO_UNDEFINED for key in result.metrics if key.startswith("frac_near_zero/")
                              and key != "frac_near_zero/n"}  # fmt: skip

    dead = pd.DataFrame({"mean_corr": [np.nan] * 3, "universal": [False] * 3, "universal_relative": [False] * 3})
    reasons = universal_reasons(dead, {"excess_corr/median": np.nan, "universal_percentile/kurtosis/median": np.nan,
                                       "relative_corr/median": np.nan, "universal/frac": 0.0,
                                       "universal_relative_percentile/skew/median": np.nan}, 0.5, 0.6)  # fmt: skip
    assert reasons == {
        "excess_corr/median": "no correlations: dead (constant over the corpus) for 3 of 3 neurons",
        "relative_corr/median": "no correlations: dead (constant over the corpus) for 3 of 3 neurons",
        "universal_percentile/kurtosis/median": "no universal neuron: excess correlation above "
        "analysis.threshold=0.5 for 0 of 3 neurons",
        "universal_relative_percentile/skew/median": "no universal neuron: relative correlation above "
        "analysis.relative_threshold=0.6 for 0 of 3 neurons",
    }

    table = pd.DataFrame({"role": ["candidate", "candidate", "random"], "known": False,
                          "mean_abs_dloss_te": [0.0, 0.0, 0.2]})  # fmt: skip
    reasons = confidence_reasons(table, {"candidates/ln_mediated/median": np.nan, "random/ln_mediated/median": np.nan})
    assert reasons == {"candidates/ln_mediated/median": "no loss effect: ablation changes no loss for 2 of 2 candidate neurons",
                       "random/ln_mediated/median": "no neuron has a finite value"}  # fmt: skip


class _Tracker:
    def __init__(self):
        self.tags, self.metrics = {}, {}

    def log_metrics(self, metrics):
        self.metrics.update(metrics)

    def set_tags(self, tags):
        self.tags.update(tags)

    def log_table(self, table, path):
        pass


def test_a_nan_headline_of_an_analysis_that_gives_no_reason_says_so():
    tracker = _Tracker()
    result = LayerResult(tables={}, metrics={"a": math.nan, "b": 1.0, "c": math.nan}, reasons={"c": "no c here"})
    values, reasons = artifacts.log_layer_result(tracker, 2, result, {"first": "a", "second": "b", "third": "c"})
    assert reasons == {"first": artifacts.NO_REASON, "third": "no c here"}
    assert tracker.tags == {"reason.L2/first": artifacts.NO_REASON, "reason.L2/third": "no c here"}
    assert tracker.metrics["L2/second"] == 1.0
