"""`analysis=confidence` end to end on a tiny GPT-2 whose last layer has a planted entropy neuron
(its w_out lies in directions the unembedding all but ignores): it tops rho, it is a candidate, and
mean-ablating it acts almost only through the final norm, unlike random neurons of its layer."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import torch
from mlflow.artifacts import download_artifacts
from transformers import AutoTokenizer

from intraneuron.models.weights import neuron_weights
from intraneuron.reports import artifacts
from tests.test_confidence_stats import set_w_out, with_dark_subspace

LAST, PLANTED = 2, 5
SMALL = ["analysis=confidence", "corpus=tiny", "layer=2", "analysis.k=4", "analysis.n_windows=4",
         "analysis.candidates=3", "analysis.random_neurons=4", "extraction.progress=false", "report.top=1",
         "report.random=0"]  # fmt: skip


@pytest.fixture(scope="module")
def planted_dir(tiny_model_dirs, tmp_path_factory):
    handle, q = with_dark_subspace(tiny_model_dirs["gpt2"], seed=0)
    norms = neuron_weights(handle, LAST, processed=False).w_out.norm(dim=1)
    w = q @ torch.tensor([1.0, -0.5, 0.25])
    with torch.no_grad():
        set_w_out(handle, LAST, PLANTED, w * (3 * norms.max() / w.norm()))
    out = tmp_path_factory.mktemp("planted") / "gpt2"
    handle.model.save_pretrained(str(out))
    AutoTokenizer.from_pretrained(str(tiny_model_dirs["gpt2"])).save_pretrained(str(out))
    return out


def test_the_planted_entropy_neuron_is_found_and_acts_through_the_final_norm(run_job, planted_dir):
    summary, client = run_job(*SMALL, f"model.source={planted_dir}", f"analysis.known_neurons=[{PLANTED},17]")
    table = pd.read_parquet(download_artifacts(run_id=summary.run_id, tracking_uri=client.tracking_uri,
                                               artifact_path=artifacts.table_path(LAST, "neurons")))  # fmt: skip
    row = table.set_index("neuron").loc[PLANTED]
    assert row["rho_rank"] == 1 and row["rho"] > 0.99 and row["role"] == "candidate"
    assert row["rho"] > 3 * row["rho_random_level"]  # k=4 of d_model=32: the level is 0.31
    assert row["ln_mediated"] > 0.9  # its loss effect goes through the final norm's scale
    randoms = table[table["role"] == "random"]
    assert len(randoms) == 4 and randoms["ln_mediated"].median() < 0.5
    assert table["ablation_tokens"].dropna().iloc[0] > 0
    headline = summary.layers[LAST]
    assert headline["top_rho"] == pytest.approx(table["rho"].max())
    assert headline["random_ln_mediated_median"] == pytest.approx(randoms["ln_mediated"].median())
    known = table[table["known"]]  # named in analysis.known_neurons: 17 is ablated as "known"
    assert sorted(known["neuron"]) == [PLANTED, 17] and table.set_index("neuron").loc[17, "role"] == "known"
    assert headline["known_neurons_rho_rank_median"] == pytest.approx(known["rho_rank"].median())
    steps = pd.read_parquet(download_artifacts(run_id=summary.run_id, tracking_uri=client.tracking_uri,
                                               artifact_path=artifacts.table_path(LAST, "weight_processing")))  # fmt: skip
    assert any("centre" in step for step in steps["step"])
    root = {a.path: a.file_size for a in client.list_artifacts(summary.run_id)}
    for name in ("unembedding_spectrum", "norm_vs_logit_var", "rho_distribution", "ablation_effects"):
        assert root.get(artifacts.figure_path(LAST, name), 0) > 10_000, name
    assert f"cards/L{LAST}_N{PLANTED}.html" in {a.path for a in client.list_artifacts(summary.run_id, "cards")}
    check_intervals_and_noise(client, summary.run_id, table)


def check_intervals_and_noise(client, run_id: str, table: pd.DataFrame) -> None:
    """The bootstrap intervals over windows in the table, the metrics and the card; the W_U noise
    check in a table, the metrics and the spectrum figure."""
    from pathlib import Path

    from intraneuron.analyses.confidence.bootstrap import INTERVAL_OF

    ablated = table[table["role"] != ""]
    for name in INTERVAL_OF:
        lo, value, hi = (ablated[c].to_numpy(float) for c in (f"{name}_lo", name, f"{name}_hi"))
        assert (lo <= value + 1e-6).all() and (value <= hi + 1e-6).all(), name
    planted = table.set_index("neuron").loc[PLANTED]
    assert planted["ln_mediated_lo"] > 0.9  # through the final norm in every resample of the windows
    metrics = artifacts.load_summary(client, run_id, LAST)
    candidates = ablated[ablated["role"] == "candidate"]["ln_mediated"].median()
    assert metrics["candidates/ln_mediated/median_lo"] <= candidates <= metrics["candidates/ln_mediated/median_hi"]
    assert {"random/mean_dentropy_te/median_lo", "known/ln_mediated/median_hi"} <= set(metrics)
    card = Path(download_artifacts(run_id=run_id, artifact_path=f"cards/L{LAST}_N{PLANTED}.html",
                                   tracking_uri=client.tracking_uri)).read_text()  # fmt: skip
    assert f"[{planted['ln_mediated_lo']:.4g}, {planted['ln_mediated_hi']:.4g}]" in card
    noise = pd.read_parquet(download_artifacts(run_id=run_id, tracking_uri=client.tracking_uri,
                                               artifact_path=artifacts.table_path(LAST, "unembedding_noise")))  # fmt: skip
    assert len(noise) == 8 and noise["in_null_space"].sum() == 4  # k = 4: the 2k smallest
    assert metrics["unembedding_noise/exact_null"] == 1  # GPT-2's centred all-ones direction
    assert metrics["unembedding_noise/noise_floor"] > 0 and metrics["unembedding_noise/draws"] == 3


def test_the_random_direction_level_is_what_random_neurons_get(run_job, tiny_model_dirs):
    """On an unplanted model no neuron stands out: the layer's rho sits around the random level."""
    summary, client = run_job(*SMALL, "model=tiny-gpt2", "analysis.k=8")
    table = pd.read_parquet(download_artifacts(run_id=summary.run_id, tracking_uri=client.tracking_uri,
                                               artifact_path=artifacts.table_path(LAST, "neurons")))  # fmt: skip
    level = table["rho_random_level"].iloc[0]
    rms = float(np.sqrt((table["rho"] ** 2).mean()))
    assert rms == pytest.approx(level, rel=0.15)
