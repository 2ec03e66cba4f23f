"""Neuron cards: which neurons get one, what a card shows (checked against the run's tables and the
streaming profile), that token text is escaped and nothing loads from the network, and that
`show --neuron` rebuilds the same card for a neuron the run did not card."""

from __future__ import annotations

import html.parser
import re
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from mlflow.artifacts import download_artifacts

from intraneuron.reports import artifacts
from intraneuron.reports.card_html import render_card, render_index, render_table
from intraneuron.reports.cards import Context, NeuronCard, select_neurons
from intraneuron.reports.config import ReportConfig

TINY = ["model=tiny-gpt2", "corpus=tiny", "corpus.max_tokens=8192", "layer=[0,1]",
        "core_tokens.n=30", "core_tokens.min_count=2", "neurons=range", "neurons.stop=24", "extraction.pseudo_neurons=16",
        "analysis.n_permutations=19", "analysis.n_mantel_permutations=19", "extraction.progress=false",
        # a random tiny model has no categories (the gap statistic says K = 1): K >= 2 by silhouette
        # and no selectivity floor give every card its category figures
        "clustering.k_choice=silhouette", "core_tokens.min_selectivity=0"]  # fmt: skip
PNG = b"\x89PNG\r\n\x1a\n"


# ---- selection ----------------------------------------------------------------------------------


def neurons_table(values) -> pd.DataFrame:
    return pd.DataFrame({"neuron": np.arange(len(values)) * 3, "score": values})


def test_the_top_neurons_are_those_of_a_full_sort_and_nan_is_never_top():
    rng = np.random.default_rng(0)
    values = rng.normal(size=50)
    values[[4, 9]] = np.nan
    table = neurons_table(values)
    chosen = select_neurons(table, ReportConfig(top=5, random=0), "score")
    expected = table.dropna().sort_values("score", ascending=False)["neuron"].head(5).tolist()
    assert list(chosen) == expected
    assert all(reason.startswith(f"top {i} by score") for i, reason in enumerate(chosen.values(), start=1))


def test_asked_for_neurons_come_first_and_are_not_counted_twice():
    table = neurons_table(np.arange(10.0))  # neuron 27 has the largest score
    chosen = select_neurons(table, ReportConfig(neurons=[27, 3], top=2, random=0), "score")
    assert list(chosen) == [27, 3, 24, 21]
    assert chosen[27].startswith("asked for")


def test_random_neurons_are_seeded_distinct_and_drawn_from_the_rest():
    table = neurons_table(np.arange(40.0))
    report = ReportConfig(top=3, random=4, seed=1)
    first, again = select_neurons(table, report, "score", (0,)), select_neurons(table, report, "score", (0,))
    assert first == again
    randoms = [n for n, why in first.items() if why == "random"]
    assert len(randoms) == 4 and len(set(first)) == 7
    assert set(randoms) <= set(table["neuron"]) - {117, 114, 111}
    other_layer = select_neurons(table, report, "score", (1,))
    assert [n for n, w in other_layer.items() if w == "random"] != randoms


def test_a_table_smaller_than_the_selection_cards_every_neuron_once():
    table = neurons_table([1.0, 2.0])
    assert sorted(select_neurons(table, ReportConfig(top=3, random=5), "score")) == [0, 3]


# ---- HTML: escaped, self-contained ----------------------------------------------------------------


class Tags(html.parser.HTMLParser):
    """Every start tag with its attributes, and the page's text."""

    def __init__(self):
        super().__init__()
        self.tags: list[tuple[str, dict]] = []
        self.text: list[str] = []

    def handle_starttag(self, tag, attrs):
        self.tags.append((tag, dict(attrs)))

    def handle_data(self, data):
        self.text.append(data)


def parse(page: str) -> Tags:
    tags = Tags()
    tags.feed(page)
    return tags


def hostile_card() -> NeuronCard:
    evil = "<script>alert(1)</script>"
    tokens = [(evil, 2.0), ('"><img src=http://example.com/x.png>', 1.0), (" the", 0.5), ("\n", -0.2)]
    context = Context(activation=2.0, window=0, position=1, tokens=["a", evil, "</span>"],
                      acts=[0.1, 2.0, -0.3], focus=1)  # fmt: skip
    return NeuronCard(
        layer=2, neuron=7, reason="asked for <b>", subtitle="tiny <model>", stats={"score<": 1.5, "note": evil},
        key_stats=["score<"], token_groups={"category <i>": tokens}, note="<u>", contexts=[context],
        scale=2.0, figures={"histogram": PNG + b"\0" * 64},
    )  # fmt: skip


def assert_self_contained_and_inert(page: str) -> Tags:
    tags = parse(page)
    names = [name for name, _ in tags.tags]
    assert "script" not in names and "iframe" not in names and "link" not in names
    for _, attrs in tags.tags:
        for key in ("src", "srcset", "data", "action"):
            assert key not in attrs or attrs[key].startswith("data:"), attrs
        href = attrs.get("href")
        assert href is None or not re.match(r"^\s*(https?:|//|javascript:)", href), href
        assert not any(k.startswith("on") for k in attrs), attrs
    assert "url(" not in page and "@import" not in page
    csp = [a for n, a in tags.tags if n == "meta" and a.get("http-equiv") == "Content-Security-Policy"]
    assert csp and "default-src 'none'" in csp[0]["content"]
    return tags


def test_a_card_shows_hostile_token_text_as_text_and_loads_nothing():
    page = render_card(hostile_card())
    tags = assert_self_contained_and_inert(page)
    text = "".join(tags.text)
    assert "<script>alert(1)</script>" in text  # shown, as text
    assert '"><img src=http://example.com/x.png>' in text
    assert "category <i>" in text and "tiny <model>" in text and "score<" in text
    assert sum(1 for n, a in tags.tags if n == "span" and a.get("class") == "tok") == 4
    assert sum(1 for n, a in tags.tags if n == "span" and "ctx-tok" in a.get("class", "")) == 3
    assert "↵" in text  # a newline token is visible
    (heading,) = [a for n, a in tags.tags if a.get("id") == "neuron-id"]
    assert heading["data-layer"] == "2" and heading["data-neuron"] == "7"


def test_the_index_and_the_table_pages_escape_too():
    card = hostile_card()
    index = render_index([card], "cards <of> run", "sub<title>", [(2, "../layer_2/tables/neurons.html")])
    tags = assert_self_contained_and_inert(index)
    assert [a["href"] for n, a in tags.tags if n == "a"] == ["L2_N7.html", "../layer_2/tables/neurons.html"]
    assert "cards <of> run" in "".join(tags.text)
    table = render_table(pd.DataFrame({"neuron": [1], "core_preview": ["<script>x</script>"]}), "t<")
    assert "<script>x</script>" in "".join(assert_self_contained_and_inert(table).text)


def test_shading_is_proportional_to_activation_and_signed():
    from intraneuron.reports.card_html import shade

    assert shade(2.0, 2.0) == "rgba(214,39,40,1.000)"
    assert shade(-1.0, 2.0) == "rgba(31,119,180,0.500)"
    assert shade(5.0, 2.0).endswith("1.000)")  # clipped
    assert shade(float("nan"), 2.0) == "transparent"


# ---- cards of a real run ---------------------------------------------------------------------------


@pytest.fixture(scope="module")
def carded_run(tmp_path_factory):
    """A tiny two-fold job asking for neuron 5 plus the default top 3 and 2 random per layer."""
    from hydra import compose, initialize_config_dir
    from mlflow import MlflowClient

    from intraneuron.cli import run_job
    from intraneuron.paths import CONF_DIR

    folder = tmp_path_factory.mktemp("cards")
    uri = f"sqlite:///{folder}/mlflow.db"
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("INTRANEURON_CACHE", str(tmp_path_factory.getbasetemp() / "cards-cache"))
        with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
            cfg = compose("config", overrides=[*TINY, "report.neurons=[5]", f"tracking.tracking_uri={uri}"])
        summary = run_job(cfg)
        client = MlflowClient(uri)
        out = Path(download_artifacts(run_id=summary.run_id, artifact_path="", tracking_uri=uri,
                                      dst_path=str(folder / "artifacts")))  # fmt: skip
        yield summary, client, out, cfg


def card_pages(out: Path) -> dict[tuple[int, int], str]:
    pages = {}
    for path in sorted((out / "cards").glob("L*_N*.html")):
        layer, neuron = map(int, re.fullmatch(r"L(\d+)_N(\d+)", path.stem).groups())
        pages[layer, neuron] = path.read_text()
    return pages


def test_each_layer_has_the_asked_top_and_random_cards_and_an_index(carded_run):
    summary, client, out, _ = carded_run
    pages = card_pages(out)
    for layer in (0, 1):
        table = pd.read_parquet(out / artifacts.table_path(layer, "neurons"))
        carded = sorted(n for l, n in pages if l == layer)
        assert len(carded) == 6 and 5 in carded  # 1 asked + 3 top + 2 random
        ranked = table.dropna(subset=["epsilon2"]).sort_values(["epsilon2", "neuron"], ascending=[False, True])
        top = [n for n in ranked["neuron"] if n != 5][:3]
        assert set(top) <= set(carded)
    index = parse((out / artifacts.CARD_INDEX).read_text())
    links = {a["href"] for n, a in index.tags if n == "a" and a["href"].endswith(".html")}
    assert {f"L{l}_N{n}.html" for l, n in pages} <= links
    assert (out / artifacts.table_html_path(0, "neurons")).is_file()


def test_a_card_shows_the_neurons_core_tokens_and_its_row(carded_run):
    _, _, out, _ = carded_run
    for (layer, neuron), page in card_pages(out).items():
        table = pd.read_parquet(out / artifacts.table_path(layer, "neurons")).set_index("neuron")
        tags = assert_self_contained_and_inert(page)
        chips = [a for n, a in tags.tags if n == "span" and a.get("class") == "tok"]
        row = table.loc[neuron]
        assert len(chips) == int(row["n_core"] - row["n_unembedded"])  # every core token, grouped
        acts = sorted((float(a["data-act"]) for a in chips), reverse=True)
        if row["skipped"] == "":
            assert acts[0] == pytest.approx(row["act_max"], rel=1e-5)
            assert acts[-1] == pytest.approx(row["act_min"], rel=1e-5)
        text = "".join(tags.text)
        assert f"{row['epsilon2']:.4g}" in text or np.isnan(row["epsilon2"])


def test_context_shading_at_the_occurrence_equals_the_streamed_top_k_value(carded_run):
    _, _, out, _ = carded_run
    checked = 0
    for page in card_pages(out).values():
        for block in re.findall(r'<div class="context"><span class="act">([-\d.]+)</span>(.*?)</div>', page):
            focus = re.findall(r'ctx-tok focus" style="[^"]*" title="([^"]+)"', block[1])
            assert len(focus) == 1
            assert float(focus[0]) == pytest.approx(float(block[0]), abs=2e-3)  # re-run == stream
            checked += 1
    assert checked >= 20


def test_each_cards_figures_are_at_the_root_and_the_same_images(carded_run):
    _, _, out, _ = carded_run
    names = ("activation_by_category", "homogeneity_by_segment", "projection", "histogram")
    for (layer, neuron), page in card_pages(out).items():
        for name in names:
            png = (out / artifacts.neuron_figure_path(layer, neuron, name)).read_bytes()
            assert png.startswith(PNG) and len(png) > 5_000
            import base64

            assert base64.b64encode(png).decode() in page


def test_every_figure_of_the_run_is_titled_with_model_layer_analysis_and_setting(carded_run):
    """Layer figures (L<l>_<name>.png) and card figures (L<l>_N<n>_<name>.png) alike: the title's
    first line, kept as the PNG's Title metadata, names where the figure comes from."""
    from intraneuron.config import validate
    from intraneuron.reports.figure_titles import png_title

    _, _, out, cfg = carded_run
    rc = validate(cfg)
    setting = rc.analysis.setting(rc)
    assert setting == "ward, K by silhouette, top 30 types"
    figures = sorted(out.glob("L*.png"))
    assert len(figures) > 20
    for path in figures:
        layer, neuron = re.match(r"L(\d+)(?:_N(\d+))?_", path.name).groups()
        first = png_title(path.read_bytes()).splitlines()[0]
        where = f"layer {layer} · neuron {neuron}" if neuron else f"layer {layer}"
        assert first == f"tiny-gpt2 · {where} · two_fold · {setting}", path.name


def test_a_card_shows_its_summary_density_output_tokens_and_lowest_contexts(carded_run):
    """Against the run's own tables: the summary's p is the row's Kruskal-Wallis p; the promoted
    and suppressed tokens are report.logit_tokens each, in order; the lowest contexts ascend."""
    _, _, out, _ = carded_run
    for (layer, neuron), page in card_pages(out).items():
        row = pd.read_parquet(out / artifacts.table_path(layer, "neurons")).set_index("neuron").loc[neuron]
        tags = assert_self_contained_and_inert(page)
        text = "".join(tags.text)
        (summary,) = re.findall(r'<p class="summary">(.*?)</p>', page)
        if row["skipped"]:
            assert summary.startswith("skipped: ")
        elif row["topdown_skipped"]:
            assert summary.startswith("no categories: ")
        else:
            assert summary.startswith(f"{int(row['n_categories'])} categories; top: ")
            assert summary.endswith(f"differentiated p={row['kruskal_p']:.2g} (Kruskal-Wallis, epsilon2 {row['epsilon2']:.2f})")
        assert re.search(r"Active \(&gt; 0\) on <b>\d+\.\d% of 8,\d{3} tokens</b>", page)
        assert "Core tokens are token types ranked by their mean activation" in text
        logits = [float(a["data-logit"]) for n, a in tags.tags if n == "span" and a.get("class") == "logit"]
        promoted, suppressed = logits[:10], logits[10:]
        assert len(suppressed) == 10 and promoted == sorted(promoted, reverse=True) and suppressed == sorted(suppressed)
        assert promoted[-1] > suppressed[-1]
        lowest = page[page.index('<section id="lowest">'):]
        values = [float(v) for v in re.findall(r'<div class="context"><span class="act">([-\d.]+)</span>', lowest)]
        assert len(values) == 4 and values == sorted(values)
        assert "lowest-mean token types; the corpus minimum is" in lowest


def test_show_neuron_rebuilds_the_card_the_run_logged(carded_run, tmp_path):
    """The card rebuilt from the run's config (what `show --neuron` does for a neuron the run did
    not card) is byte for byte the one the run logged: same tokens, contexts, statistics, figures."""
    from intraneuron.runner import neuron_cards

    summary, _, out, cfg = carded_run
    table = pd.read_parquet(out / artifacts.table_path(1, "neurons"))
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("INTRANEURON_CACHE", str(out.parent.parent / "cards-cache"))
        (card,) = neuron_cards(cfg, 1, [5], table)
    rebuilt = render_card(card)
    assert rebuilt == card_pages(out)[1, 5]


def test_a_neuron_beyond_the_layer_is_refused_after_loading(run_job):
    from intraneuron.errors import ConfigError

    with pytest.raises(ConfigError, match=r"report\.neurons.*d_mlp=128"):
        run_job(*TINY, "report.neurons=[500]")


def test_neuron_stats_cards_group_the_top_tokens_and_rank_by_kurtosis(run_job, tmp_path):
    summary, client = run_job("analysis=neuron_stats", *TINY[:3], "layer=0", "neurons=range",
                              "neurons.stop=16", "report.random=0", "extraction.progress=false")  # fmt: skip
    local = Path(download_artifacts(run_id=summary.run_id, artifact_path="cards", tracking_uri=client.tracking_uri,
                                    dst_path=str(tmp_path)))  # fmt: skip
    table = pd.read_parquet(download_artifacts(run_id=summary.run_id, tracking_uri=client.tracking_uri,
                                               artifact_path=artifacts.table_path(0, "neurons")))  # fmt: skip
    expected = table.sort_values("kurtosis", ascending=False)["neuron"].head(3)
    assert sorted(int(p.stem.split("_N")[1]) for p in local.glob("L0_N*.html")) == sorted(expected)
    page = next(local.glob("L0_N*.html")).read_text()
    assert "top activating tokens" in page and "Top activating contexts" in page


# ---- in a real browser -------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def chromium():
    import os

    from intraneuron.reports import browser

    if browser.find_chromium() is None:
        if os.environ.get("CI"):
            pytest.fail("no chromium on PATH: scripts/setup.sh should have installed Debian's chromium")
        pytest.skip("chromium is not installed (scripts/setup.sh installs it)")
    return browser


def rendered_tokens(dom: str, css_class: str) -> int:
    return len(re.findall(rf'<span class="{css_class}[" ]', dom))


def test_chromium_renders_a_card_and_the_index_from_disk(carded_run, chromium, tmp_path):
    """Offline headless Chromium opens the logged files: the page shows the neuron's id and every
    core token and context token the run's tables say it should, and screenshots are real images."""
    _, _, out, _ = carded_run
    (layer, neuron), _ = next(iter(card_pages(out).items()))
    card = out / "cards" / f"L{layer}_N{neuron}.html"
    dom = chromium.dump_dom(card)
    row = pd.read_parquet(out / artifacts.table_path(layer, "neurons")).set_index("neuron").loc[neuron]
    assert f"Layer {layer} · neuron {neuron}" in dom
    assert rendered_tokens(dom, "tok") == int(row["n_core"] - row["n_unembedded"])
    assert rendered_tokens(dom, "ctx-tok") > 0
    assert dom.count("<img ") == 4
    shot = chromium.screenshot(card, tmp_path / "card.png", size=(1200, 1600))
    assert shot.read_bytes().startswith(PNG) and shot.stat().st_size > 50_000

    index = chromium.dump_dom(out / artifacts.CARD_INDEX)
    assert len(re.findall(r'<a href="L\d+_N\d+\.html">neuron \d+</a>', index)) == len(card_pages(out))


def test_in_chromium_a_script_token_stays_text(chromium, tmp_path):
    page = tmp_path / "hostile.html"
    page.write_text(render_card(hostile_card()), encoding="utf-8")
    dom = chromium.dump_dom(page)
    assert "&lt;script&gt;alert(1)&lt;/script&gt;" in dom
    assert "<title>L2 N7 · tiny &lt;model&gt;</title>" in dom  # no script ran to change anything
    assert rendered_tokens(dom, "tok") == 4 and "<img src=\"http" not in dom


def test_a_carded_neurons_figures_plot_the_runs_own_tables(carded_run):
    """The neuron view rebuilt from the run's config draws exactly what the run logged for that
    neuron: category means = its rows of `categories`, segment homogeneity and null = its rows of
    `segments`, one projected point per core token."""
    from intraneuron.config import validate
    from intraneuron.extraction import extract_profiles
    from intraneuron.extraction.cache import ProfileCache
    from intraneuron.paths import cache_dir
    from intraneuron.runner import open_job

    _, _, out, cfg = carded_run
    layer = 1
    categories = pd.read_parquet(out / artifacts.table_path(layer, "categories"))
    segments = pd.read_parquet(out / artifacts.table_path(layer, "segments"))
    table = pd.read_parquet(out / artifacts.table_path(layer, "neurons")).set_index("neuron")
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("INTRANEURON_CACHE", str(out.parent.parent / "cards-cache"))
        rc = validate(cfg)
        job = open_job(rc)
        rc.analysis.prepare(job)
        profile = extract_profiles(job.handle, job.windows, [layer], rc.extraction, ProfileCache(cache_dir()),
                                   stats=rc.analysis.requirements(rc).stats)[layer]  # fmt: skip
    carded = sorted(n for l, n in card_pages(out) if l == layer)
    checked = 0
    for neuron in carded:
        if table.loc[neuron, "topdown_skipped"] != "":
            continue
        figures = rc.analysis.neuron_view(job, layer, profile, neuron).figures
        by_category = figures["activation_by_category"].intraneuron_data
        logged = categories[categories["neuron"] == neuron].sort_values(["mean", "category"])
        np.testing.assert_allclose(by_category["mean"], logged["mean"])
        by_segment = figures["homogeneity_by_segment"].intraneuron_data
        logged = segments[segments["neuron"] == neuron].sort_values("segment", ascending=False)
        for column in ("homogeneity", "null_mean", "null_sd", "p"):
            np.testing.assert_allclose(by_segment[column], logged[column], equal_nan=True)
        coordinates = figures["projection"].intraneuron_data["coordinates"]
        assert coordinates.shape == (table.loc[neuron, "n_tokens"], 2)
        checked += 1
    assert checked >= 3
