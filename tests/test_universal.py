"""`analysis=universal` end to end on tiny models in lockstep: a neuron-permuted copy of a model is
recovered partner for partner and found universal (and not under the rotation baseline), a model
against itself gives correlation 1 with itself, the streamed correlations equal a brute-force
correlation of the full activation matrices, and a model with another tokenizer is refused."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from mlflow.artifacts import download_artifacts

from intraneuron.reports import artifacts

BASE = ["analysis=universal", "model=tiny-gpt2", "corpus=tiny", "corpus.max_tokens=8192", "layer=[0,2]",
        "extraction.progress=false", "report.top=2", "report.random=0"]  # fmt: skip
NOISE = 0.02  # relative weight noise of the permuted copy


def others(*models: tuple[str, Path]) -> str:
    return "+models.others=[" + ",".join(f"{{name: {n}, source: '{p}'}}" for n, p in models) + "]"


@pytest.fixture(scope="module")
def reference_dir(tmp_path_factory) -> Path:
    from intraneuron.models.tiny import tiny_gpt2

    return tiny_gpt2(tmp_path_factory.mktemp("reference") / "a")


@pytest.fixture(scope="module")
def permuted(reference_dir, tmp_path_factory) -> tuple[Path, dict[int, np.ndarray]]:
    """Model B: every MLP layer of A with its neurons permuted (B's neuron j is A's perm[j]) and
    a little noise on those weights. Returns B's directory and perm per layer."""
    from transformers import AutoTokenizer, GPT2LMHeadModel

    model = GPT2LMHeadModel.from_pretrained(str(reference_dir))
    generator = torch.Generator().manual_seed(1)
    perms = {}
    with torch.no_grad():
        for layer, block in enumerate(model.transformer.h):
            perm = torch.randperm(block.mlp.c_fc.weight.shape[1], generator=generator)
            for weight in (block.mlp.c_fc.weight, block.mlp.c_fc.bias, block.mlp.c_proj.weight):
                dim = weight.ndim - 1 if weight is not block.mlp.c_proj.weight else 0  # Conv1D: [in, out]
                permuted_weight = weight.index_select(dim, perm)
                noise = torch.randn(permuted_weight.shape, generator=generator) * NOISE * permuted_weight.std()
                weight.copy_(permuted_weight + noise)
            perms[layer] = perm.numpy()
    out = tmp_path_factory.mktemp("permuted") / "b"
    model.save_pretrained(str(out))
    AutoTokenizer.from_pretrained(str(reference_dir)).save_pretrained(str(out))
    return out, perms


def neurons(client, run_id: str, layer: int) -> pd.DataFrame:
    path = download_artifacts(run_id=run_id, artifact_path=artifacts.table_path(layer, "neurons"),
                              tracking_uri=client.tracking_uri)  # fmt: skip
    return pd.read_parquet(path)


def test_a_neuron_permuted_copy_is_recovered_and_universal_but_not_under_rotation(run_job, reference_dir, permuted):
    directory, perms = permuted
    summary, client = run_job(*BASE, f"model.source={reference_dir}", others(("b", directory)),
                              "analysis.threshold=0.3")  # fmt: skip
    for layer in (0, 2):
        table = neurons(client, summary.run_id, layer)
        inverse = np.argsort(perms[layer])  # A's neuron i is B's neuron inverse[i]
        assert (table["partner_layer_b"] == layer).mean() > 0.95
        assert (table["partner_neuron_b"].to_numpy() == inverse).mean() > 0.95
        assert table["max_corr_b"].median() > 0.98
        assert table["universal"].mean() > 0.5
        assert table["baseline_b"].median() < table["max_corr_b"].median() - 0.3
    assert summary.layers[0]["universal_frac"] == pytest.approx(neurons(client, summary.run_id, 0)["universal"].mean())
    check_figures(client, summary.run_id, (0, 2))


def check_figures(client, run_id: str, layers: tuple[int, ...]) -> None:
    """Each figure is a real PNG in the run, and its data (rebuilt from the run's own tables and
    summaries) is those numbers."""
    from intraneuron.analyses.universal.figures import correlation_vs_baseline, share_by_layer

    root = {a.path: a for a in client.list_artifacts(run_id)}
    names = [f"L{l}_{n}.png" for l in layers for n in ("correlation_vs_baseline", "universal_percentiles")]
    for name in [*names, "universal_share_by_layer.png"]:
        assert name in root and root[name].file_size > 10_000, name
    summaries = {l: artifacts.load_summary(client, run_id, l) for l in layers}
    share = share_by_layer(summaries).intraneuron_data
    for i, layer in enumerate(layers):
        table = neurons(client, run_id, layer)
        assert share["share"][i] == pytest.approx(table["universal"].mean())
        assert share["mean_corr_median"][i] == pytest.approx(table["mean_corr"].median())
        data = correlation_vs_baseline(table, layer, 0.3).intraneuron_data
        np.testing.assert_array_equal(data["universal"], table["universal"])
        assert (data["mean_corr"] - data["mean_baseline"] > 0.3)[data["universal"]].all()


def test_a_model_against_itself_partners_each_neuron_with_itself(run_job, reference_dir):
    summary, client = run_job(*BASE, "layer=1", f"model.source={reference_dir}", others(("same", reference_dir)),
                              "analysis.baseline=none", "analysis.weights=false")  # fmt: skip
    table = neurons(client, summary.run_id, 1)
    np.testing.assert_allclose(table["max_corr_same"], 1.0, atol=1e-5)
    assert (table["partner_layer_same"] == 1).all() and (table["partner_neuron_same"] == table["neuron"]).all()


def test_streamed_correlations_equal_brute_force_on_the_full_activations(run_job, reference_dir, permuted):
    from intraneuron.corpus.config import CorpusConfig
    from intraneuron.extraction.contexts import window_activations
    from intraneuron.models.loading import load_model

    directory, _ = permuted
    summary, client = run_job(*BASE, "layer=1", f"model.source={reference_dir}", others(("b", directory)),
                              "analysis.drop_tokens=[]", "analysis.top_k=3")  # fmt: skip
    a, b = load_model(str(reference_dir)), load_model(str(directory))
    ids = np.asarray(CorpusConfig(name="tiny", source="gutenberg", window_len=64, max_tokens=8192).windows(a.tokenizer).ids)
    # position 0 (BOS, the attention sink) is skipped by the pass (extraction.skip_first_positions=1)
    acts_a = window_activations(a, ids, 1, "mlp.hook_post", np.arange(a.d_mlp))[:, 1:].reshape(-1, a.d_mlp)
    acts_b = np.concatenate([window_activations(b, ids, l, "mlp.hook_post", np.arange(b.d_mlp))[:, 1:].reshape(-1, b.d_mlp)
                             for l in range(3)], axis=1)  # [N, 3 * D] fmt: skip
    full = np.corrcoef(acts_a.T.astype(np.float64), acts_b.T.astype(np.float64))[: a.d_mlp, a.d_mlp :]  # [D, 3D]
    table = neurons(client, summary.run_id, 1)
    np.testing.assert_allclose(table["max_corr_b"], full.max(1), atol=1e-4)
    best = full.argmax(1)
    np.testing.assert_array_equal(table["partner_layer_b"] * b.d_mlp + table["partner_neuron_b"], best)
    partners = pd.read_parquet(download_artifacts(run_id=summary.run_id, tracking_uri=client.tracking_uri,
                                                  artifact_path=artifacts.table_path(1, "partners")))  # fmt: skip
    top3 = np.sort(full, axis=1)[:, ::-1][:, :3]
    got = partners.pivot(index="neuron", columns="rank", values="corr").to_numpy()
    np.testing.assert_allclose(got, top3, atol=1e-4)


def test_moments_in_the_table_equal_scipy_on_the_full_activations(run_job, reference_dir):
    from scipy import stats

    from intraneuron.corpus.config import CorpusConfig
    from intraneuron.extraction.contexts import window_activations
    from intraneuron.models.loading import load_model

    summary, client = run_job(*BASE, "layer=0", f"model.source={reference_dir}", others(("same", reference_dir)),
                              "analysis.baseline=none")  # fmt: skip
    a = load_model(str(reference_dir))
    ids = np.asarray(CorpusConfig(name="tiny", source="gutenberg", window_len=64, max_tokens=8192).windows(a.tokenizer).ids)
    acts = window_activations(a, ids, 0, "mlp.hook_post", np.arange(a.d_mlp))[:, 1:]  # position 0 is skipped
    acts = acts.reshape(-1, a.d_mlp).astype(np.float64)
    table = neurons(client, summary.run_id, 0)
    np.testing.assert_allclose(table["skew"], stats.skew(acts, axis=0), rtol=1e-3, atol=1e-4)
    np.testing.assert_allclose(table["kurtosis"], stats.kurtosis(acts, axis=0, fisher=False), rtol=1e-3)
    np.testing.assert_allclose(table["frac_positive"], (acts > 0).mean(0), atol=1e-6)


def test_a_model_with_another_tokenizer_is_refused_naming_its_entry(run_job, tiny_model_dirs):
    from intraneuron.errors import ConfigError

    with pytest.raises(ConfigError, match=r"models\.others\.0\.source.*same tokenizer"):
        run_job(*BASE, others(("bert", tiny_model_dirs["bert"])))


def test_an_analysis_of_one_model_refuses_other_models(run_job, reference_dir):
    from intraneuron.errors import ConfigError

    with pytest.raises(ConfigError, match=r"models\.others.*reads one model"):
        run_job("model=tiny-gpt2", "corpus=tiny", "analysis=neuron_stats", others(("b", reference_dir)))


def test_independently_initialised_models_share_no_universal_neurons(run_job):
    """The null: tiny GPT-2s from three random seeds have no shared features, so each neuron's best
    partner is no better than the rotation baseline's and none is universal."""
    summary, client = run_job("experiment=universal_smoke", "corpus.max_tokens=8192", "extraction.progress=false",
                              "report=none")  # fmt: skip
    for layer in (0, 1, 2):
        table = neurons(client, summary.run_id, layer)
        assert not table["universal"].any()
        assert abs(table["excess_corr"].median()) < 0.05
        assert summary.layers[layer]["universal_frac"] == 0.0


@pytest.mark.parametrize("fault", ["read_only", "save_fails"])
def test_a_correlation_cache_that_cannot_be_written_keeps_the_result(run_job, tmp_path, monkeypatch, fault):
    import errno

    from intraneuron.extraction import cache as cache_module

    def refuse(*args, **kwargs):
        raise OSError(errno.EROFS, "Read-only file system")

    monkeypatch.setenv("INTRANEURON_CACHE", str(tmp_path / "cache"))
    if fault == "read_only":
        monkeypatch.setattr(cache_module, "_probe_write", refuse)
    else:
        monkeypatch.setattr(cache_module.TensorCache, "save", refuse)
    summary, client = run_job("experiment=universal_smoke", "report=none")
    assert summary.layers and client.get_run(summary.run_id).info.status == "FINISHED"
    correlations = tmp_path / "cache" / "correlations"
    assert not correlations.exists() or not [p for p in correlations.iterdir() if not p.name.startswith(".")]


# --- the baseline-relative score -------------------------------------------------------------------

PLANTED = 8  # token-detector neurons planted in layer 0 of each seed (neurons 0-7)
NULL_RATE = 0.01  # the stated rate: independent neurons past relative_threshold=0.5 at most this often


def corpus_ids(tokenizer) -> np.ndarray:
    from intraneuron.corpus.config import CorpusConfig

    return np.asarray(CorpusConfig(name="tiny", source="gutenberg", window_len=64, max_tokens=8192).windows(tokenizer).ids)


def plant_token_detectors(directory: Path, tokens: list[int], ids: np.ndarray) -> None:
    """Neuron j of layer 0 becomes a detector of tokens[j] in this model's own residual stream:
    w_in along Fisher's discriminant of the MLP input on that token against elsewhere, the bias half way between the
    token's median pre-activation and the 99th percentile elsewhere; w_out = 0, so nothing else
    in the model changes. Every seed that gets them computes the same function of the text."""
    from transformers import GPT2LMHeadModel

    model = GPT2LMHeadModel.from_pretrained(str(directory))
    captured = []
    hook = model.transformer.h[0].mlp.register_forward_hook(lambda m, args, out: captured.append(args[0]))
    with torch.no_grad():
        model(torch.from_numpy(ids.astype(np.int64)))
    hook.remove()
    x, flat = captured[0].reshape(-1, model.config.n_embd).double(), torch.from_numpy(ids.reshape(-1).copy())  # [N, d], [N]
    with torch.no_grad():
        mlp = model.transformer.h[0].mlp
        for j, token in enumerate(tokens):
            on = flat == token
            within = torch.cov(torch.cat([x[on] - x[on].mean(0), x[~on] - x[~on].mean(0)]).T)  # [d, d]
            v = torch.linalg.solve(within, x[on].mean(0) - x[~on].mean(0))  # Fisher's discriminant
            v /= v.norm()
            pre = x @ v
            low, high = torch.quantile(pre[~on], 0.995), pre[on].median()
            gain = 8.0 / float(high - low)
            mlp.c_fc.weight[:, j] = (gain * v).float()  # Conv1D [d_model, d_mlp]
            mlp.c_fc.bias[j] = -gain * float(low)
            mlp.c_proj.weight[j] = 0.0
    model.save_pretrained(str(directory))


@pytest.fixture(scope="module")
def planted_seeds(tmp_path_factory) -> list[Path]:
    """Tiny GPT-2s (d_model 96: at 32 the detectors are noisy) from seeds 0, 1, 2, sharing nothing
    but the tokenizer, each with PLANTED detectors of the same most frequent tokens in layer 0."""
    from transformers import AutoTokenizer

    from intraneuron.models.tiny import tiny_gpt2

    dirs = [tiny_gpt2(tmp_path_factory.mktemp(f"seed{s}") / "m", seed=s, d_model=96) for s in range(3)]
    tokenizer = AutoTokenizer.from_pretrained(str(dirs[0]))
    ids = corpus_ids(tokenizer)
    counts = np.bincount(ids[:, 1:].reshape(-1), minlength=len(tokenizer))
    counts[[tokenizer.eos_token_id, *tokenizer.encode("\n")]] = 0  # rows the analysis drops
    tokens = np.argsort(counts)[::-1][:PLANTED].tolist()
    for directory in dirs:
        plant_token_detectors(directory, tokens, ids)
    return dirs


def test_planted_universal_neurons_pass_the_relative_threshold_and_independent_ones_do_not(run_job, planted_seeds):
    from scipy import stats

    a, b, c = planted_seeds
    summary, client = run_job(*BASE, "layer=[0,1,2]", f"model.source={a}", others(("b", b), ("c", c)),
                              "analysis.weights=false")  # fmt: skip
    tables = {layer: neurons(client, summary.run_id, layer) for layer in (0, 1, 2)}
    planted = tables[0].iloc[:PLANTED]
    assert planted["universal_relative"].all() and (planted["relative_corr"] > 0.9).all()
    # a random mix of the other seed's neurons already tracks a frequent token (baselines 0.6-0.9),
    # so the excess (<= 1 - baseline) misses every one of them
    assert (planted["mean_baseline"] > 0.5).all() and not planted["universal"].any()
    for name in ("b", "c"):  # each detector's partner is the other seed's detector of the same token
        assert (planted[f"partner_layer_{name}"] == 0).all()
        assert (planted[f"partner_neuron_{name}"] == planted["neuron"]).all()
    independent = pd.concat([tables[0].iloc[PLANTED:], tables[1], tables[2]])
    passed = int(independent["universal_relative"].sum())
    # at the stated rate: more than binom.isf(0.001) of n would happen once in a thousand at NULL_RATE
    assert passed <= stats.binom.isf(0.001, len(independent), NULL_RATE), passed
    assert independent["relative_corr"].abs().median() < 0.1
    assert summary.layers[0]["universal_relative_frac"] == pytest.approx(tables[0]["universal_relative"].mean())


def test_the_relative_score_equals_a_brute_force_computation(run_job, reference_dir, permuted):
    """Max correlations and rotation baselines from the full activation matrices of two other
    models, then (mean corr - mean baseline) / (1 - mean baseline)."""
    from intraneuron.extraction.contexts import window_activations
    from intraneuron.extraction.lockstep import LockstepSettings, _rotation
    from intraneuron.models.loading import load_model

    directory, _ = permuted
    other_dirs = [directory, reference_dir]  # the reference itself: correlation 1, relative 1
    summary, client = run_job(*BASE, "layer=1", f"model.source={reference_dir}",
                              others(("b", other_dirs[0]), ("c", other_dirs[1])), "analysis.drop_tokens=[]",
                              "analysis.weights=false")  # fmt: skip
    a = load_model(str(reference_dir))
    ids = corpus_ids(a.tokenizer)
    acts = lambda handle, layer: window_activations(handle, ids, layer, "mlp.hook_post",  # noqa: E731
                                                    np.arange(handle.d_mlp))[:, 1:].reshape(-1, handle.d_mlp)  # fmt: skip
    reference = acts(a, 1).astype(np.float64)  # [N, D]; position 0 is skipped by the pass
    corr, base = [], []
    settings = LockstepSettings(baseline="rotation", seed=0)
    for m, path in enumerate(other_dirs):
        other = load_model(str(path))
        layers = [acts(other, layer).astype(np.float64) for layer in range(3)]
        rotated = [x @ _rotation(other.d_mlp, settings, m, layer, "cpu").double().numpy().T for layer, x in enumerate(layers)]
        D = a.d_mlp
        corr.append(np.corrcoef(reference.T, np.concatenate(layers, axis=1).T)[:D, D:].max(1))
        base.append(np.corrcoef(reference.T, np.concatenate(rotated, axis=1).T)[:D, D:].max(1))
    mean_corr, mean_base = np.mean(corr, axis=0), np.mean(base, axis=0)
    expected = (mean_corr - mean_base) / (1 - mean_base)
    table = neurons(client, summary.run_id, 1)
    np.testing.assert_allclose(table["mean_baseline"], mean_base, atol=1e-4)
    np.testing.assert_allclose(table["relative_corr"], expected, atol=5e-4)
    np.testing.assert_array_equal(table["universal_relative"], expected > 0.5)
