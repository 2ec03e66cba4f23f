"""Step 2: each neuron's core tokens, the candidates it responds to most.

Candidates are token types (values = mean activation per type; invalid = too few occurrences) or
occurrences (values = the top-k activations). Selection is vectorised over blocks of neurons.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from intraneuron.errors import ConfigError

RULES = ("top_n", "fraction_of_max", "quantile", "positive")
UNITS = ("type", "occurrence")

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

    def validate(self) -> None:
        if self.unit not in UNITS:
            raise ConfigError("core_tokens.unit", self.unit, UNITS)
        validate_core_token_rule(self.rule, self.n, self.tau, self.q, self.max_tokens)
        if self.min_count < 1:
            raise ConfigError("core_tokens.min_count", self.min_count, "an integer >= 1")
        if self.min_core_tokens < 3:
            raise ConfigError("core_tokens.min_core_tokens", self.min_core_tokens, "an integer >= 3")

    def check_against_top_k(self, top_k: int) -> None:
        """unit=occurrence draws from the extraction's top-k occurrences: it cannot ask for more."""
        if self.unit != "occurrence":
            return
        key = "core_tokens.n" if self.rule == "top_n" else "core_tokens.max_tokens"
        wanted = self.n if self.rule == "top_n" else self.max_tokens
        if wanted is None or wanted > top_k:
            raise ConfigError(key, wanted, f"<= extraction.top_k={top_k} (occurrences kept per neuron)")

    def keep_mask(self, token_texts: list[str]) -> np.ndarray | None:
        """[vocab] keep-mask of the core-token filters, or None when both are off."""
        if not (self.drop_whitespace_punct or self.drop_byte_fragments):
            return None
        return token_filter_mask(token_texts, self.drop_whitespace_punct, self.drop_byte_fragments)

    def select(self, profile, neurons: np.ndarray, keep_token: np.ndarray | None = None) -> list[CoreTokens]:
        """Core tokens of each neuron in `neurons` [m] from one layer's ActivationProfile.

        unit="type": candidates are the token types seen at least `min_count` times, valued by
        their mean activation; unit="occurrence": the neuron's top-k activating positions.
        keep_token: [vocab] bool, False for tokens the filters drop (None keeps all).
        """
        rule = (self.rule, self.n, self.tau, self.q, self.max_tokens)
        if self.unit == "type":
            type_ids = profile.numpy("type_ids")  # [T]
            values = profile.numpy("type_mean")[:, neurons]  # [T, m]
            valid = profile.numpy("type_count") >= self.min_count  # [T]
            if keep_token is not None:
                valid &= keep_token[type_ids]
            picked = select_core_tokens(values, valid, *rule)
            return [
                CoreTokens(int(neuron), type_ids[idx], values[idx, j].astype(np.float64))
                for j, (neuron, idx) in enumerate(zip(neurons, picked, strict=True))
            ]
        token_ids = profile.numpy("topk_token_ids")[neurons]  # [m, K]
        values = profile.numpy("topk_values")[neurons].astype(np.float64)  # [m, K], -inf = unfilled
        if keep_token is not None:
            values = np.where(keep_token[token_ids], values, np.nan)  # NaN is never selected
        picked = select_core_tokens(values.T, None, *rule)
        return [
            CoreTokens(int(neuron), token_ids[j, idx], values[j, idx])
            for j, (neuron, idx) in enumerate(zip(neurons, picked, strict=True))
        ]


@dataclass(frozen=True)
class CoreTokens:
    """One neuron's core tokens, highest activation first."""

    neuron: int
    token_ids: np.ndarray  # [n] vocabulary ids (repeats possible for unit="occurrence")
    acts: np.ndarray  # [n] mean activation of the type, or the occurrence's activation
