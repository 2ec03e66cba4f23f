"""Documents -> fixed-length windows of token ids, tokenised once and kept as a memmap (nanoGPT style).

The token stream is every document's tokens (no special tokens added), with the tokenizer's EOS
(else SEP) id between consecutive documents; it is cut into windows of `window_len` and the
remainder is dropped. With `prepend_bos` (the config default), each window is [BOS] + the next
`window_len - 1` stream tokens, so position 0 is always the same token (the attention sink, which
extraction skips) and no window starts mid-context with a random token as its sink. The BOS is the
tokenizer's BOS (GPT-2-style tokenizers define it as <|endoftext|>, = EOS); a tokenizer without one
(BERT's WordPiece) gets no BOS and the windows prepend_bos=false gives. Documents that tokenise to
nothing are skipped (no double separators).

Cache layout: `<cache_root>/corpus/<key>/{tokens.npy, manifest.json}`, where the key hashes everything
that changes the ids (source description, tokenizer fingerprint, window_len, max_tokens, prepend_bos).
An entry appears atomically (built in a temporary sibling directory, then renamed) and is verified
against its manifest's size and sha256 on every load.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import tempfile
import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from intraneuron.errors import ConfigError
from intraneuron.hashing import file_sha256
from intraneuron.paths import cache_dir

log = logging.getLogger(__name__)

FORMAT_VERSION = 1
TOKEN_DTYPE = np.dtype("<u4")
# Bounds on what is held in memory while building: characters handed to one tokenizer call (its
# output is Python ints, ~0.25 tokens per character) and tokens kept before writing windows out.
_BATCH_CHARS = 2_000_000
_FLUSH_TOKENS = 4_000_000


@dataclass(frozen=True)
class TokenWindows:
    """Fixed-length windows of token ids, memory-mapped read-only from `path`."""

    path: Path  # tokens.npy, dtype uint32
    ids: np.ndarray = field(compare=False, repr=False)  # memmap [n_windows, window_len]
    window_len: int
    content_hash: str  # sha256 of the token-id bytes + window_len: what extraction caches key on

    @property
    def n_windows(self) -> int:
        return int(self.ids.shape[0])

    @property
    def n_tokens(self) -> int:
        return self.n_windows * self.window_len

    def __len__(self) -> int:
        return self.n_windows

    def window(self, i: int) -> np.ndarray:
        return self.ids[i]  # [window_len]


def text_sha256(documents: Iterable[str]) -> str:
    """sha256 of a document sequence (document boundaries included), for a caller's `source_key`."""
    digest = hashlib.sha256()
    for document in documents:
        data = document.encode("utf-8")
        digest.update(len(data).to_bytes(8, "little"))
        digest.update(data)
    return digest.hexdigest()


def tokenizer_fingerprint(tokenizer) -> str:
    """sha256 of the tokenizer's full definition (vocab, merges, normalisers, added tokens) and of
    its BOS/EOS/SEP tokens."""
    digest = hashlib.sha256()
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is not None:
        digest.update(_definition_without_call_state(backend).encode("utf-8"))
    else:  # slow (pure-Python) tokenizer
        vocab = sorted(tokenizer.get_vocab().items())
        digest.update(json.dumps([type(tokenizer).__name__, vocab]).encode("utf-8"))
    # Only the special tokens build_windows uses: setting e.g. pad_token = eos_token for batched
    # extraction must not invalidate the corpus cache (added tokens are in the definition above).
    specials = {
        role: [getattr(tokenizer, f"{role}_token"), getattr(tokenizer, f"{role}_token_id")]
        for role in ("bos", "eos", "sep")
    }
    digest.update(json.dumps(specials, sort_keys=True, default=str).encode("utf-8"))
    return digest.hexdigest()


def _definition_without_call_state(backend) -> str:
    """The backend's JSON with truncation/padding unset: transformers leaves them set after a call
    that asked for them, and they do not change the ids of a plain encode."""
    truncation, padding = backend.truncation, backend.padding
    backend.no_truncation()
    backend.no_padding()
    try:
        return backend.to_str()
    finally:
        if truncation is not None:
            backend.enable_truncation(**truncation)
        if padding is not None:
            backend.enable_padding(**padding)


def _encode_batch(tokenizer, texts: list[str]) -> list[list[int]]:
    """Token ids of each text, no special tokens (a fast tokenizer encodes the batch in parallel)."""
    encoded = tokenizer(
        texts,
        add_special_tokens=False,
        return_attention_mask=False,
        return_token_type_ids=False,
        verbose=False,  # long documents exceed model_max_length by design
    )
    return encoded["input_ids"]


def _batches(documents: Iterable[str], max_chars: int) -> Iterator[list[str]]:
    batch, n_chars = [], 0
    for document in documents:
        batch.append(document)
        n_chars += len(document)
        if n_chars >= max_chars:
            yield batch
            batch, n_chars = [], 0
    if batch:
        yield batch


def _token_stream(
    documents: Iterable[str], tokenizer, separator_id: int, limit: int | None
) -> Iterator[np.ndarray]:
    """The concatenated stream as uint32 pieces; stops once `limit` tokens were produced."""
    separator = np.array([separator_id], dtype=TOKEN_DTYPE)
    produced = 0
    for batch in _batches(documents, _BATCH_CHARS):
        for ids in _encode_batch(tokenizer, batch):
            if not ids:
                continue
            if produced:
                yield separator
                produced += 1
            piece = np.asarray(ids, dtype=TOKEN_DTYPE)  # [n_doc_tokens]
            yield piece
            produced += len(piece)
            if limit is not None and produced >= limit:
                return


def bos_token_id(tokenizer) -> int | None:
    """The id windows start with under prepend_bos, or None when the tokenizer has no BOS."""
    bos = getattr(tokenizer, "bos_token_id", None)
    return None if bos is None else int(bos)


def _write_windows(
    stream: Iterator[np.ndarray],
    raw_path: Path,
    window_len: int,
    bos_id: int | None,
    max_windows: int | None,
) -> tuple[int, int, str]:
    """Cut the stream into windows appended to a raw file.

    Returns (n_windows, stream tokens read, content hash)."""
    step = window_len - (bos_id is not None)  # stream tokens per window
    content = hashlib.sha256()
    pending: list[np.ndarray] = []
    n_pending = n_windows = n_stream = 0

    def flush(out) -> None:
        nonlocal pending, n_pending, n_windows
        joined = np.concatenate(pending) if pending else np.empty(0, TOKEN_DTYPE)
        n_full = len(joined) // step
        if max_windows is not None:
            n_full = min(n_full, max_windows - n_windows)
        body = joined[: n_full * step].reshape(n_full, step)  # [n_full, step]
        if bos_id is not None:
            bos_column = np.full((n_full, 1), bos_id, TOKEN_DTYPE)
            body = np.hstack([bos_column, body])  # [n_full, window_len]
        body = np.ascontiguousarray(body)
        out.write(body.data)
        content.update(body.data)
        n_windows += n_full
        pending = [joined[n_full * step :]]
        n_pending = len(pending[0])

    with raw_path.open("wb") as out:
        for piece in stream:
            pending.append(piece)
            n_pending += len(piece)
            n_stream += len(piece)
            if n_pending >= _FLUSH_TOKENS:
                flush(out)
        flush(out)
    content.update(f"window_len={window_len}".encode())
    if bos_id is not None:  # (absent without BOS: hashes of windows built before the option stay valid)
        content.update(f"bos={bos_id}".encode())
    return n_windows, n_stream, content.hexdigest()


def _raw_to_npy(raw_path: Path, npy_path: Path, n_windows: int, window_len: int) -> None:
    raw = np.memmap(raw_path, dtype=TOKEN_DTYPE, mode="r", shape=(n_windows, window_len))
    out = np.lib.format.open_memmap(npy_path, mode="w+", dtype=TOKEN_DTYPE, shape=raw.shape)
    rows = max(1, _FLUSH_TOKENS // window_len)
    for start in range(0, n_windows, rows):
        out[start : start + rows] = raw[start : start + rows]
    out.flush()
    del out, raw
    raw_path.unlink()


def _load_verified(entry: Path) -> TokenWindows | None:
    """The entry's windows if its files match the manifest, else None (corrupt or partial)."""
    tokens = entry / "tokens.npy"
    try:
        manifest = json.loads((entry / "manifest.json").read_text())
        if tokens.stat().st_size != manifest["tokens_bytes"]:
            return None
        if file_sha256(tokens) != manifest["tokens_sha256"]:
            return None
        ids = np.load(tokens, mmap_mode="r")
    except (OSError, ValueError, KeyError):
        return None
    if ids.dtype != TOKEN_DTYPE or ids.shape != (manifest["n_windows"], manifest["window_len"]):
        return None
    return TokenWindows(tokens, ids, manifest["window_len"], manifest["content_hash"])


def _check_options(tokenizer, window_len, max_tokens, prepend_bos) -> tuple[int, int | None]:
    """Validate before any tokenisation; returns (separator id, BOS id or None)."""
    if not isinstance(prepend_bos, bool):
        raise ConfigError("corpus.prepend_bos", prepend_bos, "true or false")
    bos_id = bos_token_id(tokenizer) if prepend_bos else None
    min_len = 2 if bos_id is not None else 1
    if isinstance(window_len, bool) or not isinstance(window_len, int) or window_len < min_len:
        raise ConfigError("corpus.window_len", window_len, f"an integer >= {min_len}")
    if max_tokens is not None and (
        isinstance(max_tokens, bool) or not isinstance(max_tokens, int) or max_tokens < window_len
    ):
        raise ConfigError(
            "corpus.max_tokens", max_tokens, f"null or an integer >= window_len={window_len}"
        )
    if prepend_bos and bos_id is None:
        log.info("corpus.prepend_bos: %s has no BOS token; windows start without one", type(tokenizer).__name__)
    separator_id = tokenizer.eos_token_id
    if separator_id is None:
        separator_id = tokenizer.sep_token_id
    if separator_id is None:
        raise ConfigError(
            "model.source",
            type(tokenizer).__name__,
            "a tokenizer with an EOS or SEP token to separate documents",
        )
    return separator_id, bos_id


def build_windows(
    documents: Iterable[str],
    tokenizer,
    *,
    window_len: int,
    max_tokens: int | None = None,
    prepend_bos: bool = False,  # (CorpusConfig's default is true)
    cache_root: Path | None = None,
    source_key: str,
) -> TokenWindows:
    """Tokenise `documents` into windows, or load them from the cache without touching `documents`.

    `source_key` must describe the documents' content (e.g. `sources.source_key(kind, ...)` or a name
    plus `text_sha256`): it is the cache's only view of the text. `max_tokens` caps n_tokens
    (n_windows = max_tokens // window_len at most); None keeps everything.
    """
    separator_id, bos_id = _check_options(tokenizer, window_len, max_tokens, prepend_bos)
    key_fields = {
        "format_version": FORMAT_VERSION,
        "source_key": source_key,
        "tokenizer_fingerprint": tokenizer_fingerprint(tokenizer),
        "window_len": window_len,
        "max_tokens": max_tokens,
        "prepend_bos": bos_id is not None,  # what was done: true without a BOS builds plain windows
    }
    key = hashlib.sha256(json.dumps(key_fields, sort_keys=True).encode()).hexdigest()[:32]
    entry = Path(cache_root if cache_root is not None else cache_dir()) / "corpus" / key

    if entry.exists():
        cached = _load_verified(entry)
        if cached is not None:
            log.info("corpus windows from cache %s (%d x %d)", entry, cached.n_windows, window_len)
            return cached
        log.warning("corpus cache entry %s is corrupt or partial: deleting and rebuilding", entry)
        shutil.rmtree(entry)

    entry.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{key}.", dir=entry.parent))
    try:
        started = time.perf_counter()
        step = window_len - (bos_id is not None)
        max_windows = None if max_tokens is None else max_tokens // window_len
        limit = None if max_windows is None else max_windows * step
        stream = _token_stream(documents, tokenizer, separator_id, limit)
        n_windows, n_stream, content_hash = _write_windows(
            stream, staging / "tokens.raw", window_len, bos_id, max_windows
        )
        if n_windows == 0:
            raise ConfigError(
                "corpus.window_len",
                window_len,
                f"at most the corpus length ({n_stream} tokens) to fill one window",
            )
        _raw_to_npy(staging / "tokens.raw", staging / "tokens.npy", n_windows, window_len)
        manifest = {
            **key_fields,
            "key": key,
            "separator_id": separator_id,
            "bos_id": bos_id,
            "n_windows": n_windows,
            "n_tokens": n_windows * window_len,
            "content_hash": content_hash,
            "tokens_bytes": (staging / "tokens.npy").stat().st_size,
            "tokens_sha256": file_sha256(staging / "tokens.npy"),
            "build_seconds": round(time.perf_counter() - started, 3),
        }
        (staging / "manifest.json").write_text(json.dumps(manifest, indent=2))
        try:
            os.rename(staging, entry)
        except OSError:
            if not entry.exists():
                raise
            shutil.rmtree(staging)  # a concurrent build of the same key won the rename
        log.info(
            "corpus windows built in %.1f s: %d x %d tokens -> %s",
            manifest["build_seconds"],
            n_windows,
            window_len,
            entry,
        )
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    built = _load_verified(entry)
    if built is None:
        raise OSError(f"corpus cache entry {entry} failed verification right after it was written")
    return built


def decode_context(
    windows: TokenWindows, tokenizer, window_idx: int, pos: int, before: int = 32, after: int = 16
) -> tuple[str, str, str]:
    """(text before, the token at `pos`, text after) within one window, e.g. for a top activation."""
    if not 0 <= window_idx < windows.n_windows:
        raise IndexError(f"window_idx {window_idx} outside [0, {windows.n_windows})")
    if not 0 <= pos < windows.window_len:
        raise IndexError(f"pos {pos} outside [0, {windows.window_len})")
    ids = windows.ids[window_idx]  # [window_len]

    def decode(span: np.ndarray) -> str:
        return tokenizer.decode(
            span.tolist(), skip_special_tokens=False, clean_up_tokenization_spaces=False
        )

    return (
        decode(ids[max(0, pos - before) : pos]),
        decode(ids[pos : pos + 1]),
        decode(ids[pos + 1 : pos + 1 + after]),
    )
