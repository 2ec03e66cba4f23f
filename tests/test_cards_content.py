"""What a neuron card adds to its tokens and top contexts, checked against brute force: the tokens
its output promotes and suppresses (the product of the processed weights, recomputed here from the
model's own parameters), its lowest activating contexts (against the activations of every token of
the corpus), its one-line summary, and how all of it renders (escaped)."""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pytest
import torch

from intraneuron.extraction import extract_profiles
from intraneuron.extraction.config import ExtractionConfig
from intraneuron.extraction.contexts import window_activations
from intraneuron.reports.cards import Context, NeuronCard, category_summary
from intraneuron.reports.config import ReportConfig
from intraneuron.reports.contexts import SEARCH, card_contexts, search_windows
from intraneuron.reports.logit_tokens import LogitTokens, logit_tokens, output_logits
from tests.test_cards import assert_self_contained_and_inert

# ---- promoted and suppressed tokens: the processed product, by brute force --------------------------


def brute_force_logits(model, arch: str, layer: int) -> np.ndarray:
    """[d_mlp, vocab] float64: TransformerLens' processing spelled out on the raw parameters.
    LayerNorm (GPT-2): W_U = diag(g) W_U centred over d_model, w_out centred over d_model;
    RMSNorm (Llama): W_U = diag(g) W_U. Then W_U centred over the vocabulary, and w_out @ W_U."""
    params = {name: p.detach().double().numpy() for name, p in model.named_parameters()}
    W_U = params["lm_head.weight"].T if "lm_head.weight" in params else None  # [d_model, vocab]
    if arch == "gpt2":
        W_U = W_U if W_U is not None else params["transformer.wte.weight"].T  # tied
        w_out = params[f"transformer.h.{layer}.mlp.c_proj.weight"]  # Conv1D [d_mlp, d_model]
        W_U = params["transformer.ln_f.weight"][:, None] * W_U
        W_U = W_U - W_U.mean(0, keepdims=True)
        w_out = w_out - w_out.mean(1, keepdims=True)
    else:
        w_out = params[f"model.layers.{layer}.mlp.down_proj.weight"].T  # Linear [d_model, d_mlp] -> rows
        W_U = params["model.norm.weight"][:, None] * W_U
    W_U = W_U - W_U.mean(1, keepdims=True)
    return w_out @ W_U


@pytest.mark.parametrize("arch", ["gpt2", "llama"])
def test_promoted_and_suppressed_tokens_are_those_of_the_brute_force_product(tiny_model_dirs, arch):
    from intraneuron.models.loading import load_model

    handle = load_model(str(tiny_model_dirs[arch]))
    layer, neurons, k = 1, [0, 7, 31, 95], 10
    with torch.no_grad():  # make the norms' gains matter: random models leave them at 1
        for name, p in handle.model.named_parameters():
            if name in ("transformer.ln_f.weight", "model.norm.weight"):
                p.copy_(torch.linspace(0.2, 3.0, p.numel()))
    expected = brute_force_logits(handle.model, arch, layer)[neurons]  # [m, vocab]
    np.testing.assert_allclose(output_logits(handle, layer, neurons).numpy(), expected, rtol=1e-4, atol=1e-5)
    texts = [f"t{i}" for i in range(expected.shape[1])]  # token ids as text: the comparison is by id
    found, why = logit_tokens(handle, layer, neurons, texts, k)
    assert why == "" and list(found) == neurons
    for row, neuron in zip(expected, neurons, strict=True):
        top, bottom = np.argsort(-row, kind="stable")[:k], np.argsort(row, kind="stable")[:k]
        assert [t for t, _ in found[neuron].promoted] == [f"t{i}" for i in top]
        assert [t for t, _ in found[neuron].suppressed] == [f"t{i}" for i in bottom]
        np.testing.assert_allclose([v for _, v in found[neuron].promoted], row[top], rtol=1e-4)
        np.testing.assert_allclose([v for _, v in found[neuron].suppressed], row[bottom], rtol=1e-4)
        assert row[top[-1]] > 0 > row[bottom[-1]]  # promoted above the mean token, suppressed below


def test_an_encoder_has_no_promoted_tokens_and_says_why(tiny_model_dirs):
    from intraneuron.models.loading import load_model

    handle = load_model(str(tiny_model_dirs["bert"]))
    found, why = logit_tokens(handle, 0, [1, 2], [""] * handle.vocab_size, 10)
    assert found == {} and "no direct path to the logits" in why and "no unembedding" in why


# ---- lowest contexts: the search against every token's activation -----------------------------------

SETTINGS = ExtractionConfig(top_k=16, input_site=None, pseudo_neurons=0, skip_first_positions=1, progress=False)


@pytest.fixture(scope="module")
def corpus_acts(tiny_gpt2, small_windows):
    """A job-like object, its layer-1 profile, and every token's activation [W, T, D] (brute force)."""
    profile = extract_profiles(tiny_gpt2, small_windows, [1], SETTINGS, cache=None,
                               stats={"topk", "token_types", "moments"})[1]  # fmt: skip
    ids = np.asarray(small_windows.ids, dtype=np.int64)  # [W, T]
    acts = window_activations(tiny_gpt2, ids, 1, SETTINGS.site, np.arange(profile.d_mlp))  # [W, T, D]
    texts = [f"t{i}" for i in range(tiny_gpt2.vocab_size)]
    job = SimpleNamespace(handle=tiny_gpt2, windows=small_windows, token_texts=texts,
                          run=SimpleNamespace(extraction=SETTINGS))  # fmt: skip
    return job, profile, ids, acts


def test_lowest_contexts_are_the_lowest_of_the_windows_searched_and_read_true_activations(corpus_acts):
    job, profile, ids, acts = corpus_acts
    report = ReportConfig(contexts=3, lowest_contexts=4, context_tokens=5)
    neurons = list(range(0, profile.d_mlp, 9))
    found = card_contexts(job, 1, profile, neurons, report)
    skip = SETTINGS.skip_first_positions
    for neuron in neurons:
        windows, _ = search_windows(ids, profile, neuron, SEARCH * report.lowest_contexts, (report.seed, 1, neuron))
        # brute force: each searched window's lowest counted position, the 4 lowest of those
        per_window = acts[windows, skip:, neuron]  # [s, T - skip]
        lowest = np.sort(per_window.min(1))[: report.lowest_contexts]
        shown = found.lowest[neuron]
        np.testing.assert_allclose([c.activation for c in shown], lowest, atol=1e-5)
        assert len({c.window for c in shown}) == len(shown)  # one per window
        for c in shown:
            assert c.position >= skip and c.window in windows
            assert c.activation == pytest.approx(acts[c.window, c.position, neuron], abs=1e-5)
            lo = c.position - c.focus
            np.testing.assert_allclose(c.acts, acts[c.window, lo : lo + len(c.acts), neuron], atol=1e-5)
            assert c.tokens == [f"t{t}" for t in ids[c.window, lo : lo + len(c.tokens)]]
        assert f"the corpus minimum is {acts[:, skip:, neuron].min():.3g}" in found.lowest_note[neuron]
        # the top contexts are unchanged: the profile's top-k, read back from the same re-run
        for c in found.top[neuron]:
            assert c.activation == pytest.approx(acts[c.window, c.position, neuron], abs=1e-4)


def test_the_search_starts_at_the_lowest_mean_token_types_and_finds_a_minimum_they_hold(corpus_acts):
    """Planted by the data: where the corpus minimum lies on a token type whose every occurrence sits
    in one window and that is among the lowest-mean types searched, the card must show it; over all
    neurons, how often the search finds the exact corpus minimum is printed."""
    job, profile, ids, acts = corpus_acts
    skip, n_lowest = SETTINGS.skip_first_positions, 2
    counted = acts[:, skip:, :]  # [W, T - skip, D]
    tokens = ids[:, skip:]  # [W, T - skip]
    types, inverse = np.unique(tokens, return_inverse=True)
    sums = np.zeros((types.size, acts.shape[2]))
    np.add.at(sums, inverse.ravel(), counted.reshape(-1, acts.shape[2]))
    means = sums / np.bincount(inverse.ravel())[:, None]  # [types, D] brute-force type means
    found = card_contexts(job, 1, profile, list(range(profile.d_mlp)), ReportConfig(contexts=0, lowest_contexts=n_lowest))
    bare = SimpleNamespace(tensors={k: v for k, v in profile.tensors.items() if not k.startswith("type_")})
    guaranteed = exact = by_chance = 0
    for neuron in range(profile.d_mlp):
        drawn, _ = search_windows(ids, bare, neuron, SEARCH * n_lowest, (0, 1, neuron))
        by_chance += counted[drawn, :, neuron].min() == counted[:, :, neuron].min()
        windows, how = search_windows(ids, profile, neuron, SEARCH * n_lowest, (0, 1, neuron))
        lowest_type = types[np.argmin(means[:, neuron])]
        assert lowest_type in ids[windows[0]] and "lowest-mean token types" in how
        w, p = np.unravel_index(np.argmin(counted[:, :, neuron]), counted.shape[:2])
        minimum = counted[w, p, neuron]
        t = tokens[w, p]
        rank = np.flatnonzero(types[np.argsort(means[:, neuron], kind="stable")] == t)[0]
        shown = found.lowest[neuron][0].activation
        exact += shown == pytest.approx(minimum, abs=1e-5)
        if rank < SEARCH * n_lowest and np.unique(np.nonzero(ids == t)[0]).size == 1:
            guaranteed += 1
            assert shown == pytest.approx(minimum, abs=1e-5), neuron
    print(f"\nexact corpus minimum found for {exact} of {profile.d_mlp} neurons (in as many random windows: "
          f"{by_chance}); guaranteed for {guaranteed}")
    assert guaranteed >= 5  # the guarantee was exercised
    assert exact > 2 * by_chance  # the type table points the search where the minima are


def test_without_a_type_table_the_windows_searched_are_drawn_at_random_reproducibly(corpus_acts):
    job, profile, ids, acts = corpus_acts
    bare = SimpleNamespace(tensors={k: v for k, v in profile.tensors.items() if not k.startswith("type_")})
    first, how = search_windows(ids, bare, 3, 8, (0, 1, 3))
    assert first == search_windows(ids, bare, 3, 8, (0, 1, 3))[0] != search_windows(ids, bare, 3, 8, (0, 1, 4))[0]
    assert len(set(first)) == 8 and "at random" in how


# ---- summary and rendering ---------------------------------------------------------------------------


def test_the_category_summary_names_the_highest_and_lowest_group():
    groups = {"b": [("x", 1.0), ("y", 3.0)], "a": [("z", 5.0)], "c": [("w", 0.5), ("v", 0.5), ("u", 0.5)]}
    assert category_summary(groups, "differentiated p=0.001") == (
        "3 categories; top: 'a' (1 tokens, mean 5) vs 'c' (3 tokens, mean 0.5); differentiated p=0.001")
    assert category_summary({"top activating tokens": [("x", 2.0)]}) == "1 group; 'top activating tokens' (1 tokens, mean 2)"


def test_a_card_renders_its_output_tokens_lowest_contexts_density_and_summary_escaped():
    from intraneuron.reports.card_html import render_card

    evil = "<script>alert(1)</script>"
    logits = LogitTokens(promoted=[(evil, 2.5), (" the", 1.0)], suppressed=[("<b>", -3.0), ("\n", -0.5)])
    low = Context(activation=-0.4, window=3, position=2, tokens=["a", "<i>", "c"], acts=[0.1, -0.4, 0.0], focus=1)
    card = NeuronCard(layer=1, neuron=4, reason="random", subtitle="tiny", stats={}, key_stats=[],
                      token_groups={"g": [("x", 1.0)]}, note="", contexts=[], scale=1.0,
                      summary="1 group; <summary>", contrast="Core tokens are <types>.", density=0.1234,
                      n_tokens=123456, logits=logits, lowest=[low], lowest_note="the lowest of 8 windows")  # fmt: skip
    tags = assert_self_contained_and_inert(render_card(card))
    text = "".join(tags.text)
    chips = [a for n, a in tags.tags if n == "span" and a.get("class") == "logit"]
    assert [float(a["data-logit"]) for a in chips] == [2.5, 1.0, -3.0, -0.5]
    assert evil in text and "<b>" in text and "↵" in text
    assert "1 group; <summary>" in text and "Core tokens are <types>." in text
    assert "12.3% of 123,456 tokens" in text and "the lowest of 8 windows" in text
    assert sum(1 for n, a in tags.tags if n == "span" and "ctx-tok" in a.get("class", "")) == 3
