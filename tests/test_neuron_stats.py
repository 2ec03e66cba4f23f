"""analysis=neuron_stats: its tables against brute force on the full activation matrix of a tiny
model, and end to end through MLflow (tables, figure, metrics, only its own groups as params)."""

from __future__ import annotations

import numpy as np
import pytest
from mlflow.artifacts import download_artifacts
from scipy import stats

from intraneuron.analyses.neuron_stats.analysis import (
    contexts_table,
    histogram_table,
    neuron_table,
)
from intraneuron.extraction import ExtractionConfig, extract_profiles
from intraneuron.reports.artifacts import figure_path, load_summary, load_table
from tests.test_extraction import full_activations

SETTINGS = ExtractionConfig(top_k=6, batch_size=8, hist_min=-0.5, hist_max=0.5, hist_bins=20, progress=False)
SPEC = {"moments", "histogram", "topk"}


@pytest.fixture(scope="module")
def layer_one(tiny_gpt2, small_windows):
    profile = extract_profiles(tiny_gpt2, small_windows, [1], SETTINGS, cache=None, stats=SPEC)[1]
    A, _, ids = full_activations(tiny_gpt2, small_windows, 1)
    return profile, A.numpy(), ids.numpy()


def test_the_profile_holds_only_the_requested_statistics(layer_one):
    profile, _, _ = layer_one
    assert not any(name.startswith(("type_", "resid_")) for name in profile.tensors)


def test_moments_and_sparsity_equal_brute_force(layer_one):
    profile, A, _ = layer_one  # A [n_tokens, d_mlp]
    neurons = np.array([0, 5, 17, 100])
    table = neuron_table(profile, neurons)
    a = A[:, neurons]
    assert table["neuron"].tolist() == neurons.tolist() and (table["layer"] == 1).all()
    np.testing.assert_allclose(table["mean"], a.mean(0), rtol=1e-5, atol=1e-7)
    np.testing.assert_allclose(table["std"], a.std(0), rtol=1e-4)
    np.testing.assert_allclose(table["skew"], stats.skew(a, 0), rtol=1e-3, atol=1e-4)
    np.testing.assert_allclose(table["kurtosis"], stats.kurtosis(a, 0, fisher=False), rtol=1e-3)
    np.testing.assert_allclose(table["min"], a.min(0), rtol=1e-6)
    np.testing.assert_allclose(table["max"], a.max(0), rtol=1e-6)
    np.testing.assert_allclose(table["frac_positive"], (a > 0).mean(0))
    width = 1.0 / 20
    near = ((a >= -width) & (a < width)).mean(0)
    np.testing.assert_allclose(table["frac_near_zero"], near, atol=1.5 / a.shape[0])  # float32 edges


def test_the_histogram_table_counts_every_activation_in_its_bin(layer_one):
    profile, A, _ = layer_one
    neurons = np.array([3, 40])
    table = histogram_table(profile, neurons)
    for j, neuron in enumerate(neurons):
        rows = table[table["neuron"] == neuron]
        assert rows["count"].sum() == A.shape[0] and (rows["count"] > 0).all()
        a = A[:, neurons[j]].astype(np.float32)
        for row in rows.itertuples():
            inside = (a >= row.bin_low) & (a < row.bin_high)
            assert inside.sum() == row.count


def test_the_contexts_are_the_top_activations_with_the_text_before_them(layer_one, small_windows, tiny_gpt2):
    profile, A, ids = layer_one
    texts = tiny_gpt2.tokenizer.batch_decode([[i] for i in range(tiny_gpt2.vocab_size)])
    neurons = np.array([2, 9])
    table = contexts_table(profile, neurons, small_windows.ids, texts, n_contexts=4, before=5)
    T = small_windows.window_len
    for neuron in neurons:
        rows = table[table["neuron"] == neuron].sort_values("rank")
        assert rows["rank"].tolist() == [0, 1, 2, 3]
        np.testing.assert_allclose(rows["activation"], np.sort(A[:, neuron])[::-1][:4], rtol=1e-6)
        for row in rows.itertuples():
            flat = row.window * T + row.position
            assert A[flat, neuron] == pytest.approx(row.activation, rel=1e-6)
            assert row.token == texts[ids[flat]]
            start = row.window * T + max(0, row.position - 5)
            assert row.context == "".join(texts[t] for t in ids[start:flat])


def test_neuron_stats_end_to_end_through_mlflow(run_job):
    summary, client = run_job("analysis=neuron_stats", "model=tiny-gpt2", "corpus=tiny", "layer=[0,2]",
                              "neurons=range", "neurons.stop=16", "analysis.n_contexts=5",
                              "extraction.progress=false")  # fmt: skip
    run = client.get_run(summary.run_id)
    assert run.info.status == "FINISHED" and run.data.tags["analysis"] == "neuron_stats"
    params = run.data.params
    assert params["analysis._target_"] == "intraneuron.analyses.neuron_stats.NeuronStatsAnalysis"
    assert params["neurons.stop"] == "16" and not any(p.startswith(("core_tokens", "clustering")) for p in params)
    for layer in (0, 2):
        neurons = load_table(client, run.info.run_id, layer, "neurons")
        assert neurons["neuron"].tolist() == list(range(16))
        assert run.data.metrics[f"L{layer}/neurons"] == 16
        assert run.data.metrics[f"L{layer}/kurtosis_median"] == pytest.approx(neurons["kurtosis"].median())
        assert load_summary(client, run.info.run_id, layer)["skew/q90"] == pytest.approx(neurons["skew"].quantile(0.9))
        contexts = load_table(client, run.info.run_id, layer, "contexts")
        assert contexts.groupby("neuron").size().eq(5).all()
        histogram = load_table(client, run.info.run_id, layer, "histogram")
        assert histogram.groupby("neuron")["count"].sum().nunique() == 1  # every neuron saw every token
        png = download_artifacts(run_id=run.info.run_id, artifact_path=figure_path(layer, "moments"),
                                 tracking_uri=client.tracking_uri)  # fmt: skip
        assert open(png, "rb").read(8) == b"\x89PNG\r\n\x1a\n"
    assert "skew_median=" in run.data.tags["mlflow.note.content"]
