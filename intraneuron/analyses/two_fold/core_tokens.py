"""Step 2: each neuron's core tokens, the candidates it responds to most.

Candidates are token types (values = mean activation per type; invalid = too few occurrences) or
occurrences (values = the top-k activations). Selection is vectorised over blocks of neurons.

Cross-fitting (unit=type, on by default): the tokens are chosen by their mean activation over one
half of the corpus and measured over the other (alternating blocks of windows,
extraction.fold_block_windows; 1 = even / odd windows). Choosing and testing on
the same means is a winner's curse: the chosen top of a noisy ranking is biased upward, most where a
type is rare, and embeddings that encode frequency turn that bias into "structure". Each neuron
also reports how well its core set replicates across the halves (`core_overlap`: the share of the
top-n of one half that is in the top-n of the other; `core_reliability`: the Spearman correlation of
the two halves' means over the core tokens), and a neuron whose core tokens barely stand out from
its own activation distribution (`selectivity` in SDs, e.g. a dead neuron) is skipped with a reason.

unit=occurrence merges the repeats of a token type among the top occurrences into one core token
(their mean activation): repeats share one vector, and a permutation null that moved them
independently would count one token's self-similarity as categorical homogeneity. For the same
reason the surface variants of one word (" said", "said", " Said") are one core unit by default
(`merge_variants`, two_fold/variants.py); `pool: words` keeps word-initial alphabetic tokens only.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, replace

import numpy as np
from scipy import stats

from intraneuron.analyses.two_fold.variants import VariantUnits
from intraneuron.errors import ConfigError

RULES = ("top_n", "fraction_of_max", "quantile", "positive")
UNITS = ("type", "occurrence")
REPEATS = ("merge", "keep")  # unit=occurrence: repeats of a type become one core token | stay apart
POOLS = ("all", "words")  # candidates: every token | word-initial alphabetic tokens (no sub-word fragments)

# Neurons are processed in column blocks of about this many float64 values, so a 49k-token
# vocabulary times 6,400 neurons never materialises as one float64 copy.
_BLOCK_VALUES = 8_000_000


def validate_core_token_rule(
    rule: str, n: int, tau: float, q: float, max_tokens: int | None
) -> None:
    """Raise ConfigError naming the `core_tokens.*` key of the first bad setting."""
    if rule not in RULES:
        raise ConfigError("core_tokens.rule", rule, RULES)
    if not isinstance(n, int | np.integer) or n < 2:
        raise ConfigError("core_tokens.n", n, "an integer >= 2")
    if not 0.0 < tau <= 1.0:
        raise ConfigError("core_tokens.tau", tau, "a fraction in (0, 1]")
    if not 0.0 < q < 1.0:
        raise ConfigError("core_tokens.q", q, "a quantile in (0, 1)")
    if max_tokens is not None and (not isinstance(max_tokens, int | np.integer) or max_tokens < 2):
        raise ConfigError("core_tokens.max_tokens", max_tokens, "None or an integer >= 2")


def select_core_tokens(
    values: np.ndarray,
    valid: np.ndarray | None = None,
    rule: str = "top_n",
    n: int = 100,
    tau: float = 0.5,
    q: float = 0.99,
    max_tokens: int | None = None,
) -> list[np.ndarray]:
    """Per neuron, the indices of its core candidates, sorted by value descending.

    values: [n_candidates, n_neurons]; valid: [n_candidates] bool (False = never a core token).
    Rules: "top_n" keeps the n highest (the sibling paper's 100 core tokens per neuron);
    "fraction_of_max" keeps values >= tau * max (none when max <= 0); "quantile" keeps values >= the
    neuron's q-quantile over valid candidates; "positive" keeps values > 0. `max_tokens` caps the
    count of every rule. NaN values are never selected. Equal values are ordered by candidate index;
    which of several values tied at the cut-off of "top_n" is kept is unspecified.
    """
    validate_core_token_rule(rule, n, tau, q, max_tokens)
    values = np.asarray(values)
    if values.ndim != 2:
        raise ValueError(f"values must be [n_candidates, n_neurons], got shape {values.shape}")
    n_candidates, n_neurons = values.shape
    if valid is not None:
        valid = np.asarray(valid, dtype=bool)
        if valid.shape != (n_candidates,):
            raise ValueError(f"valid must have shape ({n_candidates},), got {valid.shape}")
    cap = n if rule == "top_n" else None
    if max_tokens is not None:
        cap = max_tokens if cap is None else min(cap, max_tokens)

    block = max(1, _BLOCK_VALUES // max(1, n_candidates))
    selected: list[np.ndarray] = []
    for start in range(0, n_neurons, block):
        columns = values[:, start : start + block]  # [n_candidates, b]
        selected.extend(_select_block(columns.T.astype(np.float64), valid, rule, tau, q, cap))
    return selected


def _select_block(
    block: np.ndarray, valid: np.ndarray | None, rule: str, tau: float, q: float, cap: int | None
) -> list[np.ndarray]:
    """block: [b, n_candidates] (one row per neuron); returns one sorted index array per row."""
    usable = np.isfinite(block)
    if valid is not None:
        usable &= valid[None, :]
    block = np.where(usable, block, -np.inf)

    if rule == "top_n":
        keep = usable
    elif rule == "positive":
        keep = block > 0
    else:
        if rule == "fraction_of_max":
            peak = block.max(axis=1)  # [b]
            threshold = np.where(peak > 0, tau * peak, np.inf)
        else:  # quantile over the usable candidates of each neuron
            with np.errstate(invalid="ignore"):
                masked = np.where(usable, block, np.nan)
                empty = ~usable.any(axis=1)
                masked[empty] = 0.0  # nanquantile warns on all-NaN rows; those rows keep nothing
                threshold = np.where(empty, np.inf, np.nanquantile(masked, q, axis=1))
        keep = usable & (block >= threshold[:, None])
    counts = keep.sum(axis=1)  # [b]
    if cap is not None:
        counts = np.minimum(counts, cap)

    width = int(counts.max(initial=0))
    if width == 0:
        return [np.empty(0, dtype=np.int64) for _ in range(block.shape[0])]
    if width < block.shape[1]:
        top = np.argpartition(-block, width - 1, axis=1)[:, :width]  # [b, width], unsorted
    else:
        top = np.broadcast_to(np.arange(block.shape[1]), block.shape)
    top_values = np.take_along_axis(block, top, axis=1)
    # Sort by value descending, then by candidate index, so results do not depend on argpartition.
    order = np.lexsort((top, -top_values), axis=1)
    top = np.take_along_axis(top, order, axis=1)
    # The c best of the `width` largest are exactly the c values a threshold rule keeps.
    return [top[i, : counts[i]].astype(np.int64) for i in range(block.shape[0])]


def token_filter_mask(
    token_strings: Sequence[str | bytes],
    drop_whitespace_punct: bool = False,
    drop_byte_fragments: bool = False,
) -> np.ndarray:
    """Keep-mask [n_tokens] for candidate tokens; AND it into `valid` of `select_core_tokens`.

    Byte fragments: strings containing U+FFFD or that are not valid text (bytes that are not UTF-8,
    lone surrogates). Whitespace/punctuation: nothing alphanumeric in the string. Pass decoded token
    text (" the"), not byte-level BPE symbols ("Ġthe"), whose marker characters count as letters.
    Filtering is our option, not the paper's; the default keeps every token.
    """
    keep = np.ones(len(token_strings), dtype=bool)
    if not (drop_whitespace_punct or drop_byte_fragments):
        return keep
    for i, token in enumerate(token_strings):
        text = _as_text(token)
        if drop_byte_fragments and (text is None or "\ufffd" in text):
            keep[i] = False
        elif drop_whitespace_punct and not any(ch.isalnum() for ch in text or ""):
            keep[i] = False
    return keep


def _as_text(token: str | bytes) -> str | None:
    """The token as valid text, or None when it is not (undecodable bytes, lone surrogates)."""
    if isinstance(token, bytes | bytearray):
        try:
            return bytes(token).decode("utf-8")
        except UnicodeDecodeError:
            return None
    try:
        token.encode("utf-8")  # lone surrogates, left by decoding split bytes with surrogateescape
    except UnicodeEncodeError:
        return None
    return token


@dataclass
class CoreTokensConfig:
    """The `core_tokens` config group (conf/core_tokens/*.yaml): which tokens are a neuron's core."""

    unit: str = "type"  # type: mean activation per token type | occurrence: top-k activating positions
    rule: str = "top_n"
    n: int = 100
    tau: float = 0.5
    q: float = 0.99
    max_tokens: int | None = None
    min_count: int = 5
    min_core_tokens: int = 10
    drop_whitespace_punct: bool = False
    drop_byte_fragments: bool = False
    drop_special: bool = True  # the tokenizer's special tokens (BOS, EOS, padding) are never core tokens
    cross_fit: bool = True  # unit=type: choose on one half of the windows, measure on the other
    min_selectivity: float = 1.0  # core-token mean over the neuron's corpus mean, in its SDs
    repeats: str = "merge"  # unit=occurrence: merge | keep (repeats of one type stay separate tokens)
    merge_variants: bool = True  # case and leading-space variants of one word are one core unit
    pool: str = "all"  # all | words: word-initial alphabetic tokens only (a sensitivity option)

    def validate(self) -> None:
        if self.unit not in UNITS:
            raise ConfigError("core_tokens.unit", self.unit, UNITS)
        validate_core_token_rule(self.rule, self.n, self.tau, self.q, self.max_tokens)
        if self.min_count < 1:
            raise ConfigError("core_tokens.min_count", self.min_count, "an integer >= 1")
        if self.min_core_tokens < 3:
            raise ConfigError("core_tokens.min_core_tokens", self.min_core_tokens, "an integer >= 3")
        if not np.isfinite(self.min_selectivity) or self.min_selectivity < 0:
            raise ConfigError("core_tokens.min_selectivity", self.min_selectivity, "a number of SDs >= 0")
        if self.repeats not in REPEATS:
            raise ConfigError("core_tokens.repeats", self.repeats, REPEATS)
        if not isinstance(self.merge_variants, bool | np.bool_):
            raise ConfigError("core_tokens.merge_variants", self.merge_variants, "true or false")
        if self.pool not in POOLS:
            raise ConfigError("core_tokens.pool", self.pool, POOLS)

    def label(self) -> str:
        """A few words for figure titles: "top 100 types", "tau 0.5 types", "top 100 occurrences"."""
        rule = {"top_n": f"top {self.n}", "fraction_of_max": f"tau {self.tau:g}", "quantile": f"q {self.q:g}",
                "positive": "positive"}[self.rule]  # fmt: skip
        return f"{rule} {self.unit}s"

    def versus_contexts(self) -> str:
        """Why a card's core tokens differ from its top contexts, one sentence."""
        if self.unit == "occurrence":
            return ("Core tokens are its top occurrences with the repeats of a token type merged into their mean; "
                    "the top contexts are the highest of those occurrences one by one.")  # fmt: skip
        halves = " (chosen on one half of the corpus, valued on the other)" if self.cross_fit else ""
        return (f"Core tokens are token types ranked by their mean activation over all their occurrences{halves}; "
                "the top contexts are single occurrences, so a type that peaks once but is low on average is a "
                "top context and not a core token, and a type that is high on average is a core token "
                "without needing a top context.")  # fmt: skip

    def check_against_top_k(self, top_k: int) -> None:
        """unit=occurrence draws from the extraction's top-k occurrences: it cannot ask for more."""
        if self.unit != "occurrence":
            return
        key = "core_tokens.n" if self.rule == "top_n" else "core_tokens.max_tokens"
        wanted = self.n if self.rule == "top_n" else self.max_tokens
        if wanted is None or wanted > top_k:
            raise ConfigError(key, wanted, f"<= extraction.top_k={top_k} (occurrences kept per neuron)")

    def keep_mask(self, token_texts: list[str], special_ids: Sequence[int] = (),
                  words: np.ndarray | None = None) -> np.ndarray | None:  # fmt: skip
        """[vocab] keep-mask of the core-token filters, or None when every filter is off.
        special_ids: the tokenizer's special tokens, dropped when `drop_special`; words: [vocab]
        bool, the word-only pool (`variants.word_pool`), needed when `pool` is "words"."""
        special = [i for i in special_ids if 0 <= i < len(token_texts)] if self.drop_special else []
        if self.pool == "words" and words is None:
            raise ValueError("core_tokens.pool=words needs the word-only pool (variants.word_pool)")
        if not (self.drop_whitespace_punct or self.drop_byte_fragments or special or self.pool == "words"):
            return None
        keep = token_filter_mask(token_texts, self.drop_whitespace_punct, self.drop_byte_fragments)
        keep[special] = False
        if self.pool == "words":
            keep &= words
        return keep

    def select(self, profile, neurons: np.ndarray, keep_token: np.ndarray | None = None,
               units: VariantUnits | None = None) -> list[CoreTokens]:  # fmt: skip
        """Core tokens of each neuron in `neurons` [m] from one layer's ActivationProfile.

        unit="type": candidates are the token types seen at least `min_count` times (in each half
        when cross-fitting), valued by their mean activation; unit="occurrence": the neuron's top-k
        activating positions. keep_token: [vocab] bool, False for tokens the filters drop. units:
        the profile's variant units (`merge_variants`; built with the same keep_token): candidates
        are then units, valued and counted over all their forms, and named by their unit id.
        """
        neurons = np.asarray(neurons, dtype=np.int64)
        if self.unit == "occurrence":
            cores = self._select_occurrences(profile, neurons, keep_token, units)
        elif self.cross_fit:
            cores = self._select_cross_fitted(profile, neurons, keep_token, units)
        else:
            cores = self._select_types(profile, neurons, keep_token, units)
        if self.min_selectivity > 0:
            cores = self._skip_unselective(profile, cores)
        return cores

    @property
    def _rule(self) -> tuple:
        return (self.rule, self.n, self.tau, self.q, self.max_tokens)

    def _select_types(self, profile, neurons, keep_token, units) -> list[CoreTokens]:
        type_ids, counts = profile.numpy("type_ids"), profile.numpy("type_count")  # [T] each
        values = profile.numpy("type_mean")[:, neurons]  # [T, m]
        if units is not None:
            type_ids, counts, values = units.merge(type_ids, counts, values)  # [U], [U], [U, m]
        valid = counts >= self.min_count  # [T] (or [U])
        if keep_token is not None:
            valid &= keep_token[type_ids]
        picked = select_core_tokens(values, valid, *self._rule)
        return [
            CoreTokens(int(neuron), type_ids[idx], values[idx, j].astype(np.float64))
            for j, (neuron, idx) in enumerate(zip(neurons, picked, strict=True))
        ]

    def _select_cross_fitted(self, profile, neurons, keep_token, units) -> list[CoreTokens]:
        type_ids, counts, means = profile.split_type_stats()  # [T], [2, T], [2, T, D]
        chosen_on, measured_on = means[0][:, neurons], means[1][:, neurons]  # [T, m] each
        if units is not None:  # each half's unit means weigh the forms by that half's counts
            (unit_ids, count_0, chosen_on), (_, count_1, measured_on) = (
                units.merge(type_ids, counts[h], half) for h, half in enumerate((chosen_on, measured_on)))
            type_ids, counts = unit_ids, np.stack([count_0, count_1])  # [U], [2, U]
        valid = (counts >= self.min_count).all(axis=0)  # [T] (or [U]): enough occurrences in both halves
        if keep_token is not None:
            valid &= keep_token[type_ids]
        picked = select_core_tokens(chosen_on, valid, *self._rule)
        # the same rule on the other half gives the replication of the core set
        replicated = select_core_tokens(measured_on, valid, *self._rule)
        cores = []
        for j, (neuron, idx, other) in enumerate(zip(neurons, picked, replicated, strict=True)):
            acts = measured_on[idx, j].astype(np.float64)
            overlap = len(np.intersect1d(idx, other)) / len(idx) if len(idx) else np.nan
            reliability = _spearman(chosen_on[idx, j], acts)
            # highest measured activation first, as everywhere downstream
            order = np.lexsort((type_ids[idx], -acts))
            cores.append(CoreTokens(int(neuron), type_ids[idx][order], acts[order],
                                    core_overlap=overlap, core_reliability=reliability))  # fmt: skip
        return cores

    def _select_occurrences(self, profile, neurons, keep_token, units) -> list[CoreTokens]:
        token_ids = profile.numpy("topk_token_ids")[neurons]  # [m, K]
        values = profile.numpy("topk_values")[neurons].astype(np.float64)  # [m, K], -inf = unfilled
        if keep_token is not None:
            values = np.where(keep_token[token_ids], values, np.nan)  # NaN is never selected
        if units is not None:  # an occurrence of a form is an occurrence of its unit
            token_ids = units.unit_id(token_ids)
        if self.repeats == "keep":
            picked = select_core_tokens(values.T, None, *self._rule)
            return [
                CoreTokens(int(neuron), token_ids[j, idx], values[j, idx])
                for j, (neuron, idx) in enumerate(zip(neurons, picked, strict=True))
            ]
        cores = []
        for j, neuron in enumerate(neurons):
            filled = np.isfinite(values[j])
            ids, inverse = np.unique(token_ids[j, filled], return_inverse=True)
            merged = np.bincount(inverse, weights=values[j, filled], minlength=ids.size)
            merged /= np.maximum(np.bincount(inverse, minlength=ids.size), 1)  # [u] mean per type
            (idx,) = select_core_tokens(merged[:, None], None, *self._rule)
            cores.append(CoreTokens(int(neuron), ids[idx], merged[idx]))
        return cores

    def _skip_unselective(self, profile, cores: list[CoreTokens]) -> list[CoreTokens]:
        """Mark neurons whose core tokens sit less than `min_selectivity` SDs above the neuron's
        corpus mean (dead or nearly flat neurons): their "core" is noise."""
        mean, var = profile.numpy("act_mean"), profile.numpy("act_var")  # [D] each
        marked = []
        for core in cores:
            sd = float(np.sqrt(var[core.neuron]))
            selectivity = (float(core.acts.mean()) - float(mean[core.neuron])) / sd if sd > 0 and len(core.acts) else 0.0
            skipped = ""
            if selectivity < self.min_selectivity:
                skipped = (f"selectivity {selectivity:.2f} SD < core_tokens.min_selectivity={self.min_selectivity:g}"
                           if sd > 0 else "constant activation over the corpus (dead neuron)")  # fmt: skip
            marked.append(replace(core, selectivity=selectivity, skipped=skipped))
        return marked


def _spearman(a: np.ndarray, b: np.ndarray) -> float:
    if a.size < 3 or np.ptp(a) == 0 or np.ptp(b) == 0:
        return np.nan
    return float(stats.spearmanr(a, b)[0])


@dataclass(frozen=True)
class CoreTokens:
    """One neuron's core tokens, highest activation first. acts are measured on the half of the
    corpus the tokens were not chosen on when cross-fitting."""

    neuron: int
    token_ids: np.ndarray  # [n] vocabulary ids (of a variant unit: its most frequent form; repeats
    # only for unit=occurrence, repeats=keep)
    acts: np.ndarray  # [n] mean activation of the type, or the occurrence's activation
    core_overlap: float = np.nan  # cross-fitting: share of the core set chosen again on the other half
    core_reliability: float = np.nan  # cross-fitting: Spearman of the two halves' means over the core
    selectivity: float = np.nan  # (mean core activation - corpus mean) / corpus SD
    skipped: str = ""  # why the neuron is not analysed ("" = it is)
