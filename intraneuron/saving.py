"""A refused save said one way: as an OSError.

A full, read-only or vanished disk is an OSError from Python's own file calls, but safetensors
reports it with its own SafetensorError (not an OSError). The callers that keep a computed result
when its save fails (the profile cache, the model caches) catch OSError alone.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from pathlib import Path

from safetensors import SafetensorError


@contextlib.contextmanager
def save_errors_as_oserror(path: str | Path) -> Iterator[None]:
    """Raise the SafetensorError of a save into `path` as an OSError naming it."""
    try:
        yield
    except SafetensorError as err:
        raise OSError(f"could not write {path}: {err}") from err
