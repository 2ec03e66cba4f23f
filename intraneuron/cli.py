"""Command line: `python -m intraneuron [overrides]` or `intraneuron [overrides]` (Hydra).

    intraneuron layer=3 core_tokens=fraction_of_max core_tokens.tau=0.7
    intraneuron --multirun layer=0,1 clustering=ward,kmeans
    intraneuron sweep=threshold_x_clustering_x_embedding
    intraneuron experiment=smoke

Each job is one MLflow run (a sweep nests its jobs under one parent run). A mistake in the config
or a missing file ends the command with a one-line message naming the key and what is allowed.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

import hydra
from hydra.errors import CompactHydraException
from omegaconf import DictConfig

from intraneuron.errors import ConfigError, MissingAssetError
from intraneuron.runner import HEADLINE_METRICS, PARAM_KEYS, JobSummary, run
from intraneuron.tracking import tracked_task

log = logging.getLogger("intraneuron")
# conf/ sits next to the package in the source tree (an editable install, as the set-up makes).
CONF_DIR = Path(__file__).resolve().parents[1] / "conf"


class UserError(CompactHydraException):
    """A mistake the user can fix: Hydra prints its message alone, without a traceback."""


_tracked_run = tracked_task(param_keys=PARAM_KEYS)(run)


@hydra.main(config_path=str(CONF_DIR), config_name="config", version_base="1.3")
def main(cfg: DictConfig) -> JobSummary:
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    try:
        summary = _tracked_run(cfg)
    except (ConfigError, MissingAssetError) as error:
        # recorded FAILED in MLflow already; the user needs the sentence, not the stack
        raise UserError(f"{type(error).__name__}: {error}") from None
    _report(summary, cfg)
    return summary


def _report(summary: JobSummary, cfg: DictConfig) -> None:
    for layer, metrics in summary.layers.items():
        shown = ", ".join(f"{key}={metrics[key]:.3g}" for key in HEADLINE_METRICS if key in metrics)
        log.info("layer %d: %s", layer, shown)
    uri = cfg.tracking.tracking_uri
    log.info(
        "results: MLflow run %s in %s (experiment %r); per-neuron tables are its artifacts "
        "layer_<l>/tables/*.parquet. Browse: mlflow ui --backend-store-uri %s",
        summary.run_id, uri, cfg.tracking.experiment, uri,
    )


if __name__ == "__main__":
    main()
