"""Text sources: each yields documents (str) in a fixed order.

Sources check their inputs when called (missing files, missing libraries) and read lazily, so a
caller whose token windows are already cached never pays for parsing the text. `source_key` gives a
cheap, stable description of a source's content for those cache keys.
"""

from __future__ import annotations

import codecs
import glob
import hashlib
import inspect
import json
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path

from intraneuron.corpus import rdata_books
from intraneuron.errors import ConfigError, MissingAssetError
from intraneuron.paths import find_vendored

_PACKAGE_LICENCE = "MIT (R package and its Debian packaging)"
_TEXT_LICENCE = "public domain (Project Gutenberg transcriptions of pre-1900 books)"

PROVENANCE: dict[str, dict[str, object]] = {
    "austen": {
        "description": "Jane Austen's six novels, one document per novel, in publication order",
        "books": [f"{title} (Jane Austen)" for title in rdata_books.AUSTEN_NOVELS.values()],
        "debian_packages": ["r-cran-janeaustenr (1.0.0-1, bookworm)"],
        "upstream": "CRAN janeaustenr by Julia Silge, https://cran.r-project.org/package=janeaustenr",
        "files": [rdata_books.JANEAUSTENR_DB + ".rdx", rdata_books.JANEAUSTENR_DB + ".rdb"],
        "package_licence": _PACKAGE_LICENCE,
        "text_licence": _TEXT_LICENCE,
    },
    "gutenberg": {
        "description": "Austen's six novels plus the three non-Austen novels of tidytext's books.rda "
        "(its duplicate Pride and Prejudice skipped): nine documents",
        "books": [f"{title} (Jane Austen)" for title in rdata_books.AUSTEN_NOVELS.values()]
        + [
            f"{title} ({author})"
            for title, author in rdata_books.TIDYTEXT_AUTHORS.items()
            if title != "Pride and Prejudice"
        ],
        "debian_packages": [
            "r-cran-janeaustenr (1.0.0-1, bookworm)",
            "r-cran-tidytext (0.4.1-1, bookworm)",
        ],
        "upstream": "CRAN janeaustenr and tidytext by Julia Silge, David Robinson et al., "
        "https://cran.r-project.org/package=janeaustenr, https://cran.r-project.org/package=tidytext",
        "files": [
            rdata_books.JANEAUSTENR_DB + ".rdx",
            rdata_books.JANEAUSTENR_DB + ".rdb",
            rdata_books.TIDYTEXT_BOOKS,
        ],
        "package_licence": _PACKAGE_LICENCE,
        "text_licence": _TEXT_LICENCE,
    },
}

DEFAULT_SOURCE = "gutenberg"
_TEXT_SUFFIXES = (".txt", ".jsonl")


def _vendored_files(name: str) -> list[Path]:
    return [find_vendored(relative) for relative in PROVENANCE[name]["files"]]


def austen() -> Iterator[str]:
    """Austen's six novels (Debian r-cran-janeaustenr), one document each."""
    _vendored_files("austen")  # fail now, not at the first next()
    return (book.text for book in rdata_books.austen_books())


def gutenberg() -> Iterator[str]:
    """The default corpus: Austen's six novels then War of the Worlds, Twenty Thousand Leagues,
    Great Expectations (about 1.5M GPT-2 tokens)."""
    _vendored_files("gutenberg")
    return (
        book.text
        for books in (rdata_books.austen_books, rdata_books.tidytext_books)
        for book in books()
    )


def resolve_text_files(paths: str | Path | Iterable[str | Path]) -> list[Path]:
    """Expand paths, glob patterns and directories into .txt/.jsonl files, in the order given."""
    paths = [paths] if isinstance(paths, str | Path) else list(paths)
    files: list[Path] = []
    for entry in paths:
        pattern = str(Path(entry).expanduser())
        if glob.has_magic(pattern):
            matches = sorted(glob.glob(pattern, recursive=True))
            if not matches:
                raise MissingAssetError(f"corpus.options.paths: no file matches {pattern!r}")
            candidates = [Path(m) for m in matches if Path(m).is_file()]
        elif Path(pattern).is_dir():
            candidates = sorted(p for p in Path(pattern).rglob("*") if p.suffix in _TEXT_SUFFIXES)
        elif Path(pattern).is_file():
            candidates = [Path(pattern)]
        else:
            raise MissingAssetError(f"corpus.options.paths: {pattern} does not exist")
        for candidate in candidates:
            if candidate.suffix not in _TEXT_SUFFIXES:
                raise ConfigError("corpus.options.paths", str(candidate), ".txt or .jsonl files")
        files.extend(candidates)
    if not files:
        raise ConfigError("corpus.options.paths", [str(p) for p in paths], "files containing text")
    return files


def text_files(paths: str | Path | Iterable[str | Path], text_field: str = "text") -> Iterator[str]:
    """Local files: a .txt file is one document, each line of a .jsonl file is one (its `text_field`)."""
    files = resolve_text_files(paths)
    return _read_text_files(files, text_field)


def _read_text_files(files: list[Path], text_field: str) -> Iterator[str]:
    n_documents = 0
    for path in files:
        for document in _documents_of(path, text_field):
            if document.strip():
                n_documents += 1
                yield document
    if n_documents == 0:
        raise ConfigError("corpus.options.paths", [str(p) for p in files], "files containing text")


def _documents_of(path: Path, text_field: str) -> Iterator[str]:
    if path.suffix == ".txt":
        yield path.read_text(encoding="utf-8")
        return
    with path.open(encoding="utf-8") as lines:
        for line_number, line in enumerate(lines, start=1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as error:
                raise ConfigError(
                    "corpus.options.paths", f"{path}:{line_number}", f"one JSON object per line ({error})"
                ) from None
            if not isinstance(record, dict) or not isinstance(record.get(text_field), str):
                found = sorted(record) if isinstance(record, dict) else type(record).__name__
                raise ConfigError(
                    "corpus.options.text_field",
                    text_field,
                    f"a string field of every record; {path}:{line_number} has {found}",
                )
            yield record[text_field]


def hf_dataset(
    name: str,
    config: str | None = None,
    split: str = "train",
    text_field: str = "text",
    revision: str | None = None,
) -> Iterator[str]:
    """A Hugging Face dataset, streamed (needs `pip install datasets` and network or an HF cache)."""
    try:
        import datasets
    except ImportError as error:
        raise ImportError(
            "corpus source 'hf_dataset' needs the Hugging Face `datasets` library, which is not "
            "installed: run `pip install datasets` (or use source 'text_files' / 'gutenberg')"
        ) from error
    stream = datasets.load_dataset(name, config, split=split, streaming=True, revision=revision)
    return _read_records(stream, text_field, f"{name}/{config or ''}:{split}")


def _read_records(records: Iterable[dict], text_field: str, where: str) -> Iterator[str]:
    for record in records:
        if text_field not in record:
            raise ConfigError(
                "corpus.options.text_field", text_field, f"one of the columns of {where}: {sorted(record)}"
            )
        if record[text_field]:
            yield record[text_field]


SOURCES: dict[str, Callable[..., Iterator[str]]] = {
    "gutenberg": gutenberg,
    "austen": austen,
    "text_files": text_files,
    "hf_dataset": hf_dataset,
}


def _bind(kind: str, options: dict) -> tuple[Callable[..., Iterator[str]], inspect.BoundArguments]:
    if kind not in SOURCES:
        raise ConfigError("corpus.source", kind, list(SOURCES))
    read = SOURCES[kind]
    signature = inspect.signature(read)
    try:
        bound = signature.bind(**options)
    except TypeError as error:
        allowed = ", ".join(signature.parameters) or "no options"
        raise ConfigError("corpus.options", options, f"options of corpus.source={kind!r}: {allowed} ({error})") from None
    bound.apply_defaults()
    return read, bound


def check_source(kind: str, options: dict) -> None:
    """Everything about a source that can be checked before a model loads: its options bind, its
    packaged files are unpacked, and local files exist, are non-empty, decode as UTF-8 and (JSONL)
    have the text field in their first record."""
    _, bound = _bind(kind, options)
    if kind in PROVENANCE:
        _vendored_files(kind)
    elif kind == "text_files":
        for path in resolve_text_files(bound.arguments["paths"]):
            _check_text_file(path, bound.arguments["text_field"])


def _check_text_file(path: Path, text_field: str) -> None:
    if path.stat().st_size == 0:
        raise ConfigError("corpus.options.paths", str(path), "non-empty files (this one is empty)")
    decoder = codecs.getincrementaldecoder("utf-8")()
    with path.open("rb") as raw:
        offset = 0
        while chunk := raw.read(1 << 20):
            try:
                decoder.decode(chunk)
            except UnicodeDecodeError as error:
                raise ConfigError(
                    "corpus.options.paths", str(path),
                    f"UTF-8 text files (byte {offset + error.start} does not decode)",
                ) from None
            offset += len(chunk)
    if path.suffix == ".jsonl":
        next(_documents_of(path, text_field), None)  # the first record has the field, or this raises


def load_source(kind: str, **options) -> Iterator[str]:
    """Documents of the source `kind` (one of SOURCES), built with its keyword options."""
    read, bound = _bind(kind, options)
    return read(**bound.arguments)


def source_key(kind: str, **options) -> str:
    """A stable description of what a source yields, cheap to compute (no text parsing).

    Packaged and local sources hash their input files' bytes (plus the reader version), so editing a
    file changes the key; HF datasets are described by name, config, split, field and revision.
    """
    read, bound = _bind(kind, options)
    described = json.dumps({"source": kind, **bound.arguments}, sort_keys=True, default=str)
    if kind in PROVENANCE:
        files = _vendored_files(kind)
        described += f"|reader=v{rdata_books.READER_VERSION}"
    elif kind == "text_files":
        files = resolve_text_files(bound.arguments["paths"])
    else:
        return described
    digest = hashlib.sha256()
    for path in files:
        with path.open("rb") as handle:
            digest.update(hashlib.file_digest(handle, "sha256").digest())
    return f"{described}|files_sha256={digest.hexdigest()}"
