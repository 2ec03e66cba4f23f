"""Where the configs, caches and vendored data live, independent of the working directory.

Everything derived (de-quantised weights, token windows, activation profiles) goes under one cache
root so that a rerun finds it: `<project>/.cache`, or `INTRANEURON_CACHE` (e.g. scratch space on a
cluster). Paths are anchored to the project, not to the working directory, so a job that Hydra moves
into its output folder (`hydra.job.chdir=true`) finds the same caches.
Debian text packages are unpacked by `scripts/setup.sh` under `<project>/.cache/vendor`, mirroring
the filesystem layout, so the same relative path also finds a system-wide `apt-get install`; they
are looked up there whatever `INTRANEURON_CACHE` says, and under `<cache>/vendor` first.
"""

from __future__ import annotations

import os
from pathlib import Path

from intraneuron.errors import MissingAssetError

PROJECT_ROOT = Path(__file__).resolve().parents[1]  # the source tree (editable install)
CONF_DIR = PROJECT_ROOT / "conf"


def cache_dir() -> Path:
    return Path(os.environ.get("INTRANEURON_CACHE") or PROJECT_ROOT / ".cache").expanduser().resolve()


def vendor_dirs() -> list[Path]:
    """Where unpacked Debian packages are looked for, in order (without duplicates)."""
    dirs = [cache_dir() / "vendor", PROJECT_ROOT / ".cache" / "vendor"]
    return list(dict.fromkeys(dirs))


def find_vendored(relative: str) -> Path:
    """Locate a file or folder shipped by a Debian package, e.g. "usr/share/wordnet/data.noun"."""
    roots = [*vendor_dirs(), Path("/")]
    for root in roots:
        candidate = root / relative
        if candidate.exists():
            return candidate
    raise MissingAssetError(
        f"{relative} not found under {' or '.join(map(str, roots))}: run `make setup` "
        "(scripts/setup.sh) to download and unpack the Debian packages it comes from"
    )
