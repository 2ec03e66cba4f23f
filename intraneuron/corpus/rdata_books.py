"""Public-domain novels shipped inside two Debian R data packages, read without R.

`r-cran-janeaustenr` stores Austen's six novels in an R lazy-load database (`data/Rdata.rdx` index +
`data/Rdata.rdb` blob, one character vector per novel, one element per printed line);
`r-cran-tidytext` stores four Gutenberg novels in `extdata/books.rda`, a data frame with one row per
line. The PyPI package `rdata` parses the R serialisation format; this module only finds the records
and turns lines into one text per book.
"""

from __future__ import annotations

import bz2
import gzip
import lzma
import re
import warnings
import zlib
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

import rdata

from intraneuron.paths import find_vendored

JANEAUSTENR_DB = "usr/lib/R/site-library/janeaustenr/data/Rdata"  # + ".rdx" / ".rdb"
TIDYTEXT_BOOKS = "usr/lib/R/site-library/tidytext/extdata/books.rda"

# janeaustenr's own titles, in publication order (the order of its austen_books()).
AUSTEN_NOVELS = {
    "sensesensibility": "Sense & Sensibility",
    "prideprejudice": "Pride & Prejudice",
    "mansfieldpark": "Mansfield Park",
    "emma": "Emma",
    "northangerabbey": "Northanger Abbey",
    "persuasion": "Persuasion",
}
TIDYTEXT_AUTHORS = {
    "The War of the Worlds": "H. G. Wells",
    "Twenty Thousand Leagues under the Sea": "Jules Verne",
    "Great Expectations": "Charles Dickens",
    "Pride and Prejudice": "Jane Austen",
}
# Bumped whenever the text produced from the same package files changes (cache keys include it).
READER_VERSION = 1

_BLANK_RUN = re.compile(r"\n{3,}")


@dataclass(frozen=True)
class Book:
    title: str
    author: str
    text: str


def lines_to_text(lines) -> str:
    """One document from printed lines: lines joined by newlines, a blank line between paragraphs.

    Runs of blank lines (title pages, chapter gaps) collapse to one paragraph break, so the token
    stream is not padded with newline tokens that carry no text.
    """
    text = "\n".join(str(line).rstrip() for line in lines)
    return _BLANK_RUN.sub("\n\n", text).strip()


def _parse(raw: bytes, **kwargs):
    with warnings.catch_warnings():
        # rdata warns about R classes it maps to a parent class (tbl_df -> data.frame) and about
        # headerless streams, which is what lazy-load records are.
        warnings.simplefilter("ignore", UserWarning)
        return rdata.conversion.convert(rdata.parser.parse_data(raw, **kwargs))


def _inflate_record(record: bytes, method: int) -> bytes:
    """Decompress one lazy-load record: a 4-byte big-endian length, then the compressed stream."""
    expected = int.from_bytes(record[:4], "big")
    if method == 1:
        data = zlib.decompress(record[4:])
    else:  # R's compress=2/3 records carry a one-byte method tag after the length
        inflate = {b"Z": zlib.decompress, b"2": bz2.decompress, b"3": lzma.decompress, b"0": bytes}
        data = inflate[record[4:5]](record[5:])
    if len(data) != expected:
        raise ValueError(f"lazy-load record inflated to {len(data)} bytes, header says {expected}")
    return data


def read_r_lazyload(
    prefix: str | Path, names: Iterable[str] | None = None
) -> Iterator[tuple[str, object]]:
    """(name, object) pairs of an R lazy-load database `<prefix>.rdx` + `<prefix>.rdb`, converted by
    rdata; only `names` (in that order) if given. Objects are parsed one at a time, on demand."""
    prefix = Path(prefix)
    index = _parse(gzip.decompress(prefix.with_suffix(".rdx").read_bytes()))
    method = int(index["compressed"][0])  # TRUE (= 1) is zlib; R also writes 2 (bzip2), 3 (xz)
    records = {
        str(name): (int(offset), int(length))
        for name, (offset, length) in index["variables"].items()
    }
    with prefix.with_suffix(".rdb").open("rb") as blob:
        for name in records if names is None else names:
            offset, length = records[name]
            blob.seek(offset)
            yield name, _parse(_inflate_record(blob.read(length), method), expand_altrep=True)


def austen_books() -> Iterator[Book]:
    """Jane Austen's six novels from `r-cran-janeaustenr`, in publication order, parsed lazily."""
    prefix = find_vendored(JANEAUSTENR_DB + ".rdx").with_suffix("")
    for name, lines in read_r_lazyload(prefix, AUSTEN_NOVELS):
        yield Book(AUSTEN_NOVELS[name], "Jane Austen", lines_to_text(lines))


def tidytext_books(*, exclude_titles: tuple[str, ...] = ("Pride and Prejudice",)) -> Iterator[Book]:
    """The Gutenberg novels of `r-cran-tidytext` (in Gutenberg-id order), minus `exclude_titles`.

    Its Pride and Prejudice duplicates janeaustenr's and is excluded by default.
    """
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        frame = rdata.read_rda(find_vendored(TIDYTEXT_BOOKS))["books"]
    frame = frame.sort_values("gutenberg_id", kind="stable")
    for title, rows in frame.groupby("title", sort=False):
        if title not in exclude_titles:
            yield Book(
                str(title), TIDYTEXT_AUTHORS.get(title, "unknown"), lines_to_text(rows["text"])
            )
