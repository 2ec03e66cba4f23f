"""WordNet supersenses as a human-curated category reference for tokens.

WordNet files every synset under one of 45 lexicographer files ("supersenses": noun.animal,
verb.motion, adj.all, ...). A word gets the supersense of its most frequent sense, read from the
Debian `wordnet-base` files directly (no NLTK):
- `index.{noun,verb,adj,adv}` list each lemma's synsets in frequency order: the first one is the
  most frequent sense within that part of speech;
- a data file line starts at the byte offset that names its synset, with the lexicographer file
  number 9 bytes in, so one gather reads every first sense's supersense;
- across parts of speech, the semantic-concordance tag counts in `cntlist.rev` (or `index.sense`)
  decide: the part of speech whose most frequent sense has the larger count wins; ties (most
  lemmas have no tagged sense at all) go to noun, then verb, adjective, adverb.
Multi-word lemmas are spelled with "_" (ice_cream), as in WordNet.

Function words get no supersense by default: WordNet files "the", "and", "a" under noun or adverb
senses (noun.Tops for "a", ...), which would make stop words a category of their own.
`is_function_word`: scikit-learn's ENGLISH_STOP_WORDS (318 words; like every stop list it also
holds a few content words: "fire", "bill", "system", "interest"...) plus every single character.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import numpy as np

from intraneuron.errors import MissingAssetError
from intraneuron.paths import find_vendored

# wnlexnames(5WN): lexicographer file number -> name (numbers 00-44).
LEXNAMES = (
    "adj.all", "adj.pert", "adv.all", "noun.Tops", "noun.act", "noun.animal", "noun.artifact",
    "noun.attribute", "noun.body", "noun.cognition", "noun.communication", "noun.event",
    "noun.feeling", "noun.food", "noun.group", "noun.location", "noun.motive", "noun.object",
    "noun.person", "noun.phenomenon", "noun.plant", "noun.possession", "noun.process",
    "noun.quantity", "noun.relation", "noun.shape", "noun.state", "noun.substance", "noun.time",
    "verb.body", "verb.change", "verb.cognition", "verb.communication", "verb.competition",
    "verb.consumption", "verb.contact", "verb.creation", "verb.emotion", "verb.motion",
    "verb.perception", "verb.possession", "verb.social", "verb.stative", "verb.weather", "adj.ppl",
)  # fmt: skip

POS_ORDER = ("n", "v", "a", "r")  # tie-break across parts of speech
_POS_FILE = {"n": "noun", "v": "verb", "a": "adj", "r": "adv"}
_SENSE_KEY_POS = {"1": "n", "2": "v", "3": "a", "4": "r", "5": "a"}  # 5 = adjective satellite

# WordNet's morphy detachment rules (morph.c): (suffix, replacement) per part of speech.
_SUFFIX_RULES = {
    "n": (("s", ""), ("ses", "s"), ("xes", "x"), ("zes", "z"), ("ches", "ch"), ("shes", "sh"),
          ("men", "man"), ("ies", "y")),
    "v": (("s", ""), ("ies", "y"), ("es", "e"), ("es", ""), ("ed", "e"), ("ed", ""), ("ing", "e"),
          ("ing", "")),
    "a": (("er", ""), ("est", ""), ("er", "e"), ("est", "e")),
    "r": (),
}  # fmt: skip


def is_function_word(word: str) -> bool:
    """A normalised word (see `normalise_token`) in the stop list, or a single character."""
    from sklearn.feature_extraction.text import ENGLISH_STOP_WORDS

    return len(word) == 1 or word in ENGLISH_STOP_WORDS


_LEADING_MARKERS = re.compile(r"^[\sĠ▁]+")  # byte-level "Ġ", SentencePiece "▁", plain spaces


@dataclass(frozen=True)
class _Lexicon:
    """Per part of speech: lemma -> (lexicographer file of its first sense, top sense tag count)."""

    senses: dict[str, dict[str, tuple[int, int]]]
    exceptions: dict[str, dict[str, tuple[str, ...]]]  # pos -> irregular form -> base forms


def wordnet_dir() -> Path:
    return find_vendored("usr/share/wordnet/index.noun").parent


@lru_cache(maxsize=4)
def _read_lexicon(directory: Path) -> _Lexicon:
    counts = _sense_counts(directory)
    senses, exceptions = {}, {}
    for pos, file_pos in _POS_FILE.items():
        lemmas, first_offsets = _read_index(directory / f"index.{file_pos}")
        lexnums = _lexfile_numbers(directory / f"data.{file_pos}", first_offsets)
        pos_counts = counts.get(pos, {})
        senses[pos] = {
            lemma: (lexnum, pos_counts.get(lemma, 0))
            for lemma, lexnum in zip(lemmas, lexnums.tolist(), strict=True)
        }
        exceptions[pos] = _read_exceptions(directory / f"{file_pos}.exc")
    return _Lexicon(senses, exceptions)


def _read_index(path: Path) -> tuple[list[str], np.ndarray]:
    """Lemmas of an index file and the byte offset of each one's first (most frequent) synset."""
    lemmas, offsets = [], []
    with open(path, encoding="utf-8") as lines:
        for line in lines:
            if line.startswith("  "):  # licence header
                continue
            # lemma pos synset_cnt p_cnt ptr_symbol*p_cnt sense_cnt tagsense_cnt synset_offset...
            fields = line.split(" ", 6 + int(line.split(" ", 4)[3]))
            lemmas.append(fields[0])
            offsets.append(fields[-1][:8])
    return lemmas, np.asarray(offsets, dtype=np.int64)


def _lexfile_numbers(data_path: Path, offsets: np.ndarray) -> np.ndarray:
    """Lexicographer file number of each synset: bytes 9-10 of the line starting at its offset."""
    data = np.frombuffer(data_path.read_bytes(), dtype=np.uint8)
    digits = data[offsets[:, None] + np.array([9, 10])].astype(np.int64) - ord("0")  # [n, 2]
    lexnums = digits[:, 0] * 10 + digits[:, 1]
    if ((digits < 0) | (digits > 9)).any() or (lexnums >= len(LEXNAMES)).any():
        raise MissingAssetError(
            f"{data_path} does not match its index: is the WordNet install complete?"
        )
    return lexnums


def _sense_counts(directory: Path) -> dict[str, dict[str, int]]:
    """pos -> lemma -> tag count of its most frequent sense, from cntlist.rev or index.sense."""
    for name in ("cntlist.rev", "index.sense"):
        path = directory / name
        if not path.exists():
            continue
        counts: dict[str, dict[str, int]] = {pos: {} for pos in POS_ORDER}
        with open(path, encoding="utf-8") as lines:
            # cntlist.rev: "key sense_number count"; index.sense: "key offset sense_number count"
            for line in lines:
                key, *_, count = line.split()
                lemma, _, lex_sense = key.partition("%")
                table = counts[_SENSE_KEY_POS[lex_sense[0]]]
                table[lemma] = max(table.get(lemma, 0), int(count))
        return counts
    return {}  # no counts: the part-of-speech order decides alone


def _read_exceptions(path: Path) -> dict[str, tuple[str, ...]]:
    if not path.exists():
        return {}
    with open(path, encoding="utf-8") as lines:
        return {form: tuple(bases) for form, *bases in (line.split() for line in lines) if bases}


@lru_cache(maxsize=4)
def _supersenses_in(directory: Path) -> dict[str, str]:
    lexicon = _read_lexicon(directory)
    best: dict[str, tuple[int, int, int]] = {}  # lemma -> (count, -pos_rank, lexnum)
    for rank, pos in enumerate(POS_ORDER):
        for lemma, (lexnum, count) in lexicon.senses[pos].items():
            candidate = (count, -rank, lexnum)
            if lemma not in best or candidate > best[lemma]:
                best[lemma] = candidate
    return {lemma: LEXNAMES[lexnum] for lemma, (_, _, lexnum) in best.items()}


def load_supersenses(directory: Path | None = None) -> dict[str, str]:
    """Lemma -> supersense of its most frequent sense, for every WordNet lemma (parsed once).

    `directory` holds index.* / data.* / *.exc / cntlist.rev; default: the vendored wordnet-base.
    """
    return _supersenses_in(directory or wordnet_dir())


def normalise_token(token: str) -> str:
    """Token string -> WordNet lookup form: no leading space marker, lower case, "_" between words."""
    return "_".join(_LEADING_MARKERS.sub("", token).strip().lower().split())


def base_forms(word: str, lexicon: _Lexicon) -> list[tuple[str, str]]:
    """(pos, lemma) pairs WordNet's morphy would accept for `word`: itself, irregular bases, suffix rules."""
    forms = []
    for pos in POS_ORDER:
        senses = lexicon.senses[pos]
        candidates = [word, *lexicon.exceptions[pos].get(word, ())]
        candidates += [word[: -len(suffix)] + ending for suffix, ending in _SUFFIX_RULES[pos]
                       if word.endswith(suffix) and len(word) > len(suffix)]  # fmt: skip
        forms += [(pos, lemma) for lemma in dict.fromkeys(candidates) if lemma in senses]
    return forms


def supersense_of_form(word: str, lexicon: _Lexicon) -> int | None:
    """Lexicographer file number for a surface form, or None when WordNet does not know it.

    Candidates are the form itself and its base forms in every part of speech; the one whose most
    frequent sense has the largest tag count wins (so "saw" reads as see/verb.perception, "felt"
    as feel), then the form itself over a base form, then noun > verb > adj > adv.
    """
    candidates = []
    for pos, lemma in base_forms(word, lexicon):
        lexnum, count = lexicon.senses[pos][lemma]
        candidates.append((count, lemma == word, -POS_ORDER.index(pos), lexnum))
    return max(candidates)[3] if candidates else None


def label_tokens(
    token_strings: Sequence[str], directory: Path | None = None, stop_words: bool = True
) -> tuple[np.ndarray, list[str], float]:
    """Supersense label of each token string.

    Returns (labels [n] int, index into `names`, -1 = not in WordNet, or a function word
    (`is_function_word`) when stop_words; names = the 45 LEXNAMES; coverage = fraction of tokens
    labelled).
    """
    lexicon = _read_lexicon(directory or wordnet_dir())
    cache: dict[str, int] = {}
    labels = np.full(len(token_strings), -1, dtype=np.int64)  # [n]
    for k, token in enumerate(token_strings):
        word = normalise_token(token)
        if word not in cache:
            lexnum = None
            if word and not (stop_words and is_function_word(word)):
                lexnum = supersense_of_form(word, lexicon)
            cache[word] = -1 if lexnum is None else lexnum
        labels[k] = cache[word]
    coverage = float((labels >= 0).mean()) if len(labels) else 0.0
    return labels, list(LEXNAMES), coverage
