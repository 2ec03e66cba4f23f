"""What a run needs to know about the Hydra job it runs in: launch directory, overrides, sweep folder.

Hydra is imported inside the functions: this module is reached from config validation, which must
stay cheap to import.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from intraneuron.tracking.redact import redact

PARENT_RUN_ID_FILE = "mlflow_parent_run_id"  # in the sweep folder, written by MlflowSweepCallback
RUN_INFO_FILE = "mlflow_run.json"  # in each job's output folder, written by tracked_run


def launch_dir() -> Path:
    """The directory the command was launched from.

    Inside a Hydra job this is `hydra.runtime.cwd`, not the current directory: with
    `hydra.job.chdir=true` each job runs inside its own output folder, and a relative path resolved
    there (a sqlite store, an artifact root) would give every job a store of its own.
    """
    from hydra.core.hydra_config import HydraConfig

    if HydraConfig.initialized():
        return Path(HydraConfig.get().runtime.cwd)
    return Path.cwd()


@dataclass(frozen=True)
class HydraJob:
    """What a run needs to know about the Hydra job it belongs to."""

    multirun: bool
    original_cwd: Path
    sweep_dir: Path | None  # absolute; only in a multirun
    job_num: int | None  # only in a multirun
    name: str
    overrides: list[str]
    swept_overrides: list[str]  # the overrides that differ between the jobs of a sweep (all, outside one)
    output_dir: str
    choices: dict[str, str]

    def parent_run_id(self) -> str | None:
        """The sweep's parent run id written by MlflowSweepCallback, if any."""
        if self.sweep_dir is None:
            return None
        marker = self.sweep_dir / PARENT_RUN_ID_FILE
        return marker.read_text().strip() if marker.is_file() else None

    def tags(self) -> dict[str, str]:
        tags = {"hydra.overrides": " ".join(self.overrides), "hydra.output_dir": self.output_dir}
        if self.job_num is not None:
            tags["hydra.job_num"] = str(self.job_num)
        tags.update({f"hydra.choice.{group}": str(option) for group, option in self.choices.items()})
        return tags


def current_hydra_job() -> HydraJob | None:
    """The running Hydra job, or None outside Hydra."""
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode

    if not HydraConfig.initialized():
        return None
    hc = HydraConfig.get()
    original_cwd = Path(hc.runtime.cwd)
    multirun = hc.mode == RunMode.MULTIRUN
    choices = {
        str(group): str(option)
        for group, option in (hc.runtime.choices or {}).items()
        if not str(group).startswith("hydra/") and option is not None
    }
    sweep_dir = (original_cwd / str(hc.sweep.dir)).resolve() if multirun else None
    overrides = [str(o) for o in hc.overrides.task]
    shared = sweep_wide_overrides(sweep_dir) if sweep_dir is not None else set()
    return HydraJob(
        multirun=multirun,
        original_cwd=original_cwd,
        sweep_dir=sweep_dir,
        job_num=int(hc.job.num) if multirun else None,
        name=str(hc.job.name),
        overrides=overrides,
        swept_overrides=[o for o in overrides if _canonical(o) not in shared],
        output_dir=str(hc.runtime.output_dir),
        choices=choices,
    )


def sweep_wide_overrides(sweep_dir: Path) -> set[str]:
    """Overrides given to the whole sweep verbatim (not swept), from the sweeper's multirun.yaml."""
    from omegaconf import OmegaConf

    saved = sweep_dir / "multirun.yaml"
    if not saved.is_file():
        return set()
    task = OmegaConf.select(OmegaConf.load(saved), "hydra.overrides.task", default=None)
    return {_canonical(str(o)) for o in task} if task is not None else set()


def _canonical(override: str) -> str:
    """One spelling of an override for comparing a job's with the sweep's: Hydra escapes some
    characters in a job's overrides ("sqlite\\:///") but not in the saved sweep's, gives a job
    `key=False` where the sweep saved `key=false`, and the saved sweep's passwords are masked
    (`RedactCallback`) once its first job has started."""
    override = redact(override.replace("\\", ""))
    key, sep, value = override.partition("=")
    return f"{key}{sep}{value.lower()}" if value in ("True", "False") else override
