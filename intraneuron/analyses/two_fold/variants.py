"""Surface variants of one word as one core unit, and the word-only candidate pool.

A BPE vocabulary spells one word several times (" said", "said", " Said"). Kept apart, the forms of
one word are separate core tokens whose vectors are alike (cosine 0.67 against 0.44 for random
pairs in SmolLM2's input embeddings), and a quarter of the neurons have such a pair among their top
10: the pairs manufacture categories and homogeneity. `core_tokens.merge_variants` (on) makes the
variants of one word one core unit before the rule picks core tokens.

Variants (`variant_key`): two token texts are variants when they are equal once one leading
word-start marker (a space, "Ġ" or "▁") is removed and, where the rest is a word (letters only,
`str.isalpha`), case-folded. So " The", "The", "the" and " THE" are one unit. Punctuation, digits
and mixed tokens merge by the leading-space rule alone (" (" with "(", " 1" with "1"; "3D" and "3d"
stay apart: case is folded for words only). Whitespace-only tokens and byte fragments merge with
nothing.

A unit (`VariantUnits`, built per profile from the types the corpus holds and the filters keep):
its activation is the count-weighted mean of its forms' mean activations (per half when
cross-fitting), i.e. the mean over all its occurrences; its count the sum of theirs; its vector the
mean of its forms' vectors weighted by their corpus counts (for the layer-input source: the mean
input over all its occurrences). Downstream it is its most frequent form's id, shown as
"said (3 forms)".

The word-only pool (`core_tokens.pool: words`, a sensitivity option): alphabetic tokens that begin
a word: with a leading marker, or, unmarked, when most of their corpus occurrences follow a token
that does not end in a letter ("The" after a newline, "said" after a quote). In a WordPiece
vocabulary ("##" marks continuations) every unmarked piece begins a word. Sub-word continuations
("ing", "ly"), punctuation and digits leave the pool.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
from scipy import sparse

MARKERS = (" ", "\u0120", "\u2581")  # a space, byte-level BPE's "Ġ", SentencePiece's "▁"
_BLOCK_VALUES = 8_000_000  # float64 values per block of neurons while merging
_WINDOW_BLOCK = 65_536  # corpus windows read at a time by the word-start vote
# A WordPiece vocabulary: more than this share of "##" + letter pieces (BERT's: 19%). A BPE vocabulary
# may hold a few ("##" from Markdown in SmolLM2's), which must not switch the vote off.
WORDPIECE_SHARE = 0.01


def _without_marker(text: str) -> tuple[str, bool]:
    return (text[1:], True) if text[:1] in MARKERS else (text, False)


def variant_key(text: str) -> str | None:
    """The text the variants of `text` share, or None when it merges with nothing."""
    rest, _ = _without_marker(text)
    if not rest.strip() or "\ufffd" in rest:
        return None
    try:
        rest.encode("utf-8")  # lone surrogates: half of a character, not a spelling of anything
    except UnicodeEncodeError:
        return None
    return rest.casefold() if rest.isalpha() else rest


def variant_keys(texts: Sequence[str]) -> np.ndarray:
    """[vocab] int64: tokens with equal values are variants of one another; -1 merges with nothing."""
    index: dict[str, int] = {}
    keys = np.full(len(texts), -1, dtype=np.int64)
    for i, text in enumerate(texts):
        if (key := variant_key(text)) is not None:
            keys[i] = index.setdefault(key, len(index))
    return keys


def word_pool(texts: Sequence[str], pieces: Sequence[str | None], windows: np.ndarray) -> np.ndarray:
    """[vocab] bool: the tokens of the word-only pool (module docstring).

    texts: decoded token texts (" the"); pieces: the tokenizer's own strings ("Ġthe", "▁the",
    "##ing"), which keep the marker a decoded SentencePiece token loses; windows: [n_windows,
    window_len] the corpus's token ids, for the vote of the unmarked tokens.
    """
    pieces = [p or "" for p in pieces]
    alphabetic = np.array([_without_marker(t)[0].isalpha() for t in texts], dtype=bool)
    continuation = np.array([p.startswith("##") and p[2:3].isalpha() for p in pieces], dtype=bool)
    if continuation.mean() > WORDPIECE_SHARE:
        return alphabetic & ~continuation
    marked = np.array([t[:1] in MARKERS or p[:1] in MARKERS for t, p in zip(texts, pieces, strict=True)])
    ends_in_letter = np.array([t[-1:].isalpha() for t in texts], dtype=np.float64)
    after_letter = np.zeros(len(texts))
    seen = np.zeros(len(texts))
    for start in range(0, len(windows), _WINDOW_BLOCK):
        ids = np.asarray(windows[start : start + _WINDOW_BLOCK], dtype=np.int64)  # [b, window_len]
        before, token = ids[:, :-1].ravel(), ids[:, 1:].ravel()  # a window's first token has no known predecessor
        after_letter += np.bincount(token, weights=ends_in_letter[before], minlength=len(texts))
        seen += np.bincount(token, minlength=len(texts))
    return alphabetic & (marked | (after_letter < 0.5 * seen))


@dataclass(frozen=True)
class VariantUnits:
    """The token types of one profile grouped into core units (module docstring).

    T = the profile's types kept as candidates, U = units.
    """

    type_ids: np.ndarray  # [T] sorted vocabulary ids
    unit_of: np.ndarray  # [T] each type's unit
    weights: np.ndarray  # [T] corpus occurrences of each type: its weight in the unit's vector
    unit_ids: np.ndarray  # [U] each unit's most frequent form (then the lowest id): its id downstream
    forms: np.ndarray  # [U] how many types the unit merges

    @classmethod
    def build(cls, keys: np.ndarray, type_ids: np.ndarray, counts: np.ndarray,
              keep: np.ndarray | None = None) -> VariantUnits:  # fmt: skip
        """keys: [vocab] from `variant_keys`; type_ids, counts: [T0] the corpus's types and their
        occurrences; keep: [vocab] bool, False for tokens the filters drop (they join no unit)."""
        type_ids, counts = np.asarray(type_ids, dtype=np.int64), np.asarray(counts, dtype=np.int64)
        kept = counts > 0
        if keep is not None:
            kept &= keep[type_ids]
        order = np.argsort(type_ids[kept], kind="stable")
        type_ids, counts = type_ids[kept][order], counts[kept][order]
        key = keys[type_ids]
        key = np.where(key >= 0, key, keys.max(initial=0) + 1 + np.arange(key.size))  # keyless: alone
        _, unit_of = np.unique(key, return_inverse=True)
        by_unit = np.lexsort((type_ids, -counts, unit_of))  # per unit: most frequent form first
        first = by_unit[np.r_[True, unit_of[by_unit][1:] != unit_of[by_unit][:-1]]] if key.size else by_unit
        forms = np.bincount(unit_of, minlength=first.size)
        return cls(type_ids, unit_of.astype(np.int64), counts, type_ids[first], forms)

    @classmethod
    def from_profile(cls, keys: np.ndarray, profile, keep: np.ndarray | None = None) -> VariantUnits:
        """The units of an ActivationProfile's token types (its `type_ids`, `type_count`)."""
        return cls.build(keys, profile.numpy("type_ids"), profile.numpy("type_count"), keep)

    def _position(self, ids: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """[n] vocabulary ids -> (position in type_ids [n], held [n] bool)."""
        if not self.type_ids.size:
            return np.zeros(ids.size, dtype=np.int64), np.zeros(ids.size, dtype=bool)
        position = np.minimum(np.searchsorted(self.type_ids, ids), self.type_ids.size - 1)
        return position, self.type_ids[position] == ids

    def unit_id(self, token_ids: np.ndarray) -> np.ndarray:
        """Vocabulary ids (any shape) -> their unit's id; ids no unit holds map to themselves."""
        ids = np.asarray(token_ids, dtype=np.int64)
        position, held = self._position(ids.reshape(-1))
        return np.where(held, self.unit_ids[self.unit_of[position]], ids.reshape(-1)).reshape(ids.shape)

    def merge(self, type_ids: np.ndarray, counts: np.ndarray, means: np.ndarray
              ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:  # fmt: skip
        """A per-type table -> the per-unit one: type_ids [T'], counts [T'], means [T', m] (NaN
        where the count is 0) -> unit_ids [U], counts [U], means [U, m] float32, the count-weighted
        mean (NaN for a unit never seen). Types no unit holds (dropped by the filters) are left out."""
        position, held = self._position(np.asarray(type_ids, dtype=np.int64))
        rows, columns = self.unit_of[position[held]], np.flatnonzero(held)
        weights = np.asarray(counts, dtype=np.float64)[held]
        U = self.unit_ids.size
        S = sparse.csr_matrix((weights, (rows, columns)), shape=(U, len(type_ids)))  # [U, T']
        unit_counts = np.bincount(rows, weights=weights, minlength=U)  # [U]
        out = np.empty((U, means.shape[1]), dtype=np.float32)
        block = max(1, _BLOCK_VALUES // max(1, len(type_ids)))
        for start in range(0, means.shape[1], block):
            part = np.nan_to_num(np.asarray(means[:, start : start + block], dtype=np.float64))  # [T', b]
            with np.errstate(invalid="ignore", divide="ignore"):
                out[:, start : start + block] = (S @ part) / unit_counts[:, None]
        return self.unit_ids, unit_counts.astype(np.int64), out

    def embed(self, embed: Callable[[np.ndarray], tuple[np.ndarray, np.ndarray]]):
        """`embed` over unit ids: the count-weighted mean of the vectors of the unit's forms that
        `embed` can embed (a unit is invalid when none is); ids that are no unit's keep their own."""
        members = np.argsort(self.unit_of, kind="stable")  # [T] types grouped by unit
        starts = np.searchsorted(self.unit_of[members], np.arange(self.unit_ids.size))  # [U]
        by_id = np.argsort(self.unit_ids)

        def embed_units(token_ids: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
            ids = np.asarray(token_ids, dtype=np.int64).reshape(-1)  # [n]
            if not ids.size:
                return embed(ids)
            unit = np.zeros(ids.size, dtype=np.int64)
            is_unit = np.zeros(ids.size, dtype=bool)
            if self.unit_ids.size:
                unit = by_id[np.minimum(np.searchsorted(self.unit_ids[by_id], ids), by_id.size - 1)]
                is_unit = self.unit_ids[unit] == ids
            lengths = np.where(is_unit, self.forms[unit], 1)  # [n]
            offsets = np.arange(lengths.sum()) - np.repeat(np.cumsum(lengths) - lengths, lengths)
            forms = members[np.repeat(starts[unit], lengths) + offsets]  # [total] rows of type_ids
            flat_unit = np.repeat(is_unit, lengths)
            flat_ids = np.where(flat_unit, self.type_ids[forms], np.repeat(ids, lengths))
            weights = np.where(flat_unit, self.weights[forms], 1).astype(np.float64)
            X, valid = embed(flat_ids)  # [total, d], [total]
            weights *= valid
            segments = np.cumsum(lengths) - lengths  # [n]
            out = np.zeros((ids.size, X.shape[1]), dtype=np.float32)  # [n, d]
            total = np.add.reduceat(weights, segments)  # [n]
            sums = np.add.reduceat(X.astype(np.float64) * weights[:, None], segments, axis=0)  # [n, d]
            ok = total > 0
            out[ok] = sums[ok] / total[ok, None]
            return out, ok

        return embed_units

    def describe(self, texts: Sequence[str]) -> Callable[[np.ndarray], list[str]]:
        """ids -> display strings: a unit is its most frequent form, "(k forms)" when it merges k > 1."""
        forms = dict(zip(self.unit_ids.tolist(), self.forms.tolist(), strict=True))

        def decode(ids: np.ndarray) -> list[str]:
            return [texts[i] + (f" ({forms[i]} forms)" if forms.get(i, 1) > 1 else "") for i in np.asarray(ids).tolist()]

        return decode
