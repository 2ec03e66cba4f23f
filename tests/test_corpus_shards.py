"""Corpus shards: n jobs each extract a contiguous range of windows, and the merged partial profiles
equal the one-worker profile (extraction/shards.py), through the cache and across processes."""

from __future__ import annotations

import dataclasses
import logging
import multiprocessing
import os

import numpy as np
import pytest
import torch

from intraneuron.errors import ConfigError
from intraneuron.extraction import ExtractionConfig, extract_profiles
from intraneuron.extraction.cache import ProfileCache, cache_key
from intraneuron.extraction.engine import profile_key_fields
from intraneuron.extraction.shards import ShardPending, merge_profiles, shard_windows
from intraneuron.extraction.stats import STAT_NAMES

LAYER = 1
# batch 5 over 64 windows: shard edges (32; 21, 42) fall inside batches of the one-worker pass, and
# the calibration sample (windows strided over the whole corpus) lies mostly outside each shard
SETTINGS = ExtractionConfig(top_k=7, batch_size=5, hist_min=-1.0, hist_max=1.0, hist_bins=16, progress=False,
                            skip_first_positions=0, pseudo_neurons=12, pseudo_seed=2)  # fmt: skip
SPEC = STAT_NAMES  # every stat, pseudo-neurons, folds and the layer input included
# exported exactly by every merge: counts, ids, positions, extremes, histograms, calibration
EXACT = ("_ids", "_count", "_positions", "_max", "_min", "hist_", "topk_values", "source_neurons",
         "rotation_seed", "calib_")  # fmt: skip


def shard_settings(shard: int, shards: int) -> ExtractionConfig:
    return dataclasses.replace(SETTINGS, corpus_shard=shard, corpus_shards=shards)


def assert_same_profile(got, want) -> None:
    """Every tensor of `want` in `got`: exact where EXACT says, else float32-tight."""
    assert (got.layer, got.site, got.input_site, got.window_len, got.n_tokens) == (
        want.layer, want.site, want.input_site, want.window_len, want.n_tokens
    )
    assert sorted(got.tensors) == sorted(want.tensors)
    for key, expected in want.tensors.items():
        value = got.tensors[key]
        assert value.dtype == expected.dtype and value.shape == expected.shape, key
        if not expected.is_floating_point() or any(tag in key for tag in EXACT):
            assert torch.equal(value, expected), key
        else:
            torch.testing.assert_close(value, expected, rtol=2e-5, atol=1e-6, msg=key)


def partial_profiles(handle, windows, shards: int, spec=SPEC, settings=SETTINGS) -> list:
    """Each shard's partial profile, extracted by the engine's pass over its window range."""
    from intraneuron.extraction.engine import _run_pass
    from intraneuron.extraction.stats import resolve_stats

    settings = dataclasses.replace(settings, corpus_shard=0, corpus_shards=shards)
    spec = resolve_stats(spec, settings)
    return [
        _run_pass(handle, windows, [LAYER], settings, spec, window_range=shard_windows(windows.n_windows, i, shards))[
            LAYER
        ]
        for i in range(shards)
    ]


@pytest.fixture(scope="module", params=["gpt2", "llama"])
def handle(request, tiny_model_dirs, tiny_gpt2):
    if request.param == "gpt2":
        return tiny_gpt2
    from intraneuron.models.loading import load_model

    return load_model(str(tiny_model_dirs["llama"]))


@pytest.fixture(scope="module")
def whole(handle, small_windows):
    return extract_profiles(handle, small_windows, [LAYER], SETTINGS, cache=None, stats=SPEC)[LAYER]


def test_shard_windows_cover_the_corpus_once_in_order():
    for n_windows, shards in ((64, 2), (64, 3), (5, 3), (2, 3)):
        ranges = [shard_windows(n_windows, i, shards) for i in range(shards)]
        assert [w for r in ranges for w in r] == list(range(n_windows))
        assert max(map(len, ranges)) - min(map(len, ranges)) <= 1
    with pytest.raises(ValueError):
        shard_windows(10, 2, 2)


@pytest.mark.parametrize("shards", [2, 3])
def test_merged_shards_equal_the_one_worker_profile(handle, small_windows, whole, shards):
    partials = partial_profiles(handle, small_windows, shards)
    sizes = [p.n_tokens for p in partials]
    assert sum(sizes) == whole.n_tokens and (shards == 2 or len(set(sizes)) > 1)  # 3 shards: uneven
    calib = [p.tensors["pseudo.calib_pseudo_mean"] for p in partials]
    assert all(torch.equal(c, calib[0]) for c in calib)  # every shard calibrates on the one sample
    assert_same_profile(merge_profiles(partials), whole)


def test_merged_shards_with_blocked_halves_equal_the_one_worker_profile(handle, small_windows, monkeypatch):
    """Blocks of 5 windows straddle the shard edges (21, 42): each shard puts a window in the half
    of its global index, so the halves merge into the one-worker pass's; a shard's tables are sized
    by its own blocked keys (none grows during its pass)."""
    from intraneuron.extraction.type_tables import TokenTypeTable

    blocked = dataclasses.replace(SETTINGS, fold_block_windows=5)
    whole = extract_profiles(handle, small_windows, [LAYER], blocked, cache=None, stats=SPEC)[LAYER]
    with monkeypatch.context() as patch:
        patch.setattr(TokenTypeTable, "_grow", lambda table, keys: pytest.fail("a table grew during a shard's pass"))
        partials = partial_profiles(handle, small_windows, 3, settings=blocked)
    assert_same_profile(merge_profiles(partials), whole)
    _, counts, _ = whole.split_type_stats()  # [2, T]
    halves = (np.arange(small_windows.n_windows) // 5) % 2  # [W]
    kept = small_windows.window_len - SETTINGS.skip_first_positions
    assert counts.sum(1).tolist() == [int((halves == h).sum()) * kept for h in (0, 1)]


def test_topk_ties_keep_the_smallest_positions_whatever_the_batching(tiny_gpt2, small_windows, tmp_path):
    """A corpus of 8 windows repeated 3 times: every activation ties with its copies, and the top-k
    must not depend on how the corpus was cut into batches or shards (smallest positions first)."""
    from intraneuron.corpus.windows import TokenWindows

    path = tmp_path / "tokens.npy"
    np.save(path, np.tile(np.asarray(small_windows.ids[:8]), (3, 1)))
    windows = TokenWindows(path, np.load(path, mmap_mode="r"), small_windows.window_len, "repeated")
    spec = ("histogram", "moments", "topk")
    profiles = [
        extract_profiles(tiny_gpt2, windows, [LAYER], dataclasses.replace(SETTINGS, batch_size=b), cache=None,
                         stats=spec)[LAYER]
        for b in (5, 24)
    ]  # fmt: skip
    partials = [
        _run_pass_range(tiny_gpt2, windows, spec, dataclasses.replace(SETTINGS, batch_size=b), i, 3)
        for b, i in ((5, 0), (24, 1), (3, 2))
    ]
    for profile in profiles[1:] + [merge_profiles(partials)]:
        assert torch.equal(profile["topk_positions"], profiles[0]["topk_positions"])
        assert torch.equal(profile["topk_token_ids"], profiles[0]["topk_token_ids"])
    values, positions = profiles[0]["topk_values"], profiles[0]["topk_positions"]
    tied = values[:, 1:] == values[:, :-1]
    assert tied.float().mean() > 0.5  # the case this test is about
    assert (positions[:, 1:][tied] > positions[:, :-1][tied]).all()


def _run_pass_range(handle, windows, spec, settings, shard, shards):
    from intraneuron.extraction.engine import _run_pass

    window_range = shard_windows(windows.n_windows, shard, shards)
    return _run_pass(handle, windows, [LAYER], settings, spec, window_range=window_range)[LAYER]


def test_shard_jobs_meet_in_the_cache_and_keep_the_whole_key(tiny_gpt2, small_windows, tmp_path):
    whole = extract_profiles(tiny_gpt2, small_windows, [LAYER], SETTINGS, cache=None, stats=SPEC)[LAYER]
    cache = ProfileCache(tmp_path)
    key = cache_key(profile_key_fields(tiny_gpt2, small_windows, LAYER, SETTINGS, SPEC))

    # the whole key is what it was before the shard fields existed: the old fields, hashed
    from intraneuron.extraction.stats import resolve_stats

    old_fields = dataclasses.asdict(SETTINGS)
    for field in ("batch_size", "device", "progress", "memory_gb", "corpus_shards", "corpus_shard"):
        old_fields.pop(field)
    assert old_fields == SETTINGS.key_fields()
    old = {"model": tiny_gpt2.fingerprint, "dtype": str(next(tiny_gpt2.model.parameters()).dtype),
           "corpus": small_windows.content_hash, "window_len": small_windows.window_len, "layer": LAYER,
           **old_fields, "stats": list(resolve_stats(SPEC, SETTINGS))}  # fmt: skip
    assert cache_key(old) == key
    for shard in (0, 1):  # a shard's settings do not change the whole key
        assert cache_key(profile_key_fields(tiny_gpt2, small_windows, LAYER, shard_settings(shard, 2), SPEC)) == key

    with pytest.raises(ShardPending, match=r"shard 0 of 2 saved; layer 1's profile is merged .*missing: .*1"):
        extract_profiles(tiny_gpt2, small_windows, [LAYER], shard_settings(0, 2), cache, stats=SPEC)
    assert cache.load(key) is None
    merged = extract_profiles(tiny_gpt2, small_windows, [LAYER], shard_settings(1, 2), cache, stats=SPEC)[LAYER]
    assert_same_profile(merged, whole)
    assert cache.load(key) is not None
    entries = [p.name for p in cache.root.iterdir() if not p.name.startswith(".")]
    assert entries == [key]  # the merged shards are removed

    forwards = []
    hook = tiny_gpt2.model.transformer.wte.register_forward_hook(lambda *_: forwards.append(1))
    try:
        again = extract_profiles(tiny_gpt2, small_windows, [LAYER], SETTINGS, cache, stats=SPEC)[LAYER]
        late = extract_profiles(tiny_gpt2, small_windows, [LAYER], shard_settings(0, 2), cache, stats=SPEC)[LAYER]
    finally:
        hook.remove()
    assert not forwards  # the unsharded job and a late shard job are cache hits
    assert [p.name for p in cache.root.iterdir() if not p.name.startswith(".")] == [key]
    for profile in (again, late):
        for name, value in merged.tensors.items():
            assert torch.equal(profile[name], value), name


def test_a_shard_job_needs_a_cache(tiny_gpt2, small_windows):
    with pytest.raises(ConfigError, match="extraction.corpus_shards"):
        extract_profiles(tiny_gpt2, small_windows, [LAYER], shard_settings(0, 2), cache=None, stats=("topk",))


@pytest.mark.parametrize(
    ("shard", "shards", "key"),
    [(2, 2, "extraction.corpus_shard"), (-1, 2, "extraction.corpus_shard"), (1, 1, "extraction.corpus_shard"),
     (True, 2, "extraction.corpus_shard"), ("0", 2, "extraction.corpus_shard"),
     (0, 0, "extraction.corpus_shards")],
)  # fmt: skip
def test_bad_shards_name_the_key(shard, shards, key):
    with pytest.raises(ConfigError) as err:
        dataclasses.replace(ExtractionConfig(), corpus_shard=shard, corpus_shards=shards).validate()
    assert err.value.key == key


def _shard_job(model_dir, windows_fields, cache_root, shard, shards, barrier, results) -> None:
    """One shard job in its own process: ('merged' | 'read' | 'pending', detail)."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from intraneuron.corpus.windows import TokenWindows
    from intraneuron.models.loading import load_model

    torch.set_num_threads(1)
    path, window_len, content_hash = windows_fields
    windows = TokenWindows(path, np.load(path, mmap_mode="r"), window_len, content_hash)
    handle = load_model(model_dir)
    messages = []
    handler = logging.Handler()
    handler.emit = lambda record: messages.append(record.getMessage())
    logging.getLogger("intraneuron.extraction").addHandler(handler)
    logging.getLogger("intraneuron.extraction").setLevel(logging.INFO)
    barrier.wait(timeout=300)  # both loaded: start the extractions together
    try:
        extract_profiles(handle, windows, [LAYER], shard_settings(shard, shards), ProfileCache(cache_root), stats=SPEC)
    except ShardPending as pending:
        results.put((shard, "pending", str(pending)))
        return
    merged = any("shards merged into" in m for m in messages)
    results.put((shard, "merged" if merged else "read", "\n".join(messages)))


def test_two_shard_processes_on_one_cache_merge_once(tiny_gpt2, tiny_model_dirs, small_windows, tmp_path):
    context = multiprocessing.get_context("spawn")
    barrier, results = context.Barrier(2), context.Queue()
    fields = (small_windows.path, small_windows.window_len, small_windows.content_hash)
    jobs = [context.Process(target=_shard_job, args=(str(tiny_model_dirs["gpt2"]), fields, tmp_path, shard, 2,
                                                     barrier, results)) for shard in (0, 1)]  # fmt: skip
    for job in jobs:
        job.start()
    outcomes = {}
    for _ in jobs:
        shard, outcome, detail = results.get(timeout=600)
        outcomes[shard] = (outcome, detail)
    for job in jobs:
        job.join(timeout=60)
        assert job.exitcode == 0
    kinds = sorted(o for o, _ in outcomes.values())
    assert kinds in (["merged", "pending"], ["merged", "read"]), outcomes
    key = cache_key(profile_key_fields(tiny_gpt2, small_windows, LAYER, SETTINGS, SPEC))
    merged = ProfileCache(tmp_path).load(key)
    whole = extract_profiles(tiny_gpt2, small_windows, [LAYER], SETTINGS, cache=None, stats=SPEC)[LAYER]
    assert merged is not None
    assert_same_profile(merged, whole)


@pytest.mark.slow  # two tracked jobs: about 20 s
def test_a_pending_shard_job_ends_finished_and_the_last_one_analyses(run_job, tmp_path, monkeypatch):
    from intraneuron.paths import cache_dir

    monkeypatch.setenv("INTRANEURON_CACHE", str(tmp_path / "cache"))  # nothing merged by other tests
    job = ["model=tiny-gpt2", "corpus=tiny", "corpus.max_tokens=4096", "layer=0", "neurons=range",
           "neurons.stop=12", "core_tokens.n=30", "core_tokens.min_count=2", "analysis.n_permutations=9",
           "analysis.n_mantel_permutations=0", "analysis.n_jobs=1", "extraction.pseudo_neurons=8",
           "extraction.progress=false", "extraction.corpus_shards=2", "analysis.interval_blocks=0"]  # fmt: skip
    pending, client = run_job(*job, "extraction.corpus_shard=0")
    assert pending.layers == {}
    run = client.get_run(pending.run_id)
    assert run.info.status == "FINISHED"
    assert "extraction shard 0 of 2 saved" in run.data.tags["intraneuron.extraction_shard_pending"]
    assert "extraction_seconds" in run.data.metrics
    key = run.data.tags["cache_key.layer_0"]  # the whole profile's key, as an unsharded job's
    assert ProfileCache(cache_dir()).load(key) is None

    done, client = run_job(*job, "extraction.corpus_shard=1")
    assert list(done.layers) == [0]
    run = client.get_run(done.run_id)
    assert run.info.status == "FINISHED" and "intraneuron.extraction_shard_pending" not in run.data.tags
    assert run.data.tags["cache_key.layer_0"] == key
    assert ProfileCache(cache_dir()).load(key) is not None


@pytest.mark.parametrize("decimals", [0, 1, 3])
def test_topk_with_ties_equals_a_full_sort_by_value_then_position(decimals):
    from intraneuron.extraction.reducers import TopK

    generator = torch.Generator().manual_seed(decimals)
    K, D, batches = 20, 7, [50, 3, 120, 64]
    acts = torch.randn(sum(batches), D, generator=generator).round(decimals=decimals)  # [N, D], many ties
    acts[:, 0] = 1.0  # a column that is all one value
    stat, start = TopK(K, D), 0
    for size in batches:
        stat.add(acts[start : start + size], torch.arange(start, start + size))
        start += size
    values = acts.numpy()
    for d in range(D):
        order = np.lexsort((np.arange(len(values)), -values[:, d]))[:K]  # value descending, then position
        np.testing.assert_array_equal(stat.positions[:, d].numpy(), order)
        np.testing.assert_array_equal(stat.values[:, d].numpy(), values[order, d])
