"""WordNet supersenses: the real wordnet-base files, checked against WordNet's own docs and a naive
reader, plus a hand-made mini WordNet that pins the selection rules."""

from __future__ import annotations

import gzip
import random
import re
from pathlib import Path

import numpy as np
import pytest

from intraneuron.categories import wordnet
from intraneuron.categories.wordnet import LEXNAMES, label_tokens, load_supersenses
from intraneuron.errors import MissingAssetError
from intraneuron.paths import find_vendored


@pytest.fixture(scope="module")
def wordnet_files() -> Path:
    try:
        return wordnet.wordnet_dir()
    except MissingAssetError as error:
        pytest.skip(f"wordnet-base not unpacked ({error}); run `make setup`")


def test_lexnames_match_the_wnlexnames_man_page(wordnet_files):
    try:
        page = find_vendored("usr/share/man/man5/lexnames.5WN.gz")
    except MissingAssetError:
        pytest.skip("lexnames man page not unpacked")
    rows = re.findall(r"^(\d\d)\s+(\S+)", gzip.decompress(page.read_bytes()).decode(), re.M)
    assert [(int(n), name) for n, name in rows] == list(enumerate(LEXNAMES))


def test_parse_is_complete(wordnet_files):
    # its time (about 1 s on 2 cores) is measured by benchmarks/wordnet.py
    wordnet._read_lexicon.cache_clear()
    wordnet._supersenses_in.cache_clear()
    supersenses = load_supersenses()
    assert 140_000 < len(supersenses) < 160_000  # 147k distinct lemmas in WordNet 3.0
    assert set(supersenses.values()) <= set(LEXNAMES)
    assert (
        len(set(supersenses.values())) == 45
    )  # every lexicographer file is somebody's first sense
    assert load_supersenses() is supersenses  # cached


@pytest.mark.parametrize(
    "lemma, expected",
    [
        ("dog", "noun.animal"),
        ("cat", "noun.animal"),
        ("apple", "noun.food"),
        ("ice_cream", "noun.food"),
        ("woman", "noun.person"),
        ("oak", "noun.plant"),
        ("run", "verb.motion"),  # verb sense tagged 106 times, the top noun sense 18
        ("eat", "verb.consumption"),
        ("think", "verb.cognition"),
        ("happy", "adj.all"),
        ("quickly", "adv.all"),
    ],
)
def test_known_lemmas(wordnet_files, lemma, expected):
    assert load_supersenses()[lemma] == expected


def test_agrees_with_a_naive_reader_on_random_lemmas(wordnet_files):
    """Re-derive 300 random lemmas with plain split() and file seeks, the documented way."""
    counts: dict[tuple[str, str], int] = {}
    pos_of_digit = {"1": "n", "2": "v", "3": "a", "4": "r", "5": "a"}
    for line in (wordnet_files / "cntlist.rev").read_text().splitlines():
        key, _, count = line.split()
        lemma, lex = key.split("%")
        pair = (lemma, pos_of_digit[lex[0]])
        counts[pair] = max(counts.get(pair, 0), int(count))

    first_sense: dict[str, dict[str, int]] = {}
    for pos, name in (("n", "noun"), ("v", "verb"), ("a", "adj"), ("r", "adv")):
        with open(wordnet_files / f"data.{name}", "rb") as data:
            for line in (wordnet_files / f"index.{name}").read_text().splitlines():
                if line.startswith("  "):
                    continue
                fields = line.split()
                n_synsets = int(fields[2])
                data.seek(int(fields[-n_synsets]))  # first listed synset = most frequent
                lexnum = int(data.readline().split()[1])
                first_sense.setdefault(fields[0], {})[pos] = lexnum

    supersenses = load_supersenses()
    assert len(supersenses) == len(first_sense)
    for lemma in random.Random(0).sample(sorted(first_sense), 300):
        order = "nvar"
        best_pos = max(
            first_sense[lemma], key=lambda p: (counts.get((lemma, p), 0), -order.index(p))
        )
        assert supersenses[lemma] == LEXNAMES[first_sense[lemma][best_pos]], lemma


def test_label_tokens_handles_markers_case_and_inflections(wordnet_files):
    tokens = ["Ġdog", "dogs", " ran", "▁Apples", "women", "cities", "went", "was", "ice cream"]
    expected = ["noun.animal", "noun.animal", "verb.motion", "noun.food", "noun.person",
                "noun.location", "verb.motion", "verb.stative", "noun.food"]  # fmt: skip
    # stop_words=False: "was" is a function word, which the default leaves without a supersense
    labels, names, coverage = label_tokens(tokens, stop_words=False)
    assert names == list(LEXNAMES)
    assert [names[i] for i in labels] == expected
    assert coverage == 1.0


def test_label_tokens_prefers_the_more_frequent_reading_of_a_form(wordnet_files):
    # "saw" is a lemma (the tool, verb.contact) but as the past of "see" it is far more frequent.
    labels, names, _ = label_tokens(["saw", "felt", "running"])
    assert [names[i] for i in labels] == ["verb.perception", "verb.emotion", "verb.motion"]


def test_label_tokens_coverage_on_a_small_list(wordnet_files):
    tokens = ["Ġthe", "Ġcat", "Ġof", "Ġhorses", ",", "Ġand", "Ġwalked", "1984", "", "Ġ", "Ġbread"]
    labels, names, coverage = label_tokens(tokens)
    covered = {t for t, label in zip(tokens, labels, strict=True) if label >= 0}
    assert covered == {"Ġcat", "Ġhorses", "Ġwalked", "Ġbread"}
    assert coverage == pytest.approx(4 / 11)
    assert labels.dtype == np.int64 and (labels[[0, 2, 4, 5, 7, 8, 9]] == -1).all()


# A three-lemma WordNet: "bark" (noun + verb), "tree" (noun only), "fly" (noun + verb, with counts).
def _write_mini_wordnet(root: Path, counts: str) -> Path:
    def data_file(name: str, synsets: list[tuple[int, str, str]]) -> dict[str, int]:
        header = "  1 This is a licence header line.  \n"
        text, offsets = header, {}
        for lexnum, word, gloss in synsets:
            offsets[word + str(lexnum)] = len(text.encode())
            text += f"{len(text.encode()):08d} {lexnum:02d} {name[0]} 01 {word} 0 000 | {gloss}  \n"
        (root / f"data.{name}").write_text(text)
        return offsets

    def index_file(name: str, rows: list[tuple[str, list[int]]]) -> None:
        lines = ["  1 This is a licence header line.  "]
        for lemma, offsets in rows:
            ids = " ".join(f"{o:08d}" for o in offsets)
            lines.append(f"{lemma} {name[0]} {len(offsets)} 1 @ {len(offsets)} 0 {ids}  ")
        (root / f"index.{name}").write_text("\n".join(lines) + "\n")

    noun = data_file(
        "noun", [(20, "tree", "a plant"), (20, "bark", "tree skin"), (5, "fly", "an insect")]
    )
    verb = data_file("verb", [(32, "bark", "make a dog sound"), (38, "fly", "travel in the air")])
    index_file(
        "noun", [("bark", [noun["bark20"]]), ("fly", [noun["fly5"]]), ("tree", [noun["tree20"]])]
    )
    index_file("verb", [("bark", [verb["bark32"]]), ("fly", [verb["fly38"]])])
    for name in ("adj", "adv"):
        (root / f"data.{name}").write_text("")
        (root / f"index.{name}").write_text("")
    (root / "verb.exc").write_text("flew fly\n")
    (root / "cntlist.rev").write_text(counts)
    return root


def test_mini_wordnet_rules(tmp_path):
    root = _write_mini_wordnet(tmp_path, "fly%2:38:00:: 1 12\nfly%1:05:00:: 1 3\n")
    supersenses = load_supersenses(root)
    assert supersenses == {"tree": "noun.plant", "bark": "noun.plant", "fly": "verb.motion"}
    # bark: no counts, the noun wins the tie; fly: the verb's 12 tags beat the noun's 3.
    labels, names, coverage = label_tokens(["Ġtrees", "flew", "barking", "flies", "oak"], root)
    assert [names[i] if i >= 0 else None for i in labels] == [
        "noun.plant", "verb.motion", "verb.communication", "verb.motion", None,
    ]  # fmt: skip
    assert coverage == pytest.approx(0.8)


def test_mini_wordnet_without_counts_uses_pos_order(tmp_path):
    root = _write_mini_wordnet(tmp_path, "")
    (root / "cntlist.rev").unlink()
    assert load_supersenses(root)["fly"] == "noun.animal"


def test_function_words_and_single_characters_get_no_supersense_unless_asked(wordnet_files):
    tokens = ["Ġthe", "Ġand", "Ġa", "Ġwas", "Ġof", "x", "Ġdog", "Ġbread", "Ġwalked"]
    labels, names, coverage = label_tokens(tokens)
    assert (labels[:6] == -1).all() and (labels[6:] >= 0).all()
    assert coverage == pytest.approx(3 / 9)
    loose, _, _ = label_tokens(tokens, stop_words=False)
    # WordNet itself has senses for most of them (the point of the stop list)
    assert (loose[[2, 3, 5]] >= 0).all() and (loose[6:] == labels[6:]).all()
    assert names[loose[3]] == "verb.stative"


def test_the_wordnet_option_applies_the_stop_list_and_can_turn_it_off(wordnet_files):
    from intraneuron.analyses.two_fold.clustering import ClusteringConfig
    from intraneuron.errors import ConfigError

    texts = ["Ġthe", "Ġdog", "Ġwas"]
    config = ClusteringConfig.from_option("wordnet")
    assert config.stop_words is True
    assert config.labeller(texts)(np.arange(3)).tolist()[::2] == [-1, -1]
    config.stop_words = False
    assert config.labeller(texts)(np.arange(3))[2] >= 0
    config.stop_words = "yes"
    with pytest.raises(ConfigError, match="clustering.stop_words"):
        config.validate()
