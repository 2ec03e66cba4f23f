"""Corpus intervals end to end: a tiny job with interval blocks logs each headline fraction's
interval, its pseudo-neurons' value and excess (and theirs) as MLflow layer metrics, and its block
profiles merge to the profile a job without blocks extracts."""

from __future__ import annotations

import math

import pytest

from intraneuron.errors import ConfigError
from intraneuron.reports.artifacts import load_summary

JOB = ["model=tiny-gpt2", "corpus=tiny", "layer=0", "neurons=range", "neurons.stop=24", "core_tokens.n=30",
       "core_tokens.min_count=2", "analysis.n_permutations=49", "analysis.n_mantel_permutations=49", "clustering.n_categories=3",
       "analysis.max_permutations=49", "extraction.pseudo_neurons=128", "analysis.min_pseudo_neurons=20",
       "analysis.selectivity_match=0", "analysis.alpha=0.5", "extraction.progress=false", "report=none", "analysis.n_jobs=1"]  # fmt: skip


def test_a_job_with_blocks_logs_intervals_around_its_headlines(run_job):
    from intraneuron.analyses.two_fold.analysis import TwoFoldAnalysis
    from intraneuron.analyses.two_fold.intervals import FRACTIONS

    summary, client = run_job(*JOB, "analysis.interval_blocks=3", "analysis.interval_neurons=8")
    metrics = client.get_run(summary.run_id).data.metrics
    table = load_summary(client, summary.run_id, 0)
    assert table["intervals/blocks"] == 3
    names = {key: name for name, key in TwoFoldAnalysis.headline.items()}
    checked = 0
    for key, (pseudo, excess) in FRACTIONS.items():
        for k, label in ((key, names.get(key)), (pseudo, None), (excess, None)):
            low, high, value = table[f"{k}_ci_low"], table[f"{k}_ci_high"], table[k]
            if math.isnan(value):
                continue
            assert low <= value <= high, k
            checked += 1
            if label is not None:  # a headline: logged with its interval, pseudo value and excess
                prefix = f"L0/{label}"
                assert metrics[prefix] == pytest.approx(value)
                assert metrics[f"{prefix}_ci_low"] == pytest.approx(low)
                assert metrics[f"{prefix}_ci_high"] == pytest.approx(high)
                for part in ("pseudo", "excess"):
                    assert math.isnan(metrics[f"{prefix}_{part}"]) == math.isnan(table[(pseudo, excess)[part == "excess"]])
    assert checked >= 4
    assert any(table[f"{k}_ci_high"] > table[f"{k}_ci_low"] for k in FRACTIONS)  # not all degenerate


def test_the_blocks_merge_to_the_profile_of_a_job_without_blocks(run_job, job_cache, monkeypatch):
    import intraneuron.extraction as extraction
    from intraneuron.extraction import blocks as blocks_module
    from intraneuron.extraction import engine
    from tests.test_corpus_shards import assert_same_profile

    seen = {}
    extract = blocks_module.extract_blocks

    def keep(*args, **kwargs):
        merged, blocks = extract(*args, **kwargs)
        seen.update(merged=dict(merged), blocks=dict(blocks))  # the runner drops each layer's after use
        return merged, blocks

    monkeypatch.setattr(blocks_module, "extract_blocks", keep)
    run_job(*JOB, "analysis.interval_blocks=3", "analysis.interval_neurons=4",)
    assert len(seen["blocks"][0]) == 3
    monkeypatch.setenv("INTRANEURON_CACHE", str(job_cache / "no-blocks"))  # a cache without the merged entry
    profiles = {}
    extract_profiles = engine.extract_profiles

    def capture(*args, **kwargs):
        found = extract_profiles(*args, **kwargs)
        profiles.update(found)
        return found

    monkeypatch.setattr(extraction, "extract_profiles", capture, raising=False)
    run_job(*JOB, "analysis.interval_blocks=0",)
    assert_same_profile(seen["merged"][0], profiles[0])


def test_more_blocks_than_windows_are_refused_before_the_pass(run_job, monkeypatch):
    from intraneuron.extraction import blocks as blocks_module

    monkeypatch.setattr(blocks_module, "extract_blocks", lambda *a, **k: pytest.fail("the pass started"))
    with pytest.raises(ConfigError) as err:  # corpus=tiny: 8,192 tokens in windows of 64
        run_job(*JOB, "analysis.interval_blocks=129")
    assert err.value.key == "analysis.interval_blocks" and "128 windows" in str(err.value)
