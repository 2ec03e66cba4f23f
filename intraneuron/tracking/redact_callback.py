"""The Hydra callback that masks passwords in URIs in what Hydra writes and prints of a job by itself.

Wiring: conf/hydra/callbacks/mlflow_sweep.yaml (`redact_credentials`), in every job and sweep.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import Any

from hydra.experimental.callback import Callback

from intraneuron.tracking.redact import redact

HYDRA_FILES = ("config.yaml", "hydra.yaml", "overrides.yaml")  # what Hydra saves in the job's output_subdir


class RedactCallback(Callback):
    """Hydra saves the job's config and overrides (`.hydra/*.yaml`, a sweep's `multirun.yaml`) before
    any callback or task runs, so they are rewritten as the job starts; the overrides of a failed job,
    which Hydra prints as "Error executing job with overrides: [...]", are masked as it ends.
    """

    def on_job_start(self, config: Any, **kwargs: Any) -> None:
        from hydra.types import RunMode

        hydra = config.hydra
        files = []
        if hydra.output_subdir is not None:
            folder = Path(hydra.runtime.output_dir) / str(hydra.output_subdir)
            files += [folder / name for name in HYDRA_FILES]
        if hydra.mode == RunMode.MULTIRUN:  # the job may run in its own folder (hydra.job.chdir)
            files.append(Path(hydra.runtime.cwd) / str(hydra.sweep.dir) / "multirun.yaml")
        for path in files:
            redact_file(path)

    def on_job_end(self, config: Any, job_return: Any, **kwargs: Any) -> None:
        job_return.overrides = [redact(str(o)) for o in job_return.overrides or []]


def redact_file(path: Path) -> None:
    """Rewrite a text file with its passwords masked; atomic, since other jobs of a sweep may read it."""
    try:
        text = path.read_text(encoding="utf-8")
    except (FileNotFoundError, UnicodeDecodeError):
        return
    masked = redact(text)
    if masked == text:
        return
    handle, temporary = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    with os.fdopen(handle, "w", encoding="utf-8") as out:
        out.write(masked)
    os.chmod(temporary, path.stat().st_mode)  # mkstemp's file is private to its owner
    os.replace(temporary, path)
