"""Parsing WordNet's supersenses (`load_supersenses`, every lemma of the vendored wordnet-base),
against reading the same files' bytes alone, median of a few fresh parses in one run.

    .venv/bin/python benchmarks/wordnet.py [--repeats 5]

The parse reads each index file line by line and gathers every first sense's lexicographer file
from the data files in one indexing step (no line of a data file is parsed); reading the bytes is
the floor, the ratio the price of the parsing. Measured on 2 shared cores: about 0.7 s, 40x.
"""

from __future__ import annotations

import argparse
import statistics
import time

from intraneuron.categories import wordnet


def parse() -> None:
    wordnet._read_lexicon.cache_clear()
    wordnet._supersenses_in.cache_clear()
    wordnet.load_supersenses()


def read_bytes() -> None:
    for path in wordnet.wordnet_dir().iterdir():
        if path.is_file():
            path.read_bytes()


def median_seconds(step, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        step()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--repeats", type=int, default=5)
    repeats = parser.parse_args().repeats
    read_bytes()  # warm the file cache
    reading, parsing = median_seconds(read_bytes, repeats), median_seconds(parse, repeats)
    print(f"median of {repeats}; {len(wordnet.load_supersenses())} lemmas")
    print(f"read the files' bytes   {reading:6.3f} s")
    print(f"load_supersenses        {parsing:6.3f} s  {parsing / reading:5.1f}x reading")


if __name__ == "__main__":
    main()
