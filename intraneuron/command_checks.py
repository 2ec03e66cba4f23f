"""What the read-back commands (`intraneuron compare|show|stale|merge`) check before any work: the
tracking store, as a job's pre-flight does, and the folder a command writes to."""

from __future__ import annotations

import os
from pathlib import Path

from intraneuron.errors import NotFound


def checked_store(uri: str | None, *, writes: bool) -> str:
    """The store's URI (sqlite paths made absolute), checked like a job's (`check_reachable`), and
    refusing to create an empty sqlite file by a typo. `writes`: the command writes to the store."""
    from intraneuron.tracking.preflight import check_reachable
    from intraneuron.tracking.store import TrackingConfig, resolve

    tcfg = TrackingConfig(tracking_uri=uri or os.environ.get("MLFLOW_TRACKING_URI") or TrackingConfig.tracking_uri)
    resolved = resolve(tcfg, Path.cwd())
    if resolved.sqlite_file is not None and not resolved.sqlite_file.is_file():
        raise NotFound(f"no MLflow store at {resolved.sqlite_file} (give --tracking-uri)")
    check_reachable(tcfg, Path.cwd(), writes=writes)
    return resolved.tracking_uri


def check_out(out: Path | None, folder: Path) -> None:
    """Refuse, before any work, an --out whose folder (created if missing) takes no new file."""
    from intraneuron.errors import ConfigError
    from intraneuron.tracking.preflight import unwritable

    if problem := unwritable(folder.absolute(), create=False):
        raise ConfigError("--out", out and str(out), f"a folder that can be created and written ({problem})")
