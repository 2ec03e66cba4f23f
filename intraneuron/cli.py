"""Command line: `python -m intraneuron [overrides]` or `intraneuron [overrides]` (Hydra).

    intraneuron layer=3 core_tokens=fraction_of_max core_tokens.tau=0.7
    intraneuron analysis=neuron_stats layer=[0,1]
    intraneuron --multirun layer=0,1 clustering=ward,kmeans
    intraneuron sweep=threshold_x_clustering_x_embedding
    intraneuron experiment=smoke
    intraneuron compare <sweep parent run id | experiment>    # children x headline metrics
    intraneuron show <run id> [--neuron N] [--layer L]         # a run's or a neuron's summary
    intraneuron stale [--experiment NAME] [--mark]             # RUNNING runs whose process is gone
    intraneuron merge <sweep parent run id | sweep folder>     # shard runs -> whole layers
    intraneuron ui [--tracking-uri URI] [--port N]             # MLflow's web UI over the store

Each job is one MLflow run (a sweep nests its jobs under one parent run). A mistake in the config
or a missing file ends the command with a one-line message naming the key and what is allowed.
Only Hydra is imported at module level: `--help` and shell completion never pay for torch or MLflow.
"""

from __future__ import annotations

import logging
import os
import sys

import hydra
from hydra.errors import CompactHydraException
from omegaconf import DictConfig, OmegaConf

from intraneuron.paths import CONF_DIR

log = logging.getLogger("intraneuron")
# MLflow prints a link to each run it ends on a server, made of the tracking URI as given, password
# included; `_report` logs where the run is instead
QUIET_RUN_LINKS = ("MLFLOW_SUPPRESS_PRINTING_URL_TO_STDOUT", "true")


def _analyses_help() -> str:
    from intraneuron.registry import help_text

    return help_text()


# `--help` lists the analyses of conf/analysis/ from the registry (conf/hydra/help/intraneuron.yaml)
OmegaConf.register_new_resolver("intraneuron.analyses", _analyses_help, replace=True)


class UserError(CompactHydraException):
    """A mistake the user can fix: Hydra prints its message alone, without a traceback."""


def param_keys(cfg: DictConfig) -> tuple[str, ...]:
    """The config keys logged as params: the run's own and the groups its analysis declares."""
    from intraneuron.errors import ConfigError
    from intraneuron.registry import analysis_class
    from intraneuron.runner import RUN_PARAM_KEYS

    try:
        declared = tuple(analysis_class(OmegaConf.select(cfg, "analysis._target_")).groups)
    except ConfigError:
        declared = ()  # the run fails validation and says why; log what is there
    return RUN_PARAM_KEYS + tuple(key for key in declared if OmegaConf.select(cfg, key) is not None)


def run_job(cfg: DictConfig):
    """One tracked job: an MLflow run around `runner.run` (FAILED with the error when it raises)."""
    from intraneuron.runner import JobSummary, run
    from intraneuron.tracking import tracked_task

    # a multirun job whose config already FINISHED is not run again (tracking.skip_finished)
    return tracked_task(param_keys=param_keys(cfg), skipped=lambda run_id: JobSummary(run_id, {}))(run)(cfg)


@hydra.main(config_path=str(CONF_DIR), config_name="config", version_base="1.3")
def hydra_main(cfg: DictConfig):
    from intraneuron.errors import ConfigError, MissingAssetError
    from intraneuron.tracking.redact import redact

    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    os.environ.setdefault(*QUIET_RUN_LINKS)  # a job in a Ray worker does not pass through main()
    try:
        summary = run_job(cfg)
    except (ConfigError, MissingAssetError) as error:
        # recorded FAILED in MLflow already; the user needs the sentence, not the stack
        raise UserError(redact(f"{type(error).__name__}: {error}")) from None
    _report(summary, cfg)
    return summary


def _report(summary, cfg: DictConfig) -> None:
    from intraneuron.reports.artifacts import table_path
    from intraneuron.runner import describe
    from intraneuron.tracking.redact import redact

    for line in describe(summary).splitlines():
        log.info("%s", line)
    uri = redact(cfg.tracking.tracking_uri)
    log.info(
        "results: MLflow run %s in %s (experiment %r); tables are its artifacts %s. Browse: %s",
        summary.run_id, uri, cfg.tracking.experiment, table_path("<l>", "<name>"), redact(_browse(summary.run_id, cfg)),
    )


def _browse(run_id: str, cfg: DictConfig) -> str:
    """How to see the run's experiment in MLflow's UI, on its saved view of the headline metrics."""
    from mlflow import MlflowClient

    from intraneuron.tracking.hydra_job import launch_dir
    from intraneuron.tracking.store import TrackingConfig, resolve
    from intraneuron.tracking.ui import browse, ui_base, ui_command

    tcfg = TrackingConfig.from_mapping(OmegaConf.to_container(cfg.tracking, resolve=True))
    uri = resolve(tcfg, launch_dir()).tracking_uri  # absolute: the command works from any folder
    try:
        return browse(uri, MlflowClient(uri).get_run(run_id).info.experiment_id)
    except Exception:  # the run is logged; a store that stopped answering costs the link only
        return ui_command(uri) or ui_base(uri)


def main():
    """`intraneuron compare|show|stale|merge|ui ...` read results back (argparse); anything else is a Hydra job."""
    from intraneuron.commands import COMMANDS

    if len(sys.argv) > 1 and sys.argv[1] in COMMANDS:
        from intraneuron.commands import main as report_main

        raise SystemExit(report_main(sys.argv[1:]))
    os.environ.setdefault(*QUIET_RUN_LINKS)  # here too for the sweep's parent run and joblib's workers
    try:
        return hydra_main()
    except KeyboardInterrupt as stop:  # Ctrl-C or SIGTERM: a run that had started is already ended KILLED
        from intraneuron.tracking.signals import Terminated, stopped

        code = 143 if isinstance(stop, Terminated) else 130  # the shell's 128 + signal number
        print(f"intraneuron: {stopped(stop)}", file=sys.stderr)
        raise SystemExit(code) from None


if __name__ == "__main__":
    main()
