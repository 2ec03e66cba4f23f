"""Map token ids of the analysed model's tokenizer to ids of another tokenizer, through their text.

A static embedding checkpoint (GPT-2 XL by default) has its own vocabulary, so an analysed token
(e.g. SmolLM2's "Ġcat") is looked up by what it spells: decode it to text, keeping its leading space,
then encode that text with the checkpoint's tokenizer. One target id: "exact"; several: "multi"
(the caller averages their vectors or drops the token); none, an unknown-token id or a special
token: "unmappable". A partial UTF-8 byte token decodes to U+FFFD and has no text: it is unmappable,
except between two byte-level BPE tokenizers, where its byte string is re-encoded directly.

Decoding goes through the tokenizer's own decoder, behind an anchor token: the text of id `i` is
decode([anchor, i]) minus decode([anchor]). That keeps the leading space for every tokenizer family
(byte-level "Ġcat", SentencePiece "▁cat", WordPiece word-initial "cat" all give " cat"; WordPiece
"##ing" gives "ing"), which decode([i]) alone would strip or mangle.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

EXACT, MULTI, UNMAPPABLE = "exact", "multi", "unmappable"
_REPLACEMENT_CHAR = "\ufffd"  # what a partial UTF-8 byte sequence decodes to
_ANCHOR_TEXT = "a"


@dataclass(frozen=True)
class TokenMapping:
    """Where each source token id lands in the target tokenizer's vocabulary.

    Arrays are aligned with `source_ids`; `target_ids[k]` is empty when `status[k]` is "unmappable".
    `coverage` = fraction of source ids with at least one target id (exact or multi).
    """

    source_ids: np.ndarray  # [n] int64
    target_ids: list[list[int]]
    status: np.ndarray  # [n] str: "exact" | "multi" | "unmappable"
    coverage: float
    texts: list[str]  # [n] decoded text ("" when undecodable); empty for an identity mapping
    tokens: list[str]  # [n] the source tokenizer's token strings; empty for an identity mapping
    identity: bool = False

    @property
    def n_unmappable(self) -> int:
        return int((self.status == UNMAPPABLE).sum())

    def counts(self) -> dict[str, int]:
        return {s: int((self.status == s).sum()) for s in (EXACT, MULTI, UNMAPPABLE)}

    def unmappable_examples(self, limit: int = 10) -> list[tuple[int, str]]:
        """(source id, source token string) of the first `limit` unmappable tokens."""
        rows = np.flatnonzero(self.status == UNMAPPABLE)[:limit]
        return [(int(self.source_ids[r]), self.tokens[r] if self.tokens else "") for r in rows]

    def summary(self) -> str:
        if self.identity:
            return f"identity mapping over {len(self.source_ids)} tokens (same vocabulary)"
        c = self.counts()
        examples = ", ".join(f"{i}:{t!r}" for i, t in self.unmappable_examples(8))
        return (
            f"{len(self.source_ids)} tokens: {c[EXACT]} exact, {c[MULTI]} multi-token, "
            f"{c[UNMAPPABLE]} unmappable (coverage {self.coverage:.2%}); unmappable e.g. {examples}"
        )

    def csr(self) -> tuple[np.ndarray, np.ndarray]:
        """(indptr [n + 1], indices [total]): row k's target ids are indices[indptr[k]:indptr[k + 1]]."""
        lengths = np.fromiter(
            (len(t) for t in self.target_ids), dtype=np.int64, count=len(self.target_ids)
        )
        indptr = np.concatenate([[0], np.cumsum(lengths)])
        indices = np.fromiter(
            (i for ids in self.target_ids for i in ids), dtype=np.int64, count=int(indptr[-1])
        )
        return indptr, indices


def tokenizer_fingerprint(tokenizer) -> str:
    """sha256 of the token -> id table: equal fingerprints mean ids denote the same strings."""
    table = json.dumps(sorted(tokenizer.get_vocab().items()), ensure_ascii=False)
    return hashlib.sha256(table.encode()).hexdigest()


def same_vocabulary(a, b) -> bool:
    return a is b or a.get_vocab() == b.get_vocab()


def special_token_ids(tokenizer) -> set[int]:
    """Control tokens (<|endoftext|>, [CLS], <|im_start|>, <repo_name>, ...): they spell no text."""
    added = getattr(tokenizer, "added_tokens_decoder", {})
    return set(tokenizer.all_special_ids) | {
        i for i, t in added.items() if getattr(t, "special", False)
    }


def is_byte_level(tokenizer) -> bool:
    """GPT-2-style byte-level BPE: token strings spell raw bytes through the same byte -> char table."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    return backend is not None and type(backend.decoder).__name__ == "ByteLevel"


def token_texts(tokenizer, token_ids: Sequence[int]) -> tuple[list[str], np.ndarray]:
    """Text of each id as it reads inside running text (leading space kept), and whether it is text.

    Returns (texts [n], decodable [n] bool). Special tokens and partial UTF-8 byte tokens are not
    decodable; their text is "".
    """
    anchor = tokenizer.encode(_ANCHOR_TEXT, add_special_tokens=False)
    prefix = tokenizer.decode(anchor, clean_up_tokenization_spaces=False)
    decoded = tokenizer.batch_decode(
        [anchor + [int(i)] for i in token_ids],
        clean_up_tokenization_spaces=False,
        skip_special_tokens=False,
    )
    special = special_token_ids(tokenizer)
    texts, decodable = [], np.zeros(len(decoded), dtype=bool)
    for k, (token_id, text) in enumerate(zip(token_ids, decoded, strict=True)):
        ok = (
            text.startswith(prefix)
            and len(text) > len(prefix)
            and _REPLACEMENT_CHAR not in text
            and int(token_id) not in special
        )
        decodable[k] = ok
        texts.append(text[len(prefix) :] if ok else "")
    return texts, decodable


def map_tokens(
    source_tokenizer, target_tokenizer, token_ids: Sequence[int] | None = None
) -> TokenMapping:
    """Map `token_ids` (default: the whole source vocabulary) into the target tokenizer by their text.

    Identical vocabularies give the identity mapping without decoding anything.
    """
    ids = np.arange(len(source_tokenizer)) if token_ids is None else np.asarray(token_ids)
    ids = ids.astype(np.int64)  # [n]
    if len(ids) and (ids.min() < 0 or ids.max() >= len(source_tokenizer)):
        bad = ids[(ids < 0) | (ids >= len(source_tokenizer))][:5].tolist()
        raise ValueError(
            f"token ids {bad} are outside the source vocabulary [0, {len(source_tokenizer)})"
        )
    if same_vocabulary(source_tokenizer, target_tokenizer):
        return TokenMapping(
            source_ids=ids,
            target_ids=[[int(i)] for i in ids],
            status=np.full(len(ids), EXACT, dtype=object),
            coverage=1.0,
            texts=[],
            tokens=[],
            identity=True,
        )

    texts, decodable = token_texts(source_tokenizer, ids.tolist())
    encoded = target_tokenizer(
        [t for t, ok in zip(texts, decodable, strict=True) if ok], add_special_tokens=False
    )
    encoded_ids = iter(encoded["input_ids"])
    unknown = target_tokenizer.unk_token_id
    target_ids: list[list[int]] = []
    for ok in decodable:
        targets = list(next(encoded_ids)) if ok else []
        if unknown is not None and unknown in targets:
            targets = []  # an [UNK] vector says nothing about the token
        target_ids.append(targets)
    _map_partial_bytes(source_tokenizer, target_tokenizer, ids, decodable, target_ids)

    lengths = np.fromiter((len(t) for t in target_ids), dtype=np.int64, count=len(target_ids))
    status = np.where(lengths == 1, EXACT, np.where(lengths > 1, MULTI, UNMAPPABLE)).astype(object)
    coverage = float((lengths > 0).mean()) if len(ids) else 0.0
    tokens = source_tokenizer.convert_ids_to_tokens(ids.tolist())
    return TokenMapping(ids, target_ids, status, coverage, texts, tokens)


def _map_partial_bytes(
    source, target, ids: np.ndarray, decodable: np.ndarray, target_ids: list[list[int]]
) -> None:
    """Between two byte-level tokenizers, a partial UTF-8 token (GPT-2's "âĢ", the first two bytes
    of ’ “ ”) has no text, but its byte string can still be BPE-encoded by the target's model."""
    if not (is_byte_level(source) and is_byte_level(target)):
        return
    special = special_token_ids(source)
    undecodable = [k for k in np.flatnonzero(~decodable) if int(ids[k]) not in special]
    strings = source.convert_ids_to_tokens([int(ids[k]) for k in undecodable])
    target_bpe = target.backend_tokenizer.model
    for k, string in zip(undecodable, strings, strict=True):
        target_ids[k] = [piece.id for piece in target_bpe.tokenize(string)]
