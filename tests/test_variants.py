"""Surface variants of one word as one core unit, and the word-only pool: against brute-force
counts, means and vectors on planted profiles; the clustering finds the variant split when the
forms stay apart and no categories once they merge; the word-only pool keeps fragments out."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from sklearn.metrics import adjusted_rand_score

from intraneuron.analyses.two_fold.core_tokens import CoreTokensConfig
from intraneuron.analyses.two_fold.neuron import TwoFoldNeuron
from intraneuron.analyses.two_fold.variants import (
    VariantUnits,
    variant_key,
    variant_keys,
    word_pool,
)
from intraneuron.embeddings.sources import LayerInputEmbeddings, ModelEmbeddings, StaticEmbeddings
from intraneuron.errors import ConfigError
from tests.test_cross_fitting import SplitProfile, TopKProfile


def test_variants_are_case_and_leading_space_forms_of_a_word_and_space_forms_of_other_tokens():
    groups = [[" said", "said", " Said", "SAID", "\u0120said", "\u2581Said"], [" (", "("], [" 1", "1"],
              ["3D", " 3D"], ["3d"], [" Mrs", "Mrs", "mrs"], ["caf\u00e9", " Caf\u00e9"]]  # fmt: skip
    alone = [" ", "  ", "\n", " \n", "\ufffd", " \udce2", "  said"]  # whitespace, fragments, two spaces
    texts = [t for group in groups for t in group] + alone
    keys = variant_keys(texts)
    at = 0
    for group in groups:
        assert len(set(keys[at : at + len(group)])) == 1 and keys[at] >= 0, group
        at += len(group)
    assert len({keys[texts.index(g[0])] for g in groups}) == len(groups)  # groups stay apart
    assert (keys[at : at + len(alone) - 1] == -1).all()
    assert variant_key("  said") == " said"  # only one marker is removed: indentation is not a word start


def _planted_profile(rng, words=5, fillers=40, n_neurons=3):
    """Vocabulary: `words` words in three forms (" w", "w", " W") whose activations are high, and
    `fillers` single-form words below them; counts and means per half [2, T], [2, T, D]."""
    stems = [f"w{chr(97 + i)}" for i in range(words)]
    texts = [form for stem in stems for form in (f" {stem}", stem, f" {stem.capitalize()}")]
    texts += [f" f{chr(97 + i // 26)}{chr(97 + i % 26)}" for i in range(fillers)]
    T = len(texts)
    counts = rng.integers(5, 30, size=(2, T))
    counts[:, 1] = [1, 9]  # a form below min_count in one half still counts towards its word
    level = np.concatenate([np.repeat(5 + rng.random(words), 3), rng.random(fillers)])  # [T]
    means = level[None, :, None] + 0.3 * rng.normal(size=(2, T, n_neurons))
    type_ids = np.arange(T)
    return texts, SplitProfile(type_ids, counts, means.astype(np.float32))


def _brute_force_units(texts, counts, means):
    """key -> (form ids, per-half counts [2], per-half count-weighted means [2, D])."""
    units = {}
    for i, text in enumerate(texts):
        units.setdefault(text.strip().casefold(), []).append(i)
    out = {}
    for key, ids in units.items():
        c = counts[:, ids]  # [2, f]
        out[key] = (ids, c.sum(1), np.einsum("hf,hfd->hd", c, means[:, ids].astype(np.float64)) / c.sum(1)[:, None])
    return out


def test_a_neuron_whose_top_tokens_are_variants_gets_those_words_as_single_units():
    rng = np.random.default_rng(0)
    texts, profile = _planted_profile(rng)
    units = VariantUnits.from_profile(variant_keys(texts), profile)
    config = CoreTokensConfig(n=8, min_count=5, min_selectivity=0)
    expected = _brute_force_units(texts, profile.counts, profile.means)
    for core in config.select(profile, np.arange(3), units=units):
        words = [texts[i].strip().casefold() for i in core.token_ids]
        assert len(set(words)) == 8 and {f"w{chr(97 + i)}" for i in range(5)} <= set(words)
        chosen = sorted(expected.items(), key=lambda kv: -kv[1][2][0, core.neuron])[:8]
        assert {key for key, _ in chosen} == set(words)  # chosen on the even half's unit means
        for unit_id, word, act in zip(core.token_ids, words, core.acts, strict=True):
            ids, _, mean = expected[word]
            assert unit_id == max(ids, key=lambda i: (profile.counts[:, i].sum(), -i))  # its most frequent form
            assert act == pytest.approx(mean[1, core.neuron], rel=1e-6)  # measured on the odd half
    for half in (0, 1):  # a unit's count is the sum of its forms', the rare one's included
        _, counts, _ = units.merge(profile.type_ids, profile.counts[half], profile.means[half])
        np.testing.assert_array_equal(counts[:5], [expected[f"w{chr(97 + i)}"][1][half] for i in range(5)])
    apart = config.select(profile, np.arange(3))  # without units: the forms fill the core set
    assert all(len({texts[i].strip().casefold() for i in c.token_ids}) < 8 for c in apart)


def test_merging_changes_nothing_where_each_word_has_one_form():
    rng = np.random.default_rng(1)
    texts = [f" x{chr(97 + i // 26)}{chr(97 + i % 26)}" for i in range(60)]
    counts = rng.integers(5, 30, size=(2, 60))
    profile = SplitProfile(np.arange(60), counts, rng.normal(size=(2, 60, 4)).astype(np.float32))
    units = VariantUnits.from_profile(variant_keys(texts), profile)
    for cross_fit in (True, False):
        config = CoreTokensConfig(n=20, min_selectivity=0, cross_fit=cross_fit)
        for merged, apart in zip(config.select(profile, np.arange(4), units=units),
                                 config.select(profile, np.arange(4)), strict=True):  # fmt: skip
            np.testing.assert_array_equal(merged.token_ids, apart.token_ids)
            np.testing.assert_array_equal(merged.acts, apart.acts)


def _sources(rng, vocab, d, counts):
    matrix = rng.normal(size=(vocab, d)).astype(np.float32)
    resid_sum = rng.normal(size=(vocab, d)) * counts[:, None]
    return {
        "static": (StaticEmbeddings(matrix), matrix),
        "model_input": (ModelEmbeddings(matrix), matrix),
        "layer_input": (LayerInputEmbeddings(resid_sum, counts), resid_sum / counts[:, None]),
    }


@pytest.mark.parametrize("source", ["static", "model_input", "layer_input"])
def test_a_units_vector_is_the_count_weighted_mean_of_its_forms_vectors(source):
    rng = np.random.default_rng(2)
    texts, profile = _planted_profile(rng)
    total = profile.counts.sum(0)  # [T]
    embedding, rows = _sources(rng, len(texts), 6, total)[source]
    units = VariantUnits.from_profile(variant_keys(texts), profile)
    X, valid = units.embed(embedding.embed)(units.unit_ids)
    assert valid.all() and X.shape == (units.unit_ids.size, 6)
    for unit_id, vector in zip(units.unit_ids, X, strict=True):
        forms = [i for i, t in enumerate(texts) if t.strip().casefold() == texts[unit_id].strip().casefold()]
        expected = (rows[forms] * total[forms, None]).sum(0) / total[forms].sum()
        np.testing.assert_allclose(vector, expected, rtol=1e-5, atol=1e-6)
    if source == "layer_input":  # there: the mean layer input over all the word's occurrences
        forms = [0, 1, 2]
        resid_sum = rows * total[:, None]
        np.testing.assert_allclose(X[0], resid_sum[forms].sum(0) / total[forms].sum(), rtol=1e-5)


def test_a_form_the_source_cannot_embed_is_left_out_of_its_units_vector():
    texts = [" said", "said", " cat", "dog"]
    units = VariantUnits.build(variant_keys(texts), np.arange(4), np.array([30, 10, 5, 7]))
    matrix = np.arange(16, dtype=np.float32).reshape(4, 4)

    def embed(ids):  # "said" (id 1) is not in this source's vocabulary
        ids = np.asarray(ids)
        return matrix[ids] * (ids != 1)[:, None], ids != 1

    X, valid = units.embed(embed)(np.array([0, 2, 3]))
    np.testing.assert_array_equal(X, matrix[[0, 2, 3]])
    assert valid.all()
    X, valid = VariantUnits.build(variant_keys(texts), np.arange(4), np.array([5, 30, 5, 7])).embed(embed)(
        np.array([1]))  # fmt: skip
    assert valid.tolist() == [True] and np.array_equal(X[0], matrix[0])  # most frequent form 1, vector of 0


def test_occurrences_of_a_words_forms_merge_into_its_unit_at_their_mean_activation():
    texts = [" x", " said", "said", " cat", " Said"]
    token_ids = np.array([[2, 1, 3, 4, 1, 0]])
    values = np.array([[6.0, 5.0, 3.5, 3.0, 2.0, 1.0]])
    profile = TopKProfile(token_ids, values)
    units = VariantUnits.build(variant_keys(texts), np.arange(5), np.array([9, 50, 20, 9, 5]))
    (core,) = CoreTokensConfig(unit="occurrence", n=10, min_selectivity=0).select(profile, np.array([0]), units=units)
    assert core.token_ids.tolist() == [1, 3, 0]  # " said" names the unit: its most frequent form
    np.testing.assert_allclose(core.acts, [(6 + 5 + 3 + 2) / 4, 3.5, 1.0])
    assert units.describe(texts)(core.token_ids) == [" said (3 forms)", " cat", " x"]


# ---- the clustering: the variant split is found apart and disappears merged ----------------------

WORDS, FORMS, D = 30, 3, 32


def _variant_neuron(seed):
    """A neuron whose core tokens are 30 words in 3 forms each: word vectors isotropic (no
    categories), each form shifted by its own offset (as embeddings place " said" and "said"),
    activation a property of the word. Returns (texts, profile, embedding matrix, word vectors,
    word levels). Every form is offset: a form left at the words' centre, the origin here, is
    spread over the whole sphere by the L2 normalisation, and no longer a category there."""
    rng = np.random.default_rng(seed)
    stems = [f"v{chr(97 + i // 26)}{chr(97 + i % 26)}" for i in range(WORDS)]
    texts = [form for stem in stems for form in (f" {stem}", stem, f" {stem.capitalize()}")]
    words = rng.normal(size=(WORDS, D))
    offsets = 1.5 * rng.normal(size=(FORMS, D))
    matrix = (words[:, None] + offsets[None]).reshape(WORDS * FORMS, D).astype(np.float32)
    counts = np.stack([rng.poisson([20, 8, 4], size=(WORDS, FORMS)).reshape(-1) + 5 for _ in range(2)])
    level = rng.normal(size=WORDS)
    means = np.repeat(level, FORMS)[None, :, None] + 0.05 * rng.normal(size=(2, WORDS * FORMS, 1))
    return texts, SplitProfile(np.arange(len(texts)), counts, means.astype(np.float32)), matrix, words, level


def test_the_clustering_finds_only_the_variant_split_apart_and_no_categories_merged():
    neuron = TwoFoldNeuron(n_permutations=19, max_permutations=19, n_mantel_permutations=0)
    config = CoreTokensConfig(n=100, min_count=1, min_selectivity=0)
    k_apart, ari_apart, k_merged, k_words = [], [], [], []
    for seed in range(16):
        texts, profile, matrix, words, level = _variant_neuron(seed)
        source = ModelEmbeddings(matrix)
        (apart,) = config.select(profile, np.array([0]))
        result = neuron.analyse(apart.acts, source.embed(apart.token_ids)[0], seed=seed)
        k_apart.append(result.row["n_categories"])
        ari_apart.append(adjusted_rand_score(apart.token_ids % FORMS, result.token_labels))
        units = VariantUnits.from_profile(variant_keys(texts), profile)
        (merged,) = config.select(profile, np.array([0]), units=units)
        assert merged.token_ids.size == WORDS
        X, _ = units.embed(source.embed)(merged.token_ids)
        k_merged.append(neuron.analyse(merged.acts, X, seed=seed).row["n_categories"])
        k_words.append(neuron.analyse(level, words, seed=seed).row["n_categories"])  # the null: words alone
    assert np.mean(np.array(k_apart) >= 2) >= 0.9 and np.median(ari_apart) > 0.8  # "categories" = forms
    assert np.mean(np.array(k_merged) >= 2) <= np.mean(np.array(k_words) >= 2) + 0.1


# ---- the word-only pool ------------------------------------------------------------------------

# A byte-level BPE vocabulary: decoded texts and the tokenizer's own strings (Markdown's "##" is in
# SmolLM2's too: it does not make the vocabulary WordPiece)
BPE = [("<|endoftext|>", "<|endoftext|>"), (" said", "\u0120said"), ("said", "said"), ("ing", "ing"),
       (" walk", "\u0120walk"), ('"', '"'), ("The", "The"), ("\n", "\u010a"), (" 1", "\u01201"), (",", ","),
       ("ly", "ly"), (" don", "\u0120don"), ("'t", "'t"), (" quick", "\u0120quick"), ("##", "##")]  # fmt: skip
CORPUS = [[0, 6, 4, 3, 9, 5, 2, 13, 10, 7, 6, 1, 11, 12, 8, 9],
          [0, 1, 5, 2, 9, 4, 3, 7, 6, 13, 10, 5, 2, 1, 4, 3]]  # fmt: skip


def test_the_word_pool_keeps_word_initial_alphabetic_tokens_and_drops_fragments():
    texts, pieces = zip(*BPE, strict=True)
    pool = word_pool(texts, pieces, np.array(CORPUS))
    kept = {texts[i] for i in np.flatnonzero(pool)}
    # "said" follows a quote, "The" a newline or the window start: words; "ing", "ly" follow letters
    assert kept == {" said", "said", " walk", "The", " don", " quick"}


def test_the_word_pool_reads_sentencepiece_and_wordpiece_markers():
    # SentencePiece: a decoded "▁said" loses its space; the piece keeps the marker
    texts, pieces = ["said", "ing", "said"], ["\u2581said", "ing", "said"]
    corpus = np.array([[1, 0, 0, 2, 1]])  # every token follows a letter
    assert word_pool(texts, pieces, corpus).tolist() == [True, False, False]
    # WordPiece: "##" marks continuations, every other alphabetic piece begins a word
    texts = pieces = ["walk", "##ing", "the", "[CLS]", "1"]
    assert word_pool(texts, pieces, np.array([[0, 1, 2, 0, 1]])).tolist() == [True, False, True, False, False]


def test_a_neuron_whose_top_tokens_are_fragments_has_none_in_the_word_pool():
    texts, pieces = zip(*BPE, strict=True)
    T, rng = len(texts), np.random.default_rng(3)
    fragments = [3, 10, 12, 9]  # "ing", "ly", "'t", ","
    level = np.where(np.isin(np.arange(T), fragments), 10.0, rng.random(T))
    profile = SplitProfile(np.arange(T), np.full((2, T), 20), np.repeat(level[None, :, None], 2, 0).astype(np.float32))
    config = CoreTokensConfig(n=4, min_selectivity=0)
    (all_tokens,) = config.select(profile, np.array([0]), config.keep_mask(list(texts), [0]))
    assert set(all_tokens.token_ids) == set(fragments)
    words = CoreTokensConfig(n=4, min_selectivity=0, pool="words")
    keep = words.keep_mask(list(texts), [0], word_pool(texts, pieces, np.array(CORPUS)))
    (word_tokens,) = words.select(profile, np.array([0]), keep)
    assert not set(word_tokens.token_ids) & set(fragments) and len(word_tokens.token_ids) == 4
    with pytest.raises(ValueError, match="pool=words"):
        words.keep_mask(list(texts), [0])


@pytest.mark.parametrize(
    ("overrides", "key"),
    [({"pool": "subwords"}, "core_tokens.pool"), ({"merge_variants": "yes"}, "core_tokens.merge_variants")],
)
def test_bad_settings_name_their_key(overrides, key):
    with pytest.raises(ConfigError, match=key):
        CoreTokensConfig(**overrides).validate()


# ---- end to end: a tiny GPT-2 whose variants share one input embedding ------------------------------

E2E = ["corpus=tiny", "layer=0", "core_tokens.n=30", "core_tokens.min_count=2", "core_tokens.min_selectivity=0", "neurons=range",
       "neurons.stop=16", "extraction.pseudo_neurons=0", "analysis.n_permutations=19",
       "analysis.n_mantel_permutations=19", "analysis.n_jobs=1", "extraction.progress=false"]  # fmt: skip


def _word(text: str) -> str:
    """The test's own variant key for word tokens: one leading space off, case-folded."""
    return text.removeprefix(" ").casefold()


@pytest.fixture(scope="module")
def tied_variants(tiny_model_dirs, tmp_path_factory, job_cache):
    """Layer 0 of a tiny GPT-2 whose variants of one word share one input-embedding row (so their
    activations are alike and, kept apart, they come in pairs): per merge_variants setting the
    job, its analysis and the layer's profile and result."""
    from hydra import compose, initialize_config_dir
    from transformers import AutoTokenizer

    from intraneuron.config import validate
    from intraneuron.extraction import extract_profiles
    from intraneuron.extraction.cache import ProfileCache
    from intraneuron.models.loading import load_model
    from intraneuron.paths import CONF_DIR, cache_dir
    from intraneuron.runner import open_job

    handle = load_model(str(tiny_model_dirs["gpt2"]))
    texts = handle.tokenizer.batch_decode([[i] for i in range(handle.vocab_size)], clean_up_tokenization_spaces=False)
    keys = variant_keys(texts)
    order = np.argsort(keys, kind="stable")
    first = order[np.searchsorted(keys[order], keys[order])]  # [vocab] the first token of each key
    rows = order[keys[order] >= 0]
    weight = handle.model.get_input_embeddings().weight
    with torch.no_grad():
        weight[torch.from_numpy(rows)] = weight[torch.from_numpy(first[keys[order] >= 0])].clone()
    out = tmp_path_factory.mktemp("tied") / "gpt2"
    handle.model.save_pretrained(str(out))
    AutoTokenizer.from_pretrained(str(tiny_model_dirs["gpt2"])).save_pretrained(str(out))
    runs = {}
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("INTRANEURON_CACHE", str(job_cache))
        for merge in (False, True):
            with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
                cfg = compose("config", overrides=[f"model.source={out}", *E2E, f"core_tokens.merge_variants={merge}"])
            rc = validate(cfg)
            job = open_job(rc)
            rc.analysis.prepare(job)
            profile = extract_profiles(job.handle, job.windows, [0], rc.extraction, ProfileCache(cache_dir()),
                                       stats=rc.analysis.requirements(rc).stats)[0]  # fmt: skip
            runs[merge] = (job, rc.analysis, profile, rc.analysis.analyse_layer(job, 0, profile))
    return runs


def _core_tokens(analysis, job, profile, neuron) -> list[tuple[str, float]]:
    """A neuron's core tokens as its card shows them: (display text, activation)."""
    view = analysis.neuron_view(job, 0, profile, neuron)
    return [token for group in view.token_groups.values() for token in group]


def test_end_to_end_a_words_forms_are_one_core_unit_at_their_pooled_mean(tied_variants):
    job, analysis, profile, result = tied_variants[True]
    neurons = result.tables["neurons"]
    assert len(neurons) == 16 and (neurons["skipped"] == "").all()
    assert neurons["core_preview"].str.contains(r" \(\d forms\)").all()
    type_ids, counts, means = profile.split_type_stats()  # [T], [2, T], [2, T, D]
    texts = [job.token_texts[i] for i in type_ids]
    for neuron in range(0, 16, 5):
        tokens = _core_tokens(analysis, job, profile, neuron)
        shown = [text.split(" (")[0] if text.endswith(" forms)") else text for text, _ in tokens]
        assert len({_word(t) for t in shown}) == len(shown) == 30  # one core unit per word
        for (text, act), form in zip(tokens, shown, strict=True):
            if not form.strip().isalpha():
                continue
            forms = [i for i, t in enumerate(texts) if t.strip() == t.removeprefix(" ") and _word(t) == _word(form)]
            assert text.endswith(f" ({len(forms)} forms)") or len(forms) == 1
            # measured on the odd windows over all the word's occurrences
            pooled = counts[1, forms] @ np.nan_to_num(means[1, forms, neuron]) / counts[1, forms].sum()
            assert act == pytest.approx(pooled, rel=1e-5, abs=1e-6)


def test_end_to_end_kept_apart_the_tied_forms_come_in_pairs(tied_variants):
    job, analysis, profile, _ = tied_variants[False]
    paired = []
    for neuron in range(0, 16, 5):
        shown = [text for text, _ in _core_tokens(analysis, job, profile, neuron)]
        assert not any(text.endswith(" forms)") for text in shown)
        words = [_word(t) for t in shown if t.strip().isalpha()]
        paired.append(len(words) > len(set(words)))
    assert np.mean(paired) >= 0.75
