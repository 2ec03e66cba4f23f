"""Where caches and vendored data live.

Everything derived (de-quantised weights, token windows, activation profiles) goes under one cache
root so that a rerun finds it; `INTRANEURON_CACHE` moves it (e.g. to scratch space on a cluster).
Debian text packages are unpacked by `scripts/setup.sh` under `<cache>/vendor`, mirroring the
filesystem layout, so the same relative path also finds a system-wide `apt-get install`.
"""

from __future__ import annotations

import os
from pathlib import Path

from intraneuron.errors import MissingAssetError


def cache_dir() -> Path:
    return Path(os.environ.get("INTRANEURON_CACHE", Path.cwd() / ".cache")).resolve()


def vendor_dir() -> Path:
    return cache_dir() / "vendor"


def find_vendored(relative: str) -> Path:
    """Locate a file or folder shipped by a Debian package, e.g. "usr/share/wordnet/data.noun"."""
    for root in (vendor_dir(), Path("/")):
        candidate = root / relative
        if candidate.exists():
            return candidate
    raise MissingAssetError(
        f"{relative} not found under {vendor_dir()} or /: run `make setup` (scripts/setup.sh) "
        "to download and unpack the Debian packages it comes from"
    )
